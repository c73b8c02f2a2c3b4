-- The write rules and list queries as SQL functions, so the direct Postgres store and the
-- Supabase store (PostgREST `rpc`) run exactly the same code. CREATE OR REPLACE makes the
-- file re-runnable.

-- Store one contact's analysis (or `new_lead` refresh), given as an AnalysisWrite JSON.
--   * newer wins: a stored row whose last_message is later than the write's is left alone;
--   * the row is locked while compared, so concurrent writers converge on the newest dialog;
--   * a write for a row owned by another account changes nothing;
--   * `analyzed=false` refreshes identity, counts and times; it sets the new_lead facts only
--     on a row no analysis (and no person) has filled in yet;
--   * columns listed in the row's manual_fields are never overwritten.
-- Returns {applied, id, previous_interest, interest_level}.
CREATE OR REPLACE FUNCTION crm_upsert_analysis(p jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $fn$
DECLARE
    r dialog_analysis;
    o dialog_analysis;
    v_analyzed boolean := COALESCE((p ->> 'analyzed')::boolean, false);
    v_dialog boolean;
    v_facts boolean;
    v_id uuid;
    v_interest text;
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
        INSERT INTO dialog_analysis (
            instance_name, user_account_id, contact_phone, contact_name, remote_jid,
            incoming_count, outgoing_count, first_message, last_message, last_message_id,
            niche, business_type, is_owner, has_sales_dept, uses_ads_now, ad_budget,
            instagram_url, funnel_stage, main_intent, objection, action, next_message,
            reasoning, is_medical, budget_stated, has_booking, sent_instagram,
            qualification_complete, score, interest_level, score_breakdown, messages,
            analyzer, llm_usage, analyzed_at, source, manual_fields, created_at, updated_at
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
            'auto', '{}', now(), now()
        )
        ON CONFLICT (instance_name, contact_phone) DO NOTHING
        RETURNING id INTO v_id;
        IF v_id IS NOT NULL THEN
            RETURN jsonb_build_object('applied', true, 'id', v_id,
                                      'previous_interest', NULL,
                                      'interest_level', r.interest_level);
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
        funnel_stage = CASE WHEN v_facts AND NOT 'funnel_stage' = ANY(d.manual_fields)
                            THEN r.funnel_stage ELSE d.funnel_stage END,
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
    RETURNING d.interest_level INTO v_interest;

    RETURN jsonb_build_object('applied', true, 'id', o.id,
                              'previous_interest', o.interest_level,
                              'interest_level', v_interest);
END
$fn$;


-- Change a lead by hand: `p_changes` (column -> value) are set and their names join
-- manual_fields; `p_derived` (score and what follows from the facts) are set only where
-- no person has set that column. Scoped to the account; no row when not found.
CREATE OR REPLACE FUNCTION crm_update_lead(
    p_account uuid, p_id uuid, p_changes jsonb, p_derived jsonb DEFAULT '{}'::jsonb
) RETURNS SETOF dialog_analysis
LANGUAGE plpgsql AS $fn$
DECLARE
    o dialog_analysis;
    n dialog_analysis;
    v_manual text[];
    v_derived jsonb;
    v_bad text;
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

    v_manual := o.manual_fields || ARRAY(
        SELECT k FROM jsonb_object_keys(COALESCE(p_changes, '{}'::jsonb)) AS k
        WHERE k <> ALL (o.manual_fields) ORDER BY k);
    SELECT COALESCE(jsonb_object_agg(key, value), '{}'::jsonb) INTO v_derived
    FROM jsonb_each(COALESCE(p_derived, '{}'::jsonb))
    WHERE key <> ALL (v_manual);
    n := jsonb_populate_record(o, v_derived || COALESCE(p_changes, '{}'::jsonb));

    RETURN QUERY
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
    RETURNING d.*;
END
$fn$;


-- One page of an account's leads in list order, after the key (score, last_message, id)
-- of the previous page's last row (all NULL: first page). Keyset pagination: each page
-- is an index range scan, however deep into the list it is.
CREATE OR REPLACE FUNCTION crm_leads_page(
    p_account uuid,
    p_instance text DEFAULT NULL,
    p_interest text DEFAULT NULL,
    p_min_score int DEFAULT NULL,
    p_stage text DEFAULT NULL,
    p_qualified boolean DEFAULT NULL,
    p_after_score int DEFAULT NULL,
    p_after_last timestamptz DEFAULT NULL,
    p_after_id uuid DEFAULT NULL,
    p_limit int DEFAULT 1000
) RETURNS SETOF dialog_analysis
LANGUAGE sql STABLE AS $fn$
    SELECT d.*
    FROM dialog_analysis d
    WHERE d.user_account_id = p_account
      AND (p_instance IS NULL OR d.instance_name = p_instance)
      AND (p_interest IS NULL OR d.interest_level = p_interest)
      AND (p_min_score IS NULL OR d.score >= p_min_score)
      AND (p_stage IS NULL OR d.funnel_stage = p_stage)
      AND (p_qualified IS NULL OR (d.qualification_complete IS TRUE) = p_qualified)
      AND (COALESCE(d.score, -1), COALESCE(d.last_message, '-infinity'::timestamptz), d.id)
          < (CASE WHEN p_after_id IS NULL THEN 2147483647 ELSE COALESCE(p_after_score, -1) END,
             CASE WHEN p_after_id IS NULL THEN 'infinity'::timestamptz
                  ELSE COALESCE(p_after_last, '-infinity'::timestamptz) END,
             COALESCE(p_after_id, 'ffffffff-ffff-ffff-ffff-ffffffffffff'::uuid))
    ORDER BY COALESCE(d.score, -1) DESC,
             COALESCE(d.last_message, '-infinity'::timestamptz) DESC,
             d.id DESC
    LIMIT p_limit
$fn$;


-- The stats of GET /dialogs/stats, computed in the database.
CREATE OR REPLACE FUNCTION crm_lead_stats(p_account uuid, p_instance text DEFAULT NULL)
RETURNS jsonb
LANGUAGE sql STABLE AS $fn$
    WITH leads AS (
        SELECT * FROM dialog_analysis
        WHERE user_account_id = p_account
          AND (p_instance IS NULL OR instance_name = p_instance)
    )
    SELECT jsonb_build_object(
        'total', count(*),
        'hot', count(*) FILTER (WHERE interest_level = 'hot'),
        'warm', count(*) FILTER (WHERE interest_level = 'warm'),
        'cold', count(*) FILTER (WHERE interest_level = 'cold'),
        'avgScore', COALESCE(round(avg(score), 1), 0),
        'totalMessages', COALESCE(sum(incoming_count + outgoing_count), 0),
        'new_lead', count(*) FILTER (WHERE funnel_stage = 'new_lead'),
        'not_qualified', count(*) FILTER (WHERE funnel_stage = 'not_qualified'),
        'qualified', count(*) FILTER (WHERE funnel_stage = 'qualified'),
        'consultation_booked', count(*) FILTER (WHERE funnel_stage = 'consultation_booked'),
        'consultation_completed',
            count(*) FILTER (WHERE funnel_stage = 'consultation_completed'),
        'deal_closed', count(*) FILTER (WHERE funnel_stage = 'deal_closed'),
        'deal_lost', count(*) FILTER (WHERE funnel_stage = 'deal_lost'),
        'qualified_count', count(*) FILTER (WHERE qualification_complete IS TRUE),
        'by_niche', COALESCE((
            SELECT jsonb_object_agg(niche, n)
            FROM (SELECT niche, count(*) AS n FROM leads
                  WHERE niche IS NOT NULL GROUP BY niche) AS per_niche
        ), '{}'::jsonb),
        'analyzed_last_24h',
            count(*) FILTER (WHERE analyzed_at >= now() - interval '24 hours')
    )
    FROM leads
$fn$;


-- Map an instance to an account (idempotent). Returns the stored mapping: when another
-- account holds the instance already, that mapping is returned unchanged.
CREATE OR REPLACE FUNCTION crm_add_instance(p_instance text, p_account uuid) RETURNS jsonb
LANGUAGE plpgsql AS $fn$
DECLARE
    v jsonb;
BEGIN
    INSERT INTO whatsapp_instances (instance_name, user_account_id)
    VALUES (p_instance, p_account)
    ON CONFLICT (instance_name) DO NOTHING;
    SELECT jsonb_build_object('instance_name', instance_name,
                              'user_account_id', user_account_id,
                              'created_at', created_at)
    INTO v
    FROM whatsapp_instances WHERE instance_name = p_instance;
    RETURN v;
END
$fn$;


-- Only the service may call these: not the public `anon`/`authenticated` roles Supabase
-- grants new functions to by default.
DO $$
DECLARE
    f text;
    r text;
BEGIN
    FOREACH f IN ARRAY ARRAY[
        'crm_upsert_analysis(jsonb)',
        'crm_update_lead(uuid, uuid, jsonb, jsonb)',
        'crm_leads_page(uuid, text, text, int, text, boolean, int, timestamptz, uuid, int)',
        'crm_lead_stats(uuid, text)',
        'crm_add_instance(text, uuid)'
    ] LOOP
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', f);
        FOREACH r IN ARRAY ARRAY['anon', 'authenticated'] LOOP
            IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r) THEN
                EXECUTE format('REVOKE ALL ON FUNCTION %s FROM %I', f, r);
            END IF;
        END LOOP;
        IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'service_role') THEN
            EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO service_role', f);
        END IF;
    END LOOP;
END
$$;
