"""Migrations: fresh install, idempotence, in-place upgrade of the original's tables."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from service.adapters.stores.base import AnalysisWrite, LeadQuery
from service.adapters.stores.migrations import apply_migrations, load_migrations, migration_sql
from service.adapters.stores.postgres import PostgresStore
from tests.supabase_db import execute, fetch, load_original

VERSIONS = [m.version for m in load_migrations()]
NEW_COLUMNS = {
    "niche": "text",
    "budget_stated": "boolean",
    "score_breakdown": "jsonb",
    "remote_jid": "text",
    "last_message_id": "text",
    "analyzer": "text",
    "llm_usage": "jsonb",
    "source": "text",
    "manual_fields": "ARRAY",
}
FUNCTIONS = {
    "crm_upsert_analysis",
    "crm_update_lead",
    "crm_leads_page",
    "crm_lead_stats",
    "crm_add_instance",
}


async def schema_snapshot(dsn: str) -> dict[str, Any]:
    conn = await asyncpg.connect(dsn)
    try:
        columns = await conn.fetch(
            "SELECT table_name, column_name, data_type, is_nullable, column_default "
            "FROM information_schema.columns WHERE table_schema = 'public' "
            "ORDER BY table_name, ordinal_position"
        )
        constraints = await conn.fetch(
            "SELECT conrelid::regclass::text AS tab, conname, pg_get_constraintdef(oid) AS def, "
            "convalidated FROM pg_constraint WHERE connamespace = 'public'::regnamespace "
            "ORDER BY 1, 2"
        )
        indexes = await conn.fetch(
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1"
        )
        functions = await conn.fetch(
            "SELECT proname, md5(prosrc) FROM pg_proc "
            "WHERE pronamespace = 'public'::regnamespace ORDER BY 1"
        )
    finally:
        await conn.close()
    return {
        "columns": [tuple(r) for r in columns],
        "constraints": [tuple(r) for r in constraints],
        "indexes": [tuple(r) for r in indexes],
        "functions": [tuple(r) for r in functions],
    }


async def test_fresh_database_gets_every_table_column_and_function(empty_db: str) -> None:
    applied = await apply_migrations(empty_db)
    assert applied == VERSIONS and len(VERSIONS) >= 2

    columns = {
        r["column_name"]: r["data_type"]
        for r in await fetch(
            empty_db,
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_name = 'dialog_analysis'",
        )
    }
    for name, data_type in NEW_COLUMNS.items():
        assert columns[name] == data_type, name
    assert columns["score"] == "integer" and columns["last_message"] == ("timestamp with time zone")
    not_null = {
        r["column_name"]
        for r in await fetch(
            empty_db,
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_name = 'dialog_analysis' AND is_nullable = 'NO'",
        )
    }
    assert {"next_message", "source", "manual_fields", "contact_phone"} <= not_null
    recorded = await fetch(empty_db, "SELECT version FROM crm_schema_migrations ORDER BY 1")
    assert [r["version"] for r in recorded] == VERSIONS
    functions = {r["proname"] for r in await fetch(empty_db, "SELECT proname FROM pg_proc")}
    assert functions >= FUNCTIONS
    indexes = {r["indexname"] for r in await fetch(empty_db, "SELECT indexname FROM pg_indexes")}
    assert {
        "idx_dialog_analysis_account_order",
        "idx_dialog_analysis_account_instance_order",
        "idx_dialog_analysis_account_stage",
    } <= indexes

    account = uuid.uuid4()
    for bad in (
        "niche = 'cars'",
        "source = 'robot'",
        "score = 101",
        "funnel_stage = 'won'",
        "interest_level = 'lukewarm'",
        "action = 'dance'",
        "main_intent = 'nothing'",
    ):
        column, _, value = bad.partition(" = ")
        with pytest.raises(asyncpg.CheckViolationError):
            await execute(
                empty_db,
                "INSERT INTO dialog_analysis (instance_name, user_account_id, contact_phone, "
                f"next_message, {column}) VALUES ('i', $1, '1', '', {value})",
                account,
            )


async def test_reapplying_changes_nothing(empty_db: str) -> None:
    await apply_migrations(empty_db)
    before = await schema_snapshot(empty_db)
    assert await apply_migrations(empty_db) == []
    assert await schema_snapshot(empty_db) == before


async def test_processes_starting_together_apply_each_migration_once(empty_db: str) -> None:
    results = await asyncio.gather(*(apply_migrations(empty_db) for _ in range(3)))
    assert sorted(v for r in results for v in r) == sorted(VERSIONS)


ORIGINAL_COLUMNS_SQL = (
    "SELECT to_jsonb(d) - ARRAY['niche', 'budget_stated', 'score_breakdown', 'remote_jid', "
    "'last_message_id', 'analyzer', 'llm_usage', 'source', 'manual_fields', 'stage_changed_at'] "
    "AS row "
    "FROM dialog_analysis d ORDER BY contact_phone"
)


async def test_upgrade_of_the_originals_tables_keeps_every_row(
    empty_db: str, account: uuid.UUID
) -> None:
    await load_original(empty_db, account)
    leads_before = [r["row"] for r in await fetch(empty_db, ORIGINAL_COLUMNS_SQL)]
    instances_before = await fetch(empty_db, "SELECT * FROM whatsapp_instances")
    assert len(leads_before) == 4

    assert await apply_migrations(empty_db) == VERSIONS

    assert [r["row"] for r in await fetch(empty_db, ORIGINAL_COLUMNS_SQL)] == leads_before
    assert await fetch(empty_db, "SELECT * FROM whatsapp_instances") == instances_before
    added = await fetch(
        empty_db,
        "SELECT contact_phone, source, manual_fields, analyzer, niche, score_breakdown "
        "FROM dialog_analysis ORDER BY contact_phone",
    )
    assert [(r["source"], r["manual_fields"]) for r in added] == [("auto", [])] * 4
    # The original's analyses count as analyses; its new_lead rows do not.
    assert [r["analyzer"] for r in added] == ["original", "original", None, "original"]
    assert all(r["niche"] is None and r["score_breakdown"] is None for r in added)
    assert await apply_migrations(empty_db) == []

    # The stores work on the upgraded rows.
    store = await PostgresStore.open(empty_db, max_size=2)
    try:
        rows, total = await store.query_leads(LeadQuery(user_account_id=account))
        assert total == 4 and [r.score for r in rows] == [85, 45, 20, 5]
        assert rows[0].notes == "VIP" and rows[0].messages is None
        assert await store.instance_account("clinic-main") == account
        refresh = await store.upsert_analysis(
            new_lead(account, "77011111111", datetime(2024, 6, 1, tzinfo=UTC))
        )
        assert refresh.applied and refresh.id == rows[0].id
        lead = await store.get_lead(account, rows[0].id)
        assert lead is not None
        assert (lead.funnel_stage, lead.score, lead.incoming_count) == (
            "consultation_booked",
            85,
            1,
        )
        stats = await store.stats(account, None)
        assert stats.total == 4 and stats.consultation_booked == 1
    finally:
        await store.close()


def new_lead(account: uuid.UUID, phone: str, at: datetime) -> AnalysisWrite:
    return AnalysisWrite(
        instance_name="clinic-main",
        user_account_id=account,
        contact_phone=phone,
        contact_name=None,
        remote_jid=f"{phone}@s.whatsapp.net",
        incoming_count=1,
        outgoing_count=0,
        first_message=at,
        last_message=at,
        last_message_id="x1",
        analyzed=False,
        niche="other",
        business_type=None,
        is_owner=None,
        has_sales_dept=None,
        uses_ads_now=None,
        ad_budget=None,
        instagram_url=None,
        funnel_stage="new_lead",
        main_intent="other",
        objection=None,
        action="none",
        next_message="",
        reasoning=None,
        is_medical=False,
        budget_stated=False,
        has_booking=False,
        sent_instagram=False,
        qualification_complete=False,
        score=5,
        interest_level="cold",
        score_breakdown=[],
        messages=[],
        analyzer=None,
        llm_usage=None,
    )


EARLY_ORIGINAL = """
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
    interest_level TEXT,
    next_message TEXT NOT NULL,
    score INT,
    reasoning TEXT,
    messages JSONB,
    analyzed_at TIMESTAMPTZ DEFAULT NOW(),
    created_at TIMESTAMPTZ DEFAULT NOW(),
    updated_at TIMESTAMPTZ DEFAULT NOW(),
    UNIQUE (instance_name, contact_phone)
);
INSERT INTO dialog_analysis (instance_name, user_account_id, contact_phone, interest_level,
                             score, next_message)
