-- Outbound webhooks: endpoints per account (`crm-backend notify`), and one row per delivery
-- (event × endpoint) so that a delivery is accepted once, whichever process sends it.
-- Re-runnable: IF NOT EXISTS / CREATE OR REPLACE throughout.

-- `secret` is the signing secret (`whsec_<base64>`); it is needed in full to sign, so it is
-- stored as is and readable by the service alone (RLS on, no public grants).
-- `events` NULL: every event, including ones added later.
CREATE TABLE IF NOT EXISTS crm_webhook_endpoints (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_account_id uuid NOT NULL,
    url text NOT NULL,
    secret text NOT NULL,
    events text[],
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS crm_webhook_endpoints_account
    ON crm_webhook_endpoints (user_account_id);

-- A delivery being sent holds a lease (`claimed_until`, with the sender's `claim_token`);
-- `accepted_at` is set by the 2xx that ends it. Removed with its endpoint; rows older than
-- 30 days are pruned as new ones finish.
CREATE TABLE IF NOT EXISTS crm_webhook_deliveries (
    webhook_id text PRIMARY KEY,
    endpoint_id uuid NOT NULL REFERENCES crm_webhook_endpoints (id) ON DELETE CASCADE,
    user_account_id uuid NOT NULL,
    attempts int NOT NULL DEFAULT 0,
    last_status int,
    claim_token uuid,
    claimed_until timestamptz,
    accepted_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS crm_webhook_deliveries_endpoint
    ON crm_webhook_deliveries (endpoint_id);
CREATE INDEX IF NOT EXISTS crm_webhook_deliveries_created
    ON crm_webhook_deliveries (created_at);

CREATE OR REPLACE FUNCTION crm_webhook_endpoint_json(e crm_webhook_endpoints) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $fn$
    SELECT jsonb_build_object('id', e.id, 'account', e.user_account_id, 'url', e.url,
                              'secret', e.secret, 'events', to_jsonb(e.events),
                              'created_at', e.created_at);
$fn$;

-- `p_events`: a JSON array of event types, or null for every event.
CREATE OR REPLACE FUNCTION crm_webhook_endpoint_add(
    p_account uuid, p_url text, p_secret text, p_events jsonb
) RETURNS jsonb
LANGUAGE sql AS $fn$
    INSERT INTO crm_webhook_endpoints (user_account_id, url, secret, events)
    VALUES (p_account, p_url, p_secret,
            CASE WHEN p_events IS NULL OR jsonb_typeof(p_events) = 'null' THEN NULL
                 ELSE ARRAY(SELECT jsonb_array_elements_text(p_events)) END)
    RETURNING crm_webhook_endpoint_json(crm_webhook_endpoints);
$fn$;

-- Every endpoint (`p_account` null) or one account's, oldest first.
CREATE OR REPLACE FUNCTION crm_webhook_endpoint_list(p_account uuid) RETURNS jsonb
LANGUAGE sql STABLE AS $fn$
    SELECT COALESCE(jsonb_agg(crm_webhook_endpoint_json(e) ORDER BY e.created_at, e.id), '[]')
    FROM crm_webhook_endpoints e
    WHERE p_account IS NULL OR e.user_account_id = p_account;
$fn$;

CREATE OR REPLACE FUNCTION crm_webhook_endpoint_remove(p_id uuid) RETURNS boolean
LANGUAGE sql AS $fn$
    WITH done AS (DELETE FROM crm_webhook_endpoints WHERE id = p_id RETURNING 1)
    SELECT count(*) > 0 FROM done;
$fn$;

-- The account's endpoints subscribed to an event type.
CREATE OR REPLACE FUNCTION crm_webhook_endpoints_for(p_account uuid, p_type text)
RETURNS jsonb
LANGUAGE sql STABLE AS $fn$
    SELECT COALESCE(jsonb_agg(crm_webhook_endpoint_json(e) ORDER BY e.created_at, e.id), '[]')
    FROM crm_webhook_endpoints e
    WHERE e.user_account_id = p_account AND (e.events IS NULL OR p_type = ANY (e.events));
$fn$;

-- May the caller send this delivery now? {state, endpoint}: `claimed` (a lease of
-- p_lease_seconds is held under p_token; asking again with the same token is `claimed`
-- again), `busy` (another sender holds a lease), `done` (accepted already), `gone` (the
-- endpoint was removed).
CREATE OR REPLACE FUNCTION crm_webhook_claim(
    p_webhook_id text, p_account uuid, p_endpoint uuid, p_token uuid,
    p_lease_seconds double precision
) RETURNS jsonb
LANGUAGE plpgsql AS $fn$
DECLARE
    v_endpoint crm_webhook_endpoints;
    v_claimed boolean;
    v_accepted timestamptz;
BEGIN
    SELECT * INTO v_endpoint FROM crm_webhook_endpoints
    WHERE id = p_endpoint AND user_account_id = p_account;
    IF NOT FOUND THEN
        RETURN jsonb_build_object('state', 'gone');
    END IF;
    INSERT INTO crm_webhook_deliveries AS d
        (webhook_id, endpoint_id, user_account_id, attempts, claim_token, claimed_until)
    VALUES (p_webhook_id, p_endpoint, p_account, 1, p_token,
            clock_timestamp() + make_interval(secs => p_lease_seconds))
    ON CONFLICT (webhook_id) DO UPDATE
        SET attempts = d.attempts + CASE WHEN d.claim_token = p_token THEN 0 ELSE 1 END,
            claim_token = p_token,
            claimed_until = EXCLUDED.claimed_until
        WHERE d.accepted_at IS NULL AND d.user_account_id = p_account
          AND (d.claimed_until IS NULL OR d.claimed_until < clock_timestamp()
               OR d.claim_token = p_token)
    RETURNING true INTO v_claimed;
    IF v_claimed THEN
        RETURN jsonb_build_object('state', 'claimed',
                                  'endpoint', crm_webhook_endpoint_json(v_endpoint));
    END IF;
    SELECT accepted_at INTO v_accepted FROM crm_webhook_deliveries
    WHERE webhook_id = p_webhook_id AND user_account_id = p_account;
    RETURN jsonb_build_object('state', CASE WHEN v_accepted IS NULL THEN 'busy' ELSE 'done' END);
END
$fn$;

-- End an attempt under its lease: accepted (a 2xx) or not; prunes old rows.
CREATE OR REPLACE FUNCTION crm_webhook_finish(
    p_webhook_id text, p_account uuid, p_token uuid, p_accepted boolean, p_status int
) RETURNS boolean
LANGUAGE plpgsql AS $fn$
DECLARE
    v_done boolean;
BEGIN
    UPDATE crm_webhook_deliveries
    SET last_status = p_status, claimed_until = NULL,
        accepted_at = CASE WHEN p_accepted THEN clock_timestamp() ELSE accepted_at END
    WHERE webhook_id = p_webhook_id AND user_account_id = p_account AND claim_token = p_token
    RETURNING true INTO v_done;
    DELETE FROM crm_webhook_deliveries
    WHERE webhook_id IN (SELECT webhook_id FROM crm_webhook_deliveries
                         WHERE created_at < now() - interval '30 days'
                         ORDER BY created_at LIMIT 100);
    RETURN COALESCE(v_done, false);
END
$fn$;

-- Privileges as 0003 sets them (see there): row level security on, nothing for PUBLIC,
-- anon or authenticated, exactly what the store does for service_role (the functions add,
-- read and remove endpoints; insert, update and prune deliveries), pinned search_path.
DO $$
DECLARE
    supabase boolean := EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'service_role');
    f record;
BEGIN
    REVOKE ALL ON TABLE crm_webhook_endpoints FROM PUBLIC;
    REVOKE ALL ON TABLE crm_webhook_deliveries FROM PUBLIC;
    IF supabase THEN
        REVOKE ALL ON TABLE crm_webhook_endpoints FROM anon, authenticated, service_role;
        REVOKE ALL ON TABLE crm_webhook_deliveries FROM anon, authenticated, service_role;
        GRANT SELECT, INSERT, DELETE ON TABLE crm_webhook_endpoints TO service_role;
        GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE crm_webhook_deliveries TO service_role;
        ALTER TABLE crm_webhook_endpoints ENABLE ROW LEVEL SECURITY;
        ALTER TABLE crm_webhook_deliveries ENABLE ROW LEVEL SECURITY;
    END IF;

    FOR f IN
        SELECT p.oid::regprocedure AS signature
        FROM pg_proc p
        WHERE p.pronamespace = current_schema()::regnamespace
          AND p.proname IN ('crm_webhook_endpoint_json', 'crm_webhook_endpoint_add',
                            'crm_webhook_endpoint_list', 'crm_webhook_endpoint_remove',
                            'crm_webhook_endpoints_for', 'crm_webhook_claim',
                            'crm_webhook_finish')
    LOOP
        EXECUTE format('ALTER FUNCTION %s SET search_path = %I, pg_temp',
                       f.signature, current_schema());
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f.signature);
        IF supabase THEN
            EXECUTE format('REVOKE ALL ON FUNCTION %s FROM anon, authenticated',
                           f.signature);
            EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO service_role', f.signature);
        END IF;
    END LOOP;
END
$$;
