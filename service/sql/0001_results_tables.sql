-- Results tables: the original service's `dialog_analysis` and `whatsapp_instances`,
-- created where absent and upgraded in place where present.
--
-- Every statement checks what exists before it changes anything, so this file can be run
-- again (e.g. pasted twice into Supabase's SQL editor) and never drops or rewrites rows.

CREATE TABLE IF NOT EXISTS crm_schema_migrations (
    version text PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- Instance ownership, as in the original platform (created only where it does not exist).
-- On Supabase, a table created here gets row level security (no policies): Supabase grants
-- the public `anon` role access to new tables, and only the service key may use these.
DO $$
BEGIN
    IF to_regclass('whatsapp_instances') IS NULL THEN
        CREATE TABLE whatsapp_instances (
            id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
            user_account_id UUID NOT NULL,
            instance_name TEXT NOT NULL UNIQUE,
            instance_id TEXT UNIQUE,
            phone_number TEXT,
            status TEXT CHECK (status IN ('disconnected', 'connecting', 'connected', 'error')),
            qr_code TEXT,
            last_connected_at TIMESTAMPTZ,
            error_message TEXT,
            created_at TIMESTAMPTZ DEFAULT NOW(),
            updated_at TIMESTAMPTZ DEFAULT NOW()
        );
        IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'anon') THEN
            ALTER TABLE whatsapp_instances ENABLE ROW LEVEL SECURITY;
        END IF;
    END IF;
END
$$;

-- The original's table, column for column (same names, types and constraints).
DO $$
BEGIN
    IF to_regclass('dialog_analysis') IS NULL THEN
        CREATE TABLE dialog_analysis (
            id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
            instance_name TEXT NOT NULL,
            user_account_id UUID NOT NULL,
            contact_phone TEXT NOT NULL,
            contact_name TEXT,
            incoming_count INT NOT NULL DEFAULT 0,
            outgoing_count INT NOT NULL DEFAULT 0,
            first_message TIMESTAMPTZ,
            last_message TIMESTAMPTZ,
            business_type TEXT,
            is_owner BOOLEAN,
            uses_ads_now BOOLEAN,
            has_sales_dept BOOLEAN,
            has_booking BOOLEAN,
            sent_instagram BOOLEAN,
            interest_level TEXT CHECK (interest_level IN ('hot', 'warm', 'cold')),
            main_intent TEXT CHECK (main_intent IN ('clinic_lead', 'ai_targetolog',
                'marketing_analysis', 'other')),
            objection TEXT,
            next_message TEXT NOT NULL,
            action TEXT CHECK (action IN ('want_call', 'want_work', 'reserve', 'none')),
            score INT CHECK (score >= 0 AND score <= 100),
            reasoning TEXT,
            messages JSONB,
            analyzed_at TIMESTAMPTZ DEFAULT NOW(),
            created_at TIMESTAMPTZ DEFAULT NOW(),
            updated_at TIMESTAMPTZ DEFAULT NOW(),
            ad_budget TEXT,
            instagram_url TEXT,
            funnel_stage TEXT CHECK (funnel_stage IN ('new_lead', 'not_qualified', 'qualified',
                'consultation_booked', 'consultation_completed', 'deal_closed', 'deal_lost')),
            qualification_complete BOOLEAN DEFAULT FALSE,
            notes TEXT,
            is_medical BOOLEAN DEFAULT FALSE,
            UNIQUE (instance_name, contact_phone)
        );
        IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'anon') THEN
            ALTER TABLE dialog_analysis ENABLE ROW LEVEL SECURITY;
        END IF;
    END IF;
END
$$;

