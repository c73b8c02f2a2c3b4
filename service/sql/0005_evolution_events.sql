-- What only Evolution's events tell: messages deleted for everyone, and LID↔phone pairs.
-- Re-runnable: IF NOT EXISTS / CREATE OR REPLACE throughout.

-- Deletes seen through `messages.delete` events. From Evolution 2.3.7 on, a revoke leaves
-- in Evolution's DB only a status-less ("SERVER_ACK") "MessageUpdate" row, which on the
-- business's own messages reads exactly like an acknowledgement: this record is what keeps
-- such a message out of every later read of the dialog (re-analysis and backfill alike).
-- `remote_jid` is the contact's phone JID the message was counted under.
CREATE TABLE IF NOT EXISTS crm_deleted_messages (
    user_account_id uuid NOT NULL,
    instance_name text NOT NULL,
    remote_jid text NOT NULL,
    message_id text NOT NULL,
    seen_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_account_id, instance_name, remote_jid, message_id)
);

-- LID↔phone pairs seen in events, shared by every consumer process (Evolution's DB may
-- hold no message that carried both).
CREATE TABLE IF NOT EXISTS crm_lid_pairs (
    user_account_id uuid NOT NULL,
    instance_name text NOT NULL,
    lid text NOT NULL,
    phone_jid text NOT NULL,
    seen_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_account_id, instance_name, lid)
);

-- Record deletes (`p_ids`: WhatsApp message ids) of one contact; returns how many are new.
CREATE OR REPLACE FUNCTION crm_record_deletes(
    p_account uuid, p_instance text, p_remote_jid text, p_ids text[]
) RETURNS int
LANGUAGE sql AS $fn$
    WITH added AS (
        INSERT INTO crm_deleted_messages (user_account_id, instance_name, remote_jid, message_id)
        SELECT p_account, p_instance, p_remote_jid, id FROM unnest(p_ids) AS id
        ON CONFLICT DO NOTHING
        RETURNING 1
    )
    SELECT count(*)::int FROM added;
$fn$;

-- The recorded deletes of one contact.
CREATE OR REPLACE FUNCTION crm_deleted_ids(
    p_account uuid, p_instance text, p_remote_jid text
) RETURNS text[]
LANGUAGE sql STABLE AS $fn$
    SELECT COALESCE(array_agg(message_id ORDER BY message_id), '{}')
    FROM crm_deleted_messages
    WHERE user_account_id = p_account AND instance_name = p_instance
      AND remote_jid = p_remote_jid;
$fn$;

-- Remember a pair under the account the instance is mapped to (none: nothing stored).
CREATE OR REPLACE FUNCTION crm_remember_lid(p_instance text, p_lid text, p_phone text)
RETURNS boolean
LANGUAGE sql AS $fn$
    WITH added AS (
        INSERT INTO crm_lid_pairs (user_account_id, instance_name, lid, phone_jid)
        SELECT w.user_account_id, p_instance, p_lid, p_phone
        FROM whatsapp_instances w WHERE w.instance_name = p_instance
        ON CONFLICT (user_account_id, instance_name, lid)
            DO UPDATE SET phone_jid = EXCLUDED.phone_jid, seen_at = now()
            WHERE crm_lid_pairs.phone_jid IS DISTINCT FROM EXCLUDED.phone_jid
        RETURNING 1
    )
    SELECT count(*) > 0 FROM added;
$fn$;

-- A LID's phone JID, as remembered for the instance's current account.
CREATE OR REPLACE FUNCTION crm_lid_phone(p_instance text, p_lid text) RETURNS text
LANGUAGE sql STABLE AS $fn$
    SELECT p.phone_jid
    FROM crm_lid_pairs p JOIN whatsapp_instances w
      ON w.instance_name = p.instance_name AND w.user_account_id = p.user_account_id
    WHERE p.instance_name = p_instance AND p.lid = p_lid
    LIMIT 1;
$fn$;

-- Privileges as 0003 sets them (see there): row level security on, nothing for PUBLIC,
-- anon or authenticated, exactly what the store does for service_role (the functions
-- insert, read, and update a changed pair), pinned search_path.
DO $$
DECLARE
    supabase boolean := EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'service_role');
    f record;
BEGIN
    REVOKE ALL ON TABLE crm_deleted_messages FROM PUBLIC;
    REVOKE ALL ON TABLE crm_lid_pairs FROM PUBLIC;
    IF supabase THEN
        REVOKE ALL ON TABLE crm_deleted_messages FROM anon, authenticated, service_role;
        REVOKE ALL ON TABLE crm_lid_pairs FROM anon, authenticated, service_role;
        GRANT SELECT, INSERT ON TABLE crm_deleted_messages TO service_role;
        GRANT SELECT, INSERT, UPDATE ON TABLE crm_lid_pairs TO service_role;
        ALTER TABLE crm_deleted_messages ENABLE ROW LEVEL SECURITY;
        ALTER TABLE crm_lid_pairs ENABLE ROW LEVEL SECURITY;
    END IF;

    FOR f IN
        SELECT p.oid::regprocedure AS signature
        FROM pg_proc p
        WHERE p.pronamespace = current_schema()::regnamespace
          AND p.proname IN ('crm_record_deletes', 'crm_deleted_ids', 'crm_remember_lid',
                            'crm_lid_phone')
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
