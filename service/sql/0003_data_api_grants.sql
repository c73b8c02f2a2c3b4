-- Privileges for Supabase's Data API (PostgREST), which runs every request as the role of
-- the key: `service_role` for this service's key, `anon` for the public key, `authenticated`
-- for a signed-in user.
--
-- Since 2026-10-30 Supabase grants nothing on new tables and functions in `public`, and
-- tables from before keep the old default grants (ALL to anon, authenticated and
-- service_role). So, explicitly:
--   * `service_role` gets exactly what the store does: on dialog_analysis SELECT, INSERT,
--     UPDATE (the write functions lock and update rows), DELETE; on whatsapp_instances
--     SELECT, INSERT, DELETE; EXECUTE on the crm_* functions; nothing on
--     crm_schema_migrations;
--   * `anon`, `authenticated` and PUBLIC get nothing: what old default grants gave them on
--     an upgraded original table is revoked;
--   * row level security is on for every table, new or upgraded (no policies: only
--     `service_role`, which bypasses RLS, and the owner see rows);
--   * each function runs with a pinned search_path (its own schema, then pg_temp).
-- On a database without Supabase's roles (a plain PostgreSQL) only the search_path is
-- pinned and PUBLIC loses EXECUTE. Every statement is re-runnable.
--
-- A later migration file that adds a table or a function does the same for it, in that
-- file (tests/test_supabase_grants.py checks every table and function of the schema).

DO $$
DECLARE
    supabase boolean := EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'service_role');
    t record;
    f record;
BEGIN
    FOR t IN
        SELECT * FROM (VALUES
            ('dialog_analysis', 'SELECT, INSERT, UPDATE, DELETE'),
            ('whatsapp_instances', 'SELECT, INSERT, DELETE'),
            ('crm_schema_migrations', NULL)
        ) AS v(name, privileges)
    LOOP
        EXECUTE format('REVOKE ALL ON TABLE %I FROM PUBLIC', t.name);
        IF supabase THEN
            EXECUTE format('REVOKE ALL ON TABLE %I FROM anon, authenticated, service_role',
                           t.name);
            IF t.privileges IS NOT NULL THEN
                EXECUTE format('GRANT %s ON TABLE %I TO service_role', t.privileges, t.name);
            END IF;
            EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', t.name);
        END IF;
    END LOOP;

    FOR f IN
        SELECT p.oid::regprocedure AS signature
        FROM pg_proc p
        WHERE p.pronamespace = current_schema()::regnamespace
          AND p.proname IN ('crm_upsert_analysis', 'crm_update_lead', 'crm_leads_page',
                            'crm_lead_stats', 'crm_add_instance')
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
