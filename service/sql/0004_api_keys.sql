-- Account-bound API keys, moving an instance's leads, and forgetting a lead's dialog time.
-- Re-runnable: IF NOT EXISTS / CREATE OR REPLACE throughout.

-- One row per key. Only a SHA-256 of the key is stored; `prefix` (the key's first
-- characters) lets `keys list` / `keys revoke` name a key without holding it.
CREATE TABLE IF NOT EXISTS crm_api_keys (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    key_hash text NOT NULL UNIQUE,
    prefix text NOT NULL,
    user_account_id uuid NOT NULL,
    name text,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz
);
CREATE INDEX IF NOT EXISTS crm_api_keys_prefix ON crm_api_keys (prefix);

-- Only the service reads or writes keys: row level security on with no policies, no
-- privileges for Supabase's public roles, explicit ones for service_role (new tables get
-- none there by default).
CREATE OR REPLACE FUNCTION crm_api_key_create(
    p_hash text, p_prefix text, p_account uuid, p_name text
) RETURNS jsonb
LANGUAGE sql AS $fn$
    INSERT INTO crm_api_keys (key_hash, prefix, user_account_id, name)
    VALUES (p_hash, p_prefix, p_account, p_name)
    RETURNING jsonb_build_object('id', id, 'prefix', prefix, 'user_account_id', user_account_id,
                                 'name', name, 'created_at', created_at, 'revoked_at', revoked_at);
$fn$;

CREATE OR REPLACE FUNCTION crm_api_key_list() RETURNS jsonb
LANGUAGE sql STABLE AS $fn$
    SELECT COALESCE(jsonb_agg(jsonb_build_object(
        'id', id, 'prefix', prefix, 'user_account_id', user_account_id, 'name', name,
        'created_at', created_at, 'revoked_at', revoked_at) ORDER BY created_at, id), '[]')
    FROM crm_api_keys;
$fn$;

-- Revoke by id or by prefix; returns how many keys were revoked now.
CREATE OR REPLACE FUNCTION crm_api_key_revoke(p_ref text) RETURNS int
LANGUAGE sql AS $fn$
    WITH done AS (
        UPDATE crm_api_keys SET revoked_at = now()
        WHERE revoked_at IS NULL AND (prefix = p_ref OR id::text = p_ref)
        RETURNING 1
    )
    SELECT count(*)::int FROM done;
$fn$;

CREATE OR REPLACE FUNCTION crm_api_key_account(p_hash text) RETURNS uuid
LANGUAGE sql STABLE AS $fn$
    SELECT user_account_id FROM crm_api_keys WHERE key_hash = p_hash AND revoked_at IS NULL;
$fn$;

-- Map an instance to an account and move its leads there, in one transaction.
CREATE OR REPLACE FUNCTION crm_move_instance(p_instance text, p_account uuid) RETURNS jsonb
LANGUAGE plpgsql AS $fn$
DECLARE
    v_previous uuid;
    v_moved int;
BEGIN
    SELECT user_account_id INTO v_previous FROM whatsapp_instances
    WHERE instance_name = p_instance FOR UPDATE;
    IF FOUND THEN
        UPDATE whatsapp_instances SET user_account_id = p_account, updated_at = now()
        WHERE instance_name = p_instance;
    ELSE
        INSERT INTO whatsapp_instances (instance_name, user_account_id)
        VALUES (p_instance, p_account);
    END IF;
    UPDATE dialog_analysis SET user_account_id = p_account, updated_at = now()
    WHERE instance_name = p_instance AND user_account_id IS DISTINCT FROM p_account;
    GET DIAGNOSTICS v_moved = ROW_COUNT;
    RETURN jsonb_build_object('instance_name', p_instance, 'user_account_id', p_account,
                              'previous_account_id', v_previous, 'moved', v_moved);
END
$fn$;

-- Leads of an instance stored under another account than `p_account`.
CREATE OR REPLACE FUNCTION crm_foreign_leads(p_instance text, p_account uuid) RETURNS int
LANGUAGE sql STABLE AS $fn$
    SELECT count(*)::int FROM dialog_analysis
    WHERE instance_name = p_instance AND user_account_id IS DISTINCT FROM p_account;
$fn$;

-- `backfill --force`: the stored dialog time no longer blocks a rebuild from the dialog
-- (a time from the future would otherwise win over every real message).
CREATE OR REPLACE FUNCTION crm_forget_dialog_time(
    p_account uuid, p_instance text, p_phone text
) RETURNS boolean
LANGUAGE sql AS $fn$
    WITH done AS (
        UPDATE dialog_analysis SET last_message = NULL
        WHERE instance_name = p_instance AND contact_phone = p_phone
          AND user_account_id = p_account
        RETURNING 1
    )
    SELECT count(*) > 0 FROM done;
$fn$;

-- Privileges as 0003 sets them (see there): row level security on, nothing for PUBLIC,
-- anon or authenticated, exactly what the store does for service_role, pinned search_path.
-- `instances move` changes a mapping's account: UPDATE on those two columns only.
DO $$
DECLARE
    supabase boolean := EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'service_role');
    f record;
BEGIN
    REVOKE ALL ON TABLE crm_api_keys FROM PUBLIC;
    IF supabase THEN
        REVOKE ALL ON TABLE crm_api_keys FROM anon, authenticated, service_role;
        GRANT SELECT, INSERT, UPDATE ON TABLE crm_api_keys TO service_role;
        GRANT UPDATE (user_account_id, updated_at) ON TABLE whatsapp_instances TO service_role;
        ALTER TABLE crm_api_keys ENABLE ROW LEVEL SECURITY;
    END IF;

    FOR f IN
        SELECT p.oid::regprocedure AS signature
        FROM pg_proc p
        WHERE p.pronamespace = current_schema()::regnamespace
          AND p.proname IN ('crm_api_key_create', 'crm_api_key_list', 'crm_api_key_revoke',
                            'crm_api_key_account', 'crm_move_instance', 'crm_foreign_leads',
                            'crm_forget_dialog_time')
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
