-- A lead's history (every change of funnel_stage, score and interest_level, with its
-- cause), the events those changes raise (an outbox, published by the consume processes),
-- and the funnel report computed from the history.
--
-- The write functions of 0002 are redefined here: each records its changes and events in
-- the same transaction as the change itself, so every path (consumer, backfill,
-- POST /dialogs/analyze, manual edits) and both stores (they call these same functions)
-- record each transition exactly once. Re-runnable: IF NOT EXISTS / CREATE OR REPLACE.

-- When the stage last changed (NULL: not since the history exists).
ALTER TABLE dialog_analysis ADD COLUMN IF NOT EXISTS stage_changed_at timestamptz;

-- One row per changed field per write. `from_value`/`to_value` are JSON (a score stays a
-- number); `cause` is {kind: analysis|manual|delete, analyzer, model, key}. Deleted with
-- the lead; an instance moved to another account takes its leads' history with it (the
-- account is the lead's, never copied here).
CREATE TABLE IF NOT EXISTS crm_lead_history (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    lead_id uuid NOT NULL REFERENCES dialog_analysis (id) ON DELETE CASCADE,
    changed_at timestamptz NOT NULL,
    field text NOT NULL CHECK (field IN ('funnel_stage', 'score', 'interest_level')),
    from_value jsonb,
    to_value jsonb,
    cause jsonb NOT NULL
);
CREATE INDEX IF NOT EXISTS crm_lead_history_lead
    ON crm_lead_history (lead_id, changed_at DESC, id DESC);

-- Events decided by the write functions, waiting to be published. `body` is the event
-- exactly as delivered; `id` its stable AMQP message_id. A consume process claims rows
-- (a lease: `claimed_until`), publishes them with confirms and marks them published; a
-- process that dies in between leaves them to the next claim once the lease ends.
CREATE TABLE IF NOT EXISTS crm_outbox (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    seq bigint GENERATED ALWAYS AS IDENTITY,
    event_type text NOT NULL,
    body jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    claimed_until timestamptz,
    published_at timestamptz
);
CREATE INDEX IF NOT EXISTS crm_outbox_pending ON crm_outbox (seq) WHERE published_at IS NULL;
CREATE INDEX IF NOT EXISTS crm_outbox_published
    ON crm_outbox (published_at) WHERE published_at IS NOT NULL;