-- Columns the original added over its lifetime: an older copy of its table may lack them.
ALTER TABLE dialog_analysis
    ADD COLUMN IF NOT EXISTS contact_name TEXT,
    ADD COLUMN IF NOT EXISTS incoming_count INT NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS outgoing_count INT NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS first_message TIMESTAMPTZ,
    ADD COLUMN IF NOT EXISTS last_message TIMESTAMPTZ,
    ADD COLUMN IF NOT EXISTS business_type TEXT,
    ADD COLUMN IF NOT EXISTS is_owner BOOLEAN,
    ADD COLUMN IF NOT EXISTS uses_ads_now BOOLEAN,
    ADD COLUMN IF NOT EXISTS has_sales_dept BOOLEAN,
    ADD COLUMN IF NOT EXISTS has_booking BOOLEAN,
    ADD COLUMN IF NOT EXISTS sent_instagram BOOLEAN,
    ADD COLUMN IF NOT EXISTS interest_level TEXT,
    ADD COLUMN IF NOT EXISTS main_intent TEXT,
    ADD COLUMN IF NOT EXISTS objection TEXT,
    ADD COLUMN IF NOT EXISTS next_message TEXT NOT NULL DEFAULT '',
    ADD COLUMN IF NOT EXISTS action TEXT,
    ADD COLUMN IF NOT EXISTS score INT,
    ADD COLUMN IF NOT EXISTS reasoning TEXT,
    ADD COLUMN IF NOT EXISTS messages JSONB,
    ADD COLUMN IF NOT EXISTS analyzed_at TIMESTAMPTZ DEFAULT NOW(),
    ADD COLUMN IF NOT EXISTS created_at TIMESTAMPTZ DEFAULT NOW(),
    ADD COLUMN IF NOT EXISTS updated_at TIMESTAMPTZ DEFAULT NOW(),
    ADD COLUMN IF NOT EXISTS ad_budget TEXT,
    ADD COLUMN IF NOT EXISTS instagram_url TEXT,
    ADD COLUMN IF NOT EXISTS funnel_stage TEXT,
    ADD COLUMN IF NOT EXISTS qualification_complete BOOLEAN DEFAULT FALSE,
    ADD COLUMN IF NOT EXISTS notes TEXT,
    ADD COLUMN IF NOT EXISTS is_medical BOOLEAN DEFAULT FALSE;

-- This service's columns. Constant defaults: existing rows are filled without a rewrite.
ALTER TABLE dialog_analysis
    ADD COLUMN IF NOT EXISTS niche TEXT,
    ADD COLUMN IF NOT EXISTS budget_stated BOOLEAN,
    ADD COLUMN IF NOT EXISTS score_breakdown JSONB,
    ADD COLUMN IF NOT EXISTS remote_jid TEXT,
    ADD COLUMN IF NOT EXISTS last_message_id TEXT,
    ADD COLUMN IF NOT EXISTS llm_usage JSONB,
    ADD COLUMN IF NOT EXISTS source TEXT NOT NULL DEFAULT 'auto',
    ADD COLUMN IF NOT EXISTS manual_fields TEXT[] NOT NULL DEFAULT '{}';

-- `analyzer` tells an analysed row from a `new_lead` one; the rows of an original table
-- are marked by the online step at the end of this file.
ALTER TABLE dialog_analysis ADD COLUMN IF NOT EXISTS analyzer TEXT;

-- One row per (instance_name, contact_phone): the key every upsert resolves on.
DO $$
BEGIN
    IF NOT EXISTS (
        SELECT 1
        FROM pg_index i
        WHERE i.indrelid = 'dialog_analysis'::regclass
          AND i.indisunique AND i.indpred IS NULL AND i.indnkeyatts = 2
          AND (SELECT array_agg(a.attname::text ORDER BY a.attname::text)
               FROM unnest(i.indkey::int2[]) AS k(attnum)
               JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum)
              = ARRAY['contact_phone', 'instance_name']
    ) THEN
        ALTER TABLE dialog_analysis
            ADD CONSTRAINT dialog_analysis_instance_name_contact_phone_key
            UNIQUE (instance_name, contact_phone);
    END IF;
    IF NOT EXISTS (
        SELECT 1
        FROM pg_index i
        JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
        WHERE i.indrelid = 'whatsapp_instances'::regclass
          AND i.indisunique AND i.indpred IS NULL AND i.indnkeyatts = 1
          AND a.attname = 'instance_name'
    ) THEN
        ALTER TABLE whatsapp_instances
            ADD CONSTRAINT whatsapp_instances_instance_name_key UNIQUE (instance_name);
    END IF;
END
$$;

DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'anon') THEN
        ALTER TABLE crm_schema_migrations ENABLE ROW LEVEL SECURITY;
    END IF;
END
$$;


-- ---- online steps: `crm-backend migrate` runs each on its own, after the part above has
-- committed (indexes built concurrently, updates in batches), so writers of a big original
-- table are not held up; pasted into the SQL editor they run in its one transaction.