VALUES ('old', gen_random_uuid(), '1', 'HOT', 150, 'hi'),
       ('old', gen_random_uuid(), '2', 'warm', 50, '');
"""


async def test_upgrade_of_an_early_original_table_keeps_rows_that_break_new_checks(
    empty_db: str,
) -> None:
    await execute(empty_db, EARLY_ORIGINAL)
    assert await apply_migrations(empty_db) == VERSIONS

    rows = await fetch(
        empty_db,
        "SELECT contact_phone, interest_level, score, funnel_stage, notes, is_medical, "
        "qualification_complete, source FROM dialog_analysis ORDER BY contact_phone",
    )
    assert [(r["interest_level"], r["score"]) for r in rows] == [("HOT", 150), ("warm", 50)]
    assert [(r["is_medical"], r["qualification_complete"], r["source"]) for r in rows] == [
        (False, False, "auto")
    ] * 2
    validity = {
        r["conname"]: r["convalidated"]
        for r in await fetch(
            empty_db,
            "SELECT conname, convalidated FROM pg_constraint "
            "WHERE conrelid = 'dialog_analysis'::regclass AND contype = 'c'",
        )
    }
    # Old rows break these two: kept NOT VALID (still enforced on new writes).
    assert validity["dialog_analysis_interest_level_check"] is False
    assert validity["dialog_analysis_score_check"] is False
    assert validity["dialog_analysis_funnel_stage_check"] is True
    with pytest.raises(asyncpg.CheckViolationError):
        await execute(empty_db, "UPDATE dialog_analysis SET score = 101 WHERE contact_phone = '2'")
    # whatsapp_instances did not exist: created.
    assert await fetch(empty_db, "SELECT * FROM whatsapp_instances") == []


async def test_printed_sql_runs_twice_like_the_supabase_sql_editor(
    supabase_empty_db: str, account: uuid.UUID
) -> None:
    db = supabase_empty_db  # as Supabase's SQL editor: the non-superuser owner `postgres`
    assert (await fetch(db, "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"))[0][
        0
    ] is False
    script = migration_sql()
    for version in VERSIONS:
        assert f"-- ==== {version} ====" in script
    assert "CONCURRENTLY" not in script  # it runs inside the editor's one transaction
    await load_original(db, account)
    before = [r["row"] for r in await fetch(db, ORIGINAL_COLUMNS_SQL)]
    # One simple-protocol query holding the whole text, as the SQL editor sends it.
    await execute(db, script)
    snapshot = await schema_snapshot(db)
    await execute(db, script)
    assert await schema_snapshot(db) == snapshot
    assert [r["row"] for r in await fetch(db, ORIGINAL_COLUMNS_SQL)] == before
    analyzers = await fetch(db, "SELECT analyzer FROM dialog_analysis ORDER BY contact_phone")
    assert [r["analyzer"] for r in analyzers] == ["original", "original", None, "original"]
    # Versions were recorded: `crm-backend migrate` afterwards has nothing to do.
    assert await apply_migrations(db) == []


async def test_migrate_rebuilds_an_index_an_interrupted_concurrent_build_left_invalid(
    empty_db: str, account: uuid.UUID
) -> None:
    await load_original(empty_db, account)
    # A failed CREATE INDEX CONCURRENTLY leaves an INVALID index behind, under the name
    # migrate uses: IF NOT EXISTS alone would keep it for ever.
    conn = await asyncpg.connect(empty_db)
    try:
        await conn.execute("ALTER TABLE dialog_analysis ADD COLUMN IF NOT EXISTS funnel_stage text")
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute(
                "CREATE UNIQUE INDEX CONCURRENTLY idx_dialog_analysis_account_stage "
                "ON dialog_analysis (user_account_id)"
            )
    finally:
        await conn.close()
    invalid = (
        "SELECT indisvalid, pg_get_indexdef(indexrelid) AS def FROM pg_index "
        "WHERE indexrelid = 'idx_dialog_analysis_account_stage'::regclass"
    )
    assert (await fetch(empty_db, invalid))[0]["indisvalid"] is False

    assert await apply_migrations(empty_db) == VERSIONS
    rebuilt = (await fetch(empty_db, invalid))[0]
    assert rebuilt["indisvalid"] is True
    assert "UNIQUE" not in rebuilt["def"] and "funnel_stage" in rebuilt["def"]


async def test_writers_pass_while_migrate_waits_for_a_table_lock(
    supabase_empty_db: str, account: uuid.UUID, monkeypatch: pytest.MonkeyPatch
) -> None:
    import service.adapters.stores.migrations

    monkeypatch.setattr(service.adapters.stores.migrations, "LOCK_TIMEOUT", "100ms")
    db = supabase_empty_db
    await load_original(db, account)
    blocker = await asyncpg.connect(db)  # a long report reading the table
    writer = await asyncpg.connect(db)
    try:
        await blocker.execute("BEGIN; LOCK TABLE dialog_analysis IN ACCESS SHARE MODE")
        migrating = asyncio.create_task(apply_migrations(db))
        await asyncio.sleep(0.5)  # migrate is now waiting for its ALTER TABLE lock
        # Without lock_timeout this insert would queue behind the ALTER TABLE's lock
        # request until the report ends.
        await asyncio.wait_for(
            writer.execute(
                "INSERT INTO dialog_analysis (instance_name, user_account_id, contact_phone, "
                "next_message) VALUES ('live', $1, '77019990000', '')",
                account,
            ),
            timeout=5,
        )
        assert not migrating.done()  # the writer got in while migrate was still waiting
        await blocker.execute("COMMIT")
        assert await asyncio.wait_for(migrating, timeout=60) == VERSIONS
    finally:
        await blocker.close()
        await writer.close()


async def test_a_batched_update_ends_on_a_short_batch(empty_db: str) -> None:
    from service.adapters.stores.migrations import _run_online_step, parse_migration

    # Each batch changes the one row again, as rows live writers keep adding would: it must
    # end once a batch comes back short of its LIMIT, not wait for an empty one.
    migration = parse_migration(
        "0009_test",
        "CREATE TABLE t (id int PRIMARY KEY, n int NOT NULL);\n"
        "INSERT INTO t VALUES (1, 0);\n"
        "-- @online repeat\n"
        "UPDATE t SET n = n + 1 WHERE id IN (SELECT id FROM t LIMIT 10);\n",
    )
    (step,) = migration.online
    assert step.repeat and step.batch == 10
    conn = await asyncpg.connect(empty_db)
    try:
        await conn.execute(migration.sql)
        await asyncio.wait_for(_run_online_step(conn, step), timeout=10)
        assert await conn.fetchval("SELECT n FROM t") == 1
    finally:
        await conn.close()
    assert "EXIT WHEN NOT FOUND" in step.printed()