-- The cause as stored and sent: exactly its four keys.
CREATE OR REPLACE FUNCTION crm_cause(p jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $fn$
    SELECT jsonb_build_object(
        'kind', CASE WHEN p ->> 'kind' IN ('analysis', 'manual', 'delete') THEN p ->> 'kind'
                     ELSE 'analysis' END,
        'analyzer', p ->> 'analyzer',
        'model', p ->> 'model',
        'key', p ->> 'key');
$fn$;


-- Record what one write changed (`o`: the row before, NULL for a new row; `n`: after):
-- a history row per changed field and, unless `p_notify` is false, the events:
-- `lead.stage_changed` when the stage changed (a new lead's first stage included) and
-- `lead.hot` when the interest level became hot.
CREATE OR REPLACE FUNCTION crm_record_changes(
    o dialog_analysis, n dialog_analysis, p_cause jsonb, p_notify boolean, p_at timestamptz
) RETURNS void
LANGUAGE plpgsql AS $fn$
DECLARE
    v_cause jsonb := crm_cause(p_cause);
    v_data jsonb;
BEGIN
    -- Most writes change none of the three (a new message, same result): nothing to do.
    IF o.funnel_stage IS NOT DISTINCT FROM n.funnel_stage
       AND o.score IS NOT DISTINCT FROM n.score
       AND o.interest_level IS NOT DISTINCT FROM n.interest_level THEN
        RETURN;
    END IF;
    INSERT INTO crm_lead_history (lead_id, changed_at, field, from_value, to_value, cause)
    SELECT n.id, p_at, f.field, f.old, f.new, v_cause
    FROM (VALUES
        (1, 'funnel_stage', to_jsonb(o.funnel_stage), to_jsonb(n.funnel_stage)),
        (2, 'score', to_jsonb(o.score), to_jsonb(n.score)),
        (3, 'interest_level', to_jsonb(o.interest_level), to_jsonb(n.interest_level))
    ) AS f(ord, field, old, new)
    WHERE f.old IS DISTINCT FROM f.new
    ORDER BY f.ord;

    IF NOT COALESCE(p_notify, true) THEN
        RETURN;
    END IF;
    v_data := jsonb_build_object(
        'lead_id', n.id,
        'account', n.user_account_id,
        'instance', n.instance_name,
        'contact', n.contact_phone,
        'contact_name', n.contact_name,
        'score', n.score,
        'interest_level', n.interest_level,
        'from_stage', o.funnel_stage,
        'to_stage', n.funnel_stage,
        'cause', v_cause);
    INSERT INTO crm_outbox (event_type, body)
    SELECT e.kind,
           jsonb_build_object(
               'type', e.kind,
               'timestamp', to_char(p_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
               'data', v_data)
    FROM (VALUES
        (1, 'lead.stage_changed', o.funnel_stage IS DISTINCT FROM n.funnel_stage),
        (2, 'lead.hot', n.interest_level IS NOT DISTINCT FROM 'hot'
                        AND o.interest_level IS DISTINCT FROM 'hot')
    ) AS e(ord, kind, due)
    WHERE e.due
    ORDER BY e.ord;
END
$fn$;


-- Store one contact's analysis (or `new_lead` refresh), given as an AnalysisWrite JSON.
-- The rules of 0002 (newer wins, row locked while compared, account-scoped, new_lead facts
-- never replace an analysis, manual_fields kept), plus: the changes of stage, score and
-- interest are recorded with `p.cause`, and their events unless `p.notify` is false.
-- Returns {applied, id, previous_interest, interest_level}.
CREATE OR REPLACE FUNCTION crm_upsert_analysis(p jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $fn$
DECLARE
    r dialog_analysis;
    o dialog_analysis;
    n dialog_analysis;
    v_analyzed boolean := COALESCE((p ->> 'analyzed')::boolean, false);
    v_notify boolean := COALESCE((p ->> 'notify')::boolean, true);
    v_cause jsonb := COALESCE(p -> 'cause', '{}'::jsonb);
    v_dialog boolean;
    v_facts boolean;
    v_stage text;
    v_at timestamptz;
BEGIN
    r := jsonb_populate_record(NULL::dialog_analysis, p);
    IF r.instance_name IS NULL OR r.contact_phone IS NULL OR r.user_account_id IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = 'instance_name, contact_phone and user_account_id are required';
    END IF;

    LOOP
        SELECT * INTO o FROM dialog_analysis
        WHERE instance_name = r.instance_name AND contact_phone = r.contact_phone
        FOR UPDATE;
        EXIT WHEN FOUND;
        -- Taken once the row is ours: a history in write order, even across transactions.
        v_at := clock_timestamp();
        INSERT INTO dialog_analysis (
            instance_name, user_account_id, contact_phone, contact_name, remote_jid,
            incoming_count, outgoing_count, first_message, last_message, last_message_id,
            niche, business_type, is_owner, has_sales_dept, uses_ads_now, ad_budget,
            instagram_url, funnel_stage, main_intent, objection, action, next_message,
            reasoning, is_medical, budget_stated, has_booking, sent_instagram,
            qualification_complete, score, interest_level, score_breakdown, messages,
            analyzer, llm_usage, analyzed_at, source, manual_fields, created_at, updated_at,
            stage_changed_at
        ) VALUES (
            r.instance_name, r.user_account_id, r.contact_phone, r.contact_name, r.remote_jid,
            COALESCE(r.incoming_count, 0), COALESCE(r.outgoing_count, 0), r.first_message,
            r.last_message, r.last_message_id,
            r.niche, r.business_type, r.is_owner, r.has_sales_dept, r.uses_ads_now, r.ad_budget,
            r.instagram_url, r.funnel_stage, r.main_intent, r.objection, r.action,
            COALESCE(r.next_message, ''),
            r.reasoning, r.is_medical, r.budget_stated, r.has_booking, r.sent_instagram,
            r.qualification_complete, r.score, r.interest_level, r.score_breakdown, r.messages,
            CASE WHEN v_analyzed THEN COALESCE(r.analyzer, 'unknown') END,
            CASE WHEN v_analyzed THEN r.llm_usage END,
            CASE WHEN v_analyzed THEN now() END,
            'auto', '{}', now(), now(),
            CASE WHEN r.funnel_stage IS NOT NULL THEN v_at END
        )
        ON CONFLICT (instance_name, contact_phone) DO NOTHING
        RETURNING * INTO n;
        IF n.id IS NOT NULL THEN
            PERFORM crm_record_changes(NULL, n, v_cause, v_notify, v_at);
            RETURN jsonb_build_object('applied', true, 'id', n.id,
                                      'previous_interest', NULL,
                                      'interest_level', n.interest_level);
        END IF;
        -- Another writer inserted the row meanwhile: go round, lock it and compare.
    END LOOP;

    IF o.user_account_id IS DISTINCT FROM r.user_account_id THEN
        RETURN jsonb_build_object('applied', false, 'id', NULL,
                                  'previous_interest', NULL, 'interest_level', NULL);
    END IF;

    IF o.last_message IS NOT NULL
       AND (r.last_message IS NULL OR o.last_message > r.last_message) THEN
        RETURN jsonb_build_object('applied', false, 'id', o.id,
                                  'previous_interest', o.interest_level,
                                  'interest_level', o.interest_level);
    END IF;

    -- The stored dialog is replaced by an analysis, or while the row has none yet.
    v_dialog := v_analyzed OR o.analyzer IS NULL OR o.analyzed_at IS NULL;
    -- new_lead facts never replace an analysis, nor a row a person has edited.
    v_facts := v_analyzed
        OR (v_dialog AND o.source = 'auto' AND cardinality(o.manual_fields) = 0);

    IF NOT v_analyzed AND NOT v_dialog
       AND o.last_message IS NOT DISTINCT FROM r.last_message
       AND o.last_message_id IS NOT DISTINCT FROM r.last_message_id THEN
        RETURN jsonb_build_object('applied', false, 'id', o.id,
                                  'previous_interest', o.interest_level,
                                  'interest_level', o.interest_level);
    END IF;

    v_at := clock_timestamp();
    v_stage := CASE WHEN v_facts AND NOT 'funnel_stage' = ANY(o.manual_fields)
                    THEN r.funnel_stage ELSE o.funnel_stage END;

    UPDATE dialog_analysis d SET
        contact_name = CASE WHEN 'contact_name' = ANY(d.manual_fields) THEN d.contact_name
                            ELSE COALESCE(r.contact_name, d.contact_name) END,
        remote_jid = COALESCE(r.remote_jid, d.remote_jid),
        incoming_count = COALESCE(r.incoming_count, d.incoming_count),
        outgoing_count = COALESCE(r.outgoing_count, d.outgoing_count),
        first_message = COALESCE(r.first_message, d.first_message),
        last_message = r.last_message,
        last_message_id = r.last_message_id,
        messages = CASE WHEN v_dialog THEN r.messages ELSE d.messages END,
        niche = CASE WHEN v_facts AND NOT 'niche' = ANY(d.manual_fields)
                     THEN r.niche ELSE d.niche END,
        business_type = CASE WHEN v_facts AND NOT 'business_type' = ANY(d.manual_fields)
                             THEN r.business_type ELSE d.business_type END,
        is_owner = CASE WHEN v_facts AND NOT 'is_owner' = ANY(d.manual_fields)
                        THEN r.is_owner ELSE d.is_owner END,
        has_sales_dept = CASE WHEN v_facts AND NOT 'has_sales_dept' = ANY(d.manual_fields)
                              THEN r.has_sales_dept ELSE d.has_sales_dept END,
        uses_ads_now = CASE WHEN v_facts AND NOT 'uses_ads_now' = ANY(d.manual_fields)
                            THEN r.uses_ads_now ELSE d.uses_ads_now END,
        ad_budget = CASE WHEN v_facts AND NOT 'ad_budget' = ANY(d.manual_fields)
                         THEN r.ad_budget ELSE d.ad_budget END,
        instagram_url = CASE WHEN v_facts AND NOT 'instagram_url' = ANY(d.manual_fields)
                             THEN r.instagram_url ELSE d.instagram_url END,
        funnel_stage = v_stage,
        stage_changed_at = CASE WHEN v_stage IS DISTINCT FROM d.funnel_stage THEN v_at
                                ELSE d.stage_changed_at END,
        main_intent = CASE WHEN v_facts AND NOT 'main_intent' = ANY(d.manual_fields)
                           THEN r.main_intent ELSE d.main_intent END,
        objection = CASE WHEN v_facts AND NOT 'objection' = ANY(d.manual_fields)
                         THEN r.objection ELSE d.objection END,
        action = CASE WHEN v_facts AND NOT 'action' = ANY(d.manual_fields)
                      THEN r.action ELSE d.action END,
        next_message = CASE WHEN v_facts AND NOT 'next_message' = ANY(d.manual_fields)
                            THEN COALESCE(r.next_message, '') ELSE d.next_message END,
        is_medical = CASE WHEN v_facts AND NOT 'is_medical' = ANY(d.manual_fields)
                          THEN r.is_medical ELSE d.is_medical END,
        has_booking = CASE WHEN v_facts AND NOT 'has_booking' = ANY(d.manual_fields)
                           THEN r.has_booking ELSE d.has_booking END,
        sent_instagram = CASE WHEN v_facts AND NOT 'sent_instagram' = ANY(d.manual_fields)
                              THEN r.sent_instagram ELSE d.sent_instagram END,
        score = CASE WHEN v_facts AND NOT 'score' = ANY(d.manual_fields)
                     THEN r.score ELSE d.score END,
        interest_level = CASE WHEN v_facts AND NOT 'interest_level' = ANY(d.manual_fields)
                              THEN r.interest_level ELSE d.interest_level END,
        reasoning = CASE WHEN v_facts THEN r.reasoning ELSE d.reasoning END,
        budget_stated = CASE WHEN v_facts THEN r.budget_stated ELSE d.budget_stated END,
        qualification_complete = CASE WHEN v_facts THEN r.qualification_complete
                                      ELSE d.qualification_complete END,
        score_breakdown = CASE WHEN v_facts THEN r.score_breakdown ELSE d.score_breakdown END,
        analyzer = CASE WHEN v_analyzed THEN COALESCE(r.analyzer, 'unknown')
                        ELSE d.analyzer END,
        llm_usage = CASE WHEN v_analyzed THEN r.llm_usage ELSE d.llm_usage END,
        analyzed_at = CASE WHEN v_analyzed THEN now() ELSE d.analyzed_at END,
        updated_at = now()
    WHERE d.id = o.id
    RETURNING d.* INTO n;

    PERFORM crm_record_changes(o, n, v_cause, v_notify, v_at);
    RETURN jsonb_build_object('applied', true, 'id', o.id,
                              'previous_interest', o.interest_level,
                              'interest_level', n.interest_level);
END
$fn$;


-- Change a lead by hand (the rules of 0002), recording the changes with `p_cause` (a
-- manual cause naming the credential) and their events unless `p_notify` is false.
-- The old four-argument form is dropped: a call with four arguments resolves to this one.
DROP FUNCTION IF EXISTS crm_update_lead(uuid, uuid, jsonb, jsonb);
CREATE OR REPLACE FUNCTION crm_update_lead(
    p_account uuid, p_id uuid, p_changes jsonb, p_derived jsonb DEFAULT '{}'::jsonb,
    p_cause jsonb DEFAULT NULL, p_notify boolean DEFAULT true
) RETURNS SETOF dialog_analysis
LANGUAGE plpgsql AS $fn$
DECLARE
    o dialog_analysis;
    n dialog_analysis;
    v_manual text[];
    v_derived jsonb;
    v_bad text;
    v_at timestamptz;
BEGIN
    SELECT k INTO v_bad FROM jsonb_object_keys(COALESCE(p_changes, '{}'::jsonb)) AS k
    WHERE k <> ALL (ARRAY[
        'contact_name', 'business_type', 'niche', 'is_medical', 'is_owner', 'has_sales_dept',
        'uses_ads_now', 'ad_budget', 'sent_instagram', 'instagram_url', 'has_booking',
        'funnel_stage', 'interest_level', 'main_intent', 'objection', 'next_message',
        'action', 'notes', 'score'])
    LIMIT 1;
    IF v_bad IS NULL THEN
        SELECT k INTO v_bad FROM jsonb_object_keys(COALESCE(p_derived, '{}'::jsonb)) AS k
        WHERE k <> ALL (ARRAY[
            'score', 'interest_level', 'score_breakdown', 'is_medical', 'budget_stated',
            'has_booking', 'sent_instagram', 'qualification_complete'])
        LIMIT 1;
    END IF;
    IF v_bad IS NOT NULL THEN
        RAISE EXCEPTION USING ERRCODE = '22023',
            MESSAGE = format('column %s cannot be changed by hand', v_bad);
    END IF;

    SELECT * INTO o FROM dialog_analysis
    WHERE id = p_id AND user_account_id = p_account
    FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    v_at := clock_timestamp();

    v_manual := o.manual_fields || ARRAY(
        SELECT k FROM jsonb_object_keys(COALESCE(p_changes, '{}'::jsonb)) AS k
        WHERE k <> ALL (o.manual_fields) ORDER BY k);
    SELECT COALESCE(jsonb_object_agg(key, value), '{}'::jsonb) INTO v_derived
    FROM jsonb_each(COALESCE(p_derived, '{}'::jsonb))
    WHERE key <> ALL (v_manual);
    n := jsonb_populate_record(o, v_derived || COALESCE(p_changes, '{}'::jsonb));

    UPDATE dialog_analysis d SET
        contact_name = n.contact_name,
        business_type = n.business_type,
        niche = n.niche,
        is_medical = n.is_medical,
        is_owner = n.is_owner,
        has_sales_dept = n.has_sales_dept,
        uses_ads_now = n.uses_ads_now,
        ad_budget = n.ad_budget,
        sent_instagram = n.sent_instagram,
        instagram_url = n.instagram_url,
        has_booking = n.has_booking,
        funnel_stage = n.funnel_stage,
        stage_changed_at = CASE WHEN n.funnel_stage IS DISTINCT FROM d.funnel_stage THEN v_at
                                ELSE d.stage_changed_at END,
        interest_level = n.interest_level,
        main_intent = n.main_intent,
        objection = n.objection,
        next_message = COALESCE(n.next_message, ''),
        action = n.action,
        notes = n.notes,
        score = n.score,
        score_breakdown = n.score_breakdown,
        budget_stated = n.budget_stated,
        qualification_complete = n.qualification_complete,
        manual_fields = v_manual,
        updated_at = now()
    WHERE d.id = o.id
    RETURNING d.* INTO n;

    PERFORM crm_record_changes(o, n, COALESCE(p_cause, '{"kind": "manual"}'::jsonb),
                               p_notify, v_at);
    RETURN NEXT n;
END
$fn$;


-- Create a lead by hand: `p_row` holds its columns (as `creation_values` gives them);
-- created_at and updated_at are the database's. Its first stage, score and interest are
-- recorded with `p_cause`, with their events unless `p_notify` is false. A lead for the
-- same instance and phone: unique_violation (23505).
CREATE OR REPLACE FUNCTION crm_create_lead(
    p_row jsonb, p_cause jsonb DEFAULT NULL, p_notify boolean DEFAULT true
) RETURNS SETOF dialog_analysis
LANGUAGE plpgsql AS $fn$
DECLARE
    n dialog_analysis;
    v_at timestamptz := clock_timestamp();
BEGIN
    n := jsonb_populate_record(NULL::dialog_analysis, p_row);
    n.id := COALESCE(n.id, gen_random_uuid());
    n.incoming_count := COALESCE(n.incoming_count, 0);
    n.outgoing_count := COALESCE(n.outgoing_count, 0);
    n.next_message := COALESCE(n.next_message, '');
    n.source := 'manual';
    n.manual_fields := COALESCE(n.manual_fields, '{}');
    n.created_at := now();
    n.updated_at := now();
    n.stage_changed_at := CASE WHEN n.funnel_stage IS NOT NULL THEN v_at END;
    INSERT INTO dialog_analysis SELECT (n).* RETURNING * INTO n;
    PERFORM crm_record_changes(NULL, n, COALESCE(p_cause, '{"kind": "manual"}'::jsonb),
                               p_notify, v_at);
    RETURN NEXT n;
END
$fn$;


-- One page of a lead's history, newest first: {"history": [...], "count": N}; NULL when
-- the lead is not the account's.
CREATE OR REPLACE FUNCTION crm_lead_history_page(
    p_account uuid, p_id uuid, p_limit int DEFAULT 100, p_offset int DEFAULT 0
) RETURNS jsonb
LANGUAGE sql STABLE AS $fn$
    SELECT jsonb_build_object(
        'count', (SELECT count(*) FROM crm_lead_history h WHERE h.lead_id = d.id),
        'history', COALESCE((
            SELECT jsonb_agg(jsonb_build_object(
                       'changed_at', page.changed_at, 'field', page.field,
                       'from', page.from_value, 'to', page.to_value, 'cause', page.cause)
                   ORDER BY page.changed_at DESC, page.id DESC)
            FROM (SELECT * FROM crm_lead_history h
                  WHERE h.lead_id = d.id
                  ORDER BY h.changed_at DESC, h.id DESC
                  LIMIT GREATEST(p_limit, 0) OFFSET GREATEST(p_offset, 0)) AS page
        ), '[]'::jsonb))
    FROM dialog_analysis d
    WHERE d.id = p_id AND d.user_account_id = p_account;
$fn$;


-- The funnel of an account's leads (optionally one instance) in [p_since, p_until), from
-- the stage history; `p_stages` is the funnel order (service/domain). Per stage:
--   entered          leads whose stage became it in the period (a lead's first stage too);
--   moved_to         of those, how many later (before p_until) reached each later stage;
--   median_hours_to  the median hours from entering the stage to first reaching that one.
-- A lead counts once per stage: its first entry in the period.
CREATE OR REPLACE FUNCTION crm_funnel(
    p_account uuid, p_since timestamptz, p_until timestamptz, p_instance text,
    p_stages text[]
) RETURNS jsonb
LANGUAGE sql STABLE AS $fn$
    WITH entries AS (
        SELECT h.lead_id, h.to_value #>> '{}' AS stage, h.changed_at AS at,
               array_position(p_stages, h.to_value #>> '{}') AS pos
        FROM crm_lead_history h
        JOIN dialog_analysis d ON d.id = h.lead_id
        WHERE d.user_account_id = p_account
          AND (p_instance IS NULL OR d.instance_name = p_instance)
          AND h.field = 'funnel_stage' AND h.to_value IS NOT NULL
          AND h.changed_at < p_until
    ),
    entered AS (
        SELECT lead_id, stage, pos, min(at) AS at
        FROM entries
        WHERE at >= p_since AND pos IS NOT NULL
        GROUP BY lead_id, stage, pos
    ),
    onward AS (
        SELECT e.stage, x.stage AS next_stage,
               extract(epoch FROM min(x.at) - e.at) / 3600.0 AS hours
        FROM entered e
        JOIN entries x ON x.lead_id = e.lead_id AND x.at > e.at AND x.pos > e.pos
        GROUP BY e.stage, x.stage, e.lead_id, e.at
    ),
    stages AS (
        SELECT stage, pos FROM unnest(p_stages) WITH ORDINALITY AS s(stage, pos)
    )
    SELECT COALESCE(jsonb_object_agg(s.stage, jsonb_build_object(
        'entered', (SELECT count(*) FROM entered e WHERE e.stage = s.stage),
        'moved_to', (
            SELECT COALESCE(jsonb_object_agg(later.stage, (
                       SELECT count(*) FROM onward w
                       WHERE w.stage = s.stage AND w.next_stage = later.stage)), '{}'::jsonb)
            FROM stages later WHERE later.pos > s.pos),
        'median_hours_to', (
            SELECT COALESCE(jsonb_object_agg(m.next_stage, m.median), '{}'::jsonb)
            FROM (SELECT w.next_stage,
                         round((percentile_cont(0.5) WITHIN GROUP (ORDER BY w.hours))::numeric,
                               2) AS median
                  FROM onward w WHERE w.stage = s.stage
                  GROUP BY w.next_stage) AS m)
    )), '{}'::jsonb)
    FROM stages s;
$fn$;


-- Claim up to `p_limit` unpublished events for `p_lease_seconds` (rows another process
-- holds are skipped, never waited for), oldest first: [{id, type, body}].
CREATE OR REPLACE FUNCTION crm_outbox_claim(
    p_limit int DEFAULT 100, p_lease_seconds double precision DEFAULT 60
) RETURNS jsonb
LANGUAGE sql AS $fn$
    WITH picked AS (
        SELECT o.id FROM crm_outbox o
        WHERE o.published_at IS NULL
          AND (o.claimed_until IS NULL OR o.claimed_until < clock_timestamp())
        ORDER BY o.seq
        LIMIT GREATEST(p_limit, 0)
        FOR UPDATE SKIP LOCKED
    ),
    claimed AS (
        UPDATE crm_outbox o
        SET claimed_until = clock_timestamp() + make_interval(secs => p_lease_seconds)
        FROM picked
        WHERE o.id = picked.id
        RETURNING o.id, o.seq, o.event_type, o.body
    )
    SELECT COALESCE(jsonb_agg(jsonb_build_object('id', id, 'type', event_type, 'body', body)
                              ORDER BY seq), '[]'::jsonb)
    FROM claimed;
$fn$;

-- Mark events published (returns how many were marked now); published rows are kept a
-- day, then removed a batch at a time.
CREATE OR REPLACE FUNCTION crm_outbox_done(p_ids uuid[]) RETURNS int
LANGUAGE plpgsql AS $fn$
DECLARE
    v_marked int;
BEGIN
    UPDATE crm_outbox SET published_at = now(), claimed_until = NULL
    WHERE id = ANY(p_ids) AND published_at IS NULL;
    GET DIAGNOSTICS v_marked = ROW_COUNT;
    DELETE FROM crm_outbox WHERE id IN (
        SELECT id FROM crm_outbox WHERE published_at < now() - interval '1 day' LIMIT 1000);
    RETURN v_marked;
END
$fn$;

-- Give claimed events back at once (their publish failed): the next claim takes them.
CREATE OR REPLACE FUNCTION crm_outbox_release(p_ids uuid[]) RETURNS int
LANGUAGE sql AS $fn$
    WITH done AS (
        UPDATE crm_outbox SET claimed_until = NULL
        WHERE id = ANY(p_ids) AND published_at IS NULL
        RETURNING 1
    )
    SELECT count(*)::int FROM done;
$fn$;

-- Events not published yet.
CREATE OR REPLACE FUNCTION crm_outbox_depth() RETURNS bigint
LANGUAGE sql STABLE AS $fn$
    SELECT count(*) FROM crm_outbox WHERE published_at IS NULL;
$fn$;

-- Privileges as 0003 sets them (see there): row level security on, nothing for PUBLIC,
-- anon or authenticated, exactly what the functions do for service_role (history: insert
-- and read, its rows removed with their lead by the foreign key; outbox: insert, claim,
-- mark, purge), pinned search_path.
DO $$
DECLARE
    supabase boolean := EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'service_role');
    f record;
BEGIN
    REVOKE ALL ON TABLE crm_lead_history FROM PUBLIC;
    REVOKE ALL ON TABLE crm_outbox FROM PUBLIC;
    IF supabase THEN
        REVOKE ALL ON TABLE crm_lead_history FROM anon, authenticated, service_role;
        REVOKE ALL ON TABLE crm_outbox FROM anon, authenticated, service_role;
        GRANT SELECT, INSERT ON TABLE crm_lead_history TO service_role;
        GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE crm_outbox TO service_role;
        ALTER TABLE crm_lead_history ENABLE ROW LEVEL SECURITY;
        ALTER TABLE crm_outbox ENABLE ROW LEVEL SECURITY;
    END IF;

    FOR f IN
        SELECT p.oid::regprocedure AS signature
        FROM pg_proc p
        WHERE p.pronamespace = current_schema()::regnamespace
          AND p.proname IN ('crm_cause', 'crm_record_changes', 'crm_upsert_analysis',
                            'crm_update_lead', 'crm_create_lead', 'crm_lead_history_page',
                            'crm_funnel', 'crm_outbox_claim', 'crm_outbox_done',
                            'crm_outbox_release', 'crm_outbox_depth')
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