-- Rows the original's model analysed (any stage but new_lead) count as analyses, so a later
-- new_lead refresh cannot downgrade their facts. Only rows no person and no analysis of
-- this service wrote match, so running this again changes nothing.
-- @online repeat
UPDATE dialog_analysis SET analyzer = 'original'
WHERE id IN (
    SELECT id FROM dialog_analysis
    WHERE analyzer IS NULL AND source = 'auto' AND cardinality(manual_fields) = 0
      AND funnel_stage IS DISTINCT FROM 'new_lead'
    LIMIT 5000
);

-- CHECK constraints, each added only where no constraint of that name exists. Added
-- NOT VALID (no full-table check while the table is locked), after the update above (which
-- would re-check old rows), and validated by the next step.
-- @online
DO $$
DECLARE
    c record;
BEGIN
    FOR c IN
        SELECT * FROM (VALUES
            ('dialog_analysis_interest_level_check',
             $c$CHECK (interest_level IN ('hot', 'warm', 'cold'))$c$),
            ('dialog_analysis_main_intent_check',
             $c$CHECK (main_intent IN ('clinic_lead', 'ai_targetolog', 'marketing_analysis',
                'other'))$c$),
            ('dialog_analysis_action_check',
             $c$CHECK (action IN ('want_call', 'want_work', 'reserve', 'none'))$c$),
            ('dialog_analysis_score_check',
             $c$CHECK (score >= 0 AND score <= 100)$c$),
            ('dialog_analysis_funnel_stage_check',
             $c$CHECK (funnel_stage IN ('new_lead', 'not_qualified', 'qualified',
                'consultation_booked', 'consultation_completed', 'deal_closed',
                'deal_lost'))$c$),
            ('dialog_analysis_niche_check',
             $c$CHECK (niche IN ('medicine', 'infobusiness', 'other', 'targetologist'))$c$),
            ('dialog_analysis_source_check',
             $c$CHECK (source IN ('auto', 'manual'))$c$)
        ) AS t(name, definition)
    LOOP
        IF NOT EXISTS (
            SELECT 1 FROM pg_constraint
            WHERE conrelid = 'dialog_analysis'::regclass AND conname = c.name
        ) THEN
            EXECUTE format('ALTER TABLE dialog_analysis ADD CONSTRAINT %I %s NOT VALID',
                           c.name, c.definition);
        END IF;
    END LOOP;
END
$$;

-- Validate the CHECK constraints (a scan that does not block writers). A constraint that
-- older rows break stays NOT VALID: those rows are kept, and new writes are still checked.
-- @online
DO $$
DECLARE
    c record;
BEGIN
    FOR c IN
        SELECT conname FROM pg_constraint
        WHERE conrelid = 'dialog_analysis'::regclass AND contype = 'c' AND NOT convalidated
          AND conname LIKE 'dialog\_analysis\_%\_check'
    LOOP
        BEGIN
            EXECUTE format('ALTER TABLE dialog_analysis VALIDATE CONSTRAINT %I', c.conname);
        EXCEPTION WHEN check_violation THEN
            RAISE NOTICE 'constraint % left NOT VALID: older rows do not satisfy it',
                c.conname;
        END;
    END LOOP;
END
$$;

-- List order everywhere: score DESC NULLS LAST, last_message DESC NULLS LAST, id DESC.
-- Written with COALESCE (score is 0-100, so -1 sorts after every score) so that one
-- row comparison walks these indexes for keyset pagination.
-- @online
CREATE INDEX IF NOT EXISTS idx_dialog_analysis_account_order ON dialog_analysis (
    user_account_id,
    (COALESCE(score, -1)) DESC,
    (COALESCE(last_message, '-infinity'::timestamptz)) DESC,
    id DESC
);

-- @online
CREATE INDEX IF NOT EXISTS idx_dialog_analysis_account_instance_order ON dialog_analysis (
    user_account_id,
    instance_name,
    (COALESCE(score, -1)) DESC,
    (COALESCE(last_message, '-infinity'::timestamptz)) DESC,
    id DESC
);

-- @online
CREATE INDEX IF NOT EXISTS idx_dialog_analysis_account_stage
    ON dialog_analysis (user_account_id, funnel_stage);

-- @online
CREATE INDEX IF NOT EXISTS idx_dialog_analysis_account_interest
    ON dialog_analysis (user_account_id, interest_level);

-- @online
CREATE INDEX IF NOT EXISTS idx_whatsapp_instances_account
    ON whatsapp_instances (user_account_id);
