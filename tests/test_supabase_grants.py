"""Supabase as it is since 2026-10-30: what each role may do with this service's schema.

On Supabase-like databases (tests/supabase_db.py), fresh and upgraded from the original
service's tables with rows and their old grants (ALL to anon, authenticated and
service_role):
- the schema rule every migration file keeps (RLS on, nothing for the public roles, pinned
  search_path), checked over every table and function of the schema, so a later file that
  forgets it fails here;
- through the role-enforcing PostgREST test server, the public keys read and change nothing;
- the test server's own PostgREST behaviour: read-only STABLE calls, schema cache reloads on
  NOTIFY only.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest

from service.adapters.stores.migrations import apply_migrations
from service.adapters.stores.supabase import SupabaseStore
from tests.fakes.postgrest_server import (
    ANON_KEY,
    AUTHENTICATED_KEY,
    PUBLISHABLE_KEY,
    SERVICE_KEY,
    PostgrestServer,
    running_postgrest,
)
from tests.supabase_db import execute, fetch, load_original, migrated_database

PUBLIC_ROLES = ("anon", "authenticated")
# What the store does on each table, and nothing more (service/sql/0003_data_api_grants.sql,
# 0004_api_keys.sql, 0005_evolution_events.sql, 0006_lead_history.sql,
# 0007_webhook_endpoints.sql; `instances move` also updates two columns of
# whatsapp_instances; history rows go with their lead through the foreign key's cascade,
# which needs no privilege of the caller).
SERVICE_ROLE_PRIVILEGES = {
    "crm_api_keys": {"SELECT", "INSERT", "UPDATE"},
    "crm_deleted_messages": {"SELECT", "INSERT"},
    "crm_lead_history": {"SELECT", "INSERT"},
    "crm_lid_pairs": {"SELECT", "INSERT", "UPDATE"},
    "crm_webhook_deliveries": {"SELECT", "INSERT", "UPDATE", "DELETE"},
    "crm_webhook_endpoints": {"SELECT", "INSERT", "DELETE"},
    "crm_outbox": {"SELECT", "INSERT", "UPDATE", "DELETE"},
    "dialog_analysis": {"SELECT", "INSERT", "UPDATE", "DELETE"},
    "whatsapp_instances": {"SELECT", "INSERT", "DELETE"},
    "crm_schema_migrations": set(),
}


@pytest.fixture(params=["fresh", "upgraded"])
async def migrated(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    async with migrated_database(request.param) as dsn:
        yield dsn


async def rule_violations(dsn: str) -> list[str]:
    """Every table, sequence and function of the schema that breaks the migration rule."""
    found: list[str] = []
    relations = await fetch(
        dsn,
        """
        SELECT c.relname, c.relkind::text AS relkind, c.relrowsecurity,
               ARRAY(SELECT DISTINCT CASE WHEN a.grantee = 0 THEN 'PUBLIC'
                                          ELSE a.grantee::regrole::text END
                     FROM aclexplode(c.relacl) a
                     WHERE a.grantee <> c.relowner) AS grantees
        FROM pg_class c
        WHERE c.relnamespace = 'public'::regnamespace AND c.relkind IN ('r', 'p', 'v', 'm', 'S')
        """,
    )
    for rel in relations:
        if rel["relkind"] in ("r", "p") and not rel["relrowsecurity"]:
            found.append(f"table {rel['relname']}: row level security is off")
        public = set(rel["grantees"]) & {"PUBLIC", *PUBLIC_ROLES}
        if public:
            found.append(f"{rel['relname']}: privileges for {sorted(public)}")
    functions = await fetch(
        dsn,
        """
        SELECT p.oid::regprocedure::text AS name, p.proconfig,
               p.proacl IS NULL
               OR EXISTS (SELECT 1 FROM aclexplode(p.proacl) a
                          WHERE a.privilege_type = 'EXECUTE'
                            AND (a.grantee = 0 OR a.grantee::regrole::text = ANY($1)))
                   AS public_execute
        FROM pg_proc p
        WHERE p.pronamespace = 'public'::regnamespace AND p.prokind = 'f'
        """,
        list(PUBLIC_ROLES),
    )
    for fn in functions:
        if not any(s.startswith("search_path=") for s in fn["proconfig"] or ()):
            found.append(f"function {fn['name']}: search_path not pinned")
        if fn["public_execute"]:
            found.append(f"function {fn['name']}: executable by PUBLIC, anon or authenticated")
    return found


async def test_every_table_and_function_keeps_the_rule(migrated: str) -> None:
    assert await rule_violations(migrated) == []
    grants = await fetch(
        migrated,
        "SELECT table_name, privilege_type FROM information_schema.role_table_grants "
        "WHERE table_schema = 'public' AND grantee = 'service_role'",
    )
    held: dict[str, set[str]] = {name: set() for name in SERVICE_ROLE_PRIVILEGES}
    for row in grants:
        held.setdefault(row["table_name"], set()).add(row["privilege_type"])
    assert held == SERVICE_ROLE_PRIVILEGES
    executable = await fetch(
        migrated,
        "SELECT proname FROM pg_proc WHERE pronamespace = 'public'::regnamespace "
        "AND has_function_privilege('service_role', oid, 'EXECUTE') ORDER BY 1",
    )
    assert [r["proname"] for r in executable] == [
        "crm_add_instance",
        "crm_api_key_account",
        "crm_api_key_create",
        "crm_api_key_list",
        "crm_api_key_revoke",
        "crm_cause",
        "crm_create_lead",
        "crm_deleted_ids",
        "crm_foreign_leads",
        "crm_forget_dialog_time",
        "crm_funnel",
        "crm_lead_history_page",
        "crm_lead_stats",
        "crm_leads_page",
        "crm_lid_phone",
        "crm_move_instance",
        "crm_outbox_claim",
        "crm_outbox_depth",
        "crm_outbox_done",
        "crm_outbox_release",
        "crm_record_changes",
        "crm_record_deletes",
        "crm_remember_lid",
        "crm_update_lead",
        "crm_upsert_analysis",
        "crm_webhook_claim",
        "crm_webhook_endpoint_add",
        "crm_webhook_endpoint_json",
        "crm_webhook_endpoint_list",
        "crm_webhook_endpoint_remove",
        "crm_webhook_endpoints_for",
        "crm_webhook_finish",
    ]

    # A later migration that adds a table and a function without doing the same fails.
    await execute(
        migrated,
        "CREATE TABLE later_table (id int); GRANT SELECT ON later_table TO anon; "
        "CREATE FUNCTION later_fn() RETURNS int LANGUAGE sql AS 'SELECT 1'; "
        "GRANT EXECUTE ON FUNCTION later_fn() TO authenticated",
    )
    assert sorted(await rule_violations(migrated)) == [
        "function later_fn(): executable by PUBLIC, anon or authenticated",
        "function later_fn(): search_path not pinned",
        "later_table: privileges for ['anon']",
        "table later_table: row level security is off",
    ]


async def test_before_the_migration_the_public_key_reads_every_original_lead(
    supabase_empty_db: str, account: uuid.UUID
) -> None:
    # What the migration fixes: the original's tables with their old grants and no RLS.
    await load_original(supabase_empty_db, account)
    async with running_postgrest(supabase_empty_db) as server:
        async with rest(server, ANON_KEY) as http:
            leads = await http.get("/dialog_analysis", params={"select": "contact_phone"})
            assert leads.status_code == 200 and len(leads.json()) == 4
        await apply_migrations(supabase_empty_db)
        async with rest(server, ANON_KEY) as http:
            assert (await http.get("/dialog_analysis")).status_code == 401


def rest(server: PostgrestServer, key: str) -> httpx.AsyncClient:
    headers = {"apikey": key, "Authorization": f"Bearer {key}"}
    return httpx.AsyncClient(base_url=server.url + "/rest/v1", headers=headers, timeout=10)


async def snapshot(dsn: str) -> list[Any]:
    rows = await fetch(
        dsn,
        "SELECT 'lead' AS kind, to_jsonb(d)::text AS row FROM dialog_analysis d "
        "UNION ALL SELECT 'instance', to_jsonb(w)::text FROM whatsapp_instances w ORDER BY 1, 2",
    )
    return [tuple(r) for r in rows]


@pytest.mark.parametrize(
    ("key", "status"),
    [(ANON_KEY, 401), (PUBLISHABLE_KEY, 401), (AUTHENTICATED_KEY, 403)],
    ids=["anon", "publishable", "authenticated"],
)
async def test_the_public_keys_read_and_change_nothing(
    migrated: str, account: uuid.UUID, key: str, status: int
) -> None:
    async with running_postgrest(migrated) as server:
        store = await SupabaseStore.open(server.url, SERVICE_KEY, backoff=0.01)
        try:
            await store.add_instance("inst-x", account)
        finally:
            await store.close()
        await execute(
            migrated,
            "INSERT INTO dialog_analysis (instance_name, user_account_id, contact_phone, "
            "next_message, score) VALUES ('inst-x', $1, '77010000009', '', 50)",
            account,
        )
        before = await snapshot(migrated)
        assert {kind for kind, _ in before} == {"lead", "instance"}
        lead = {"instance_name": "inst-x", "user_account_id": str(account)}
        async with rest(server, key) as http:
            answers = [
                await http.get("/dialog_analysis", params={"select": "id"}),
                await http.get("/whatsapp_instances"),
                await http.post(
                    "/dialog_analysis", json={**lead, "contact_phone": "1", "next_message": ""}
                ),
                await http.post("/whatsapp_instances", json={**lead, "instance_name": "mine"}),
                await http.patch(
                    "/dialog_analysis", params={"score": "gte.0"}, json={"score": 100}
                ),
                await http.delete("/whatsapp_instances", params={"instance_name": "eq.inst-x"}),
                await http.post(
                    "/rpc/crm_upsert_analysis", json={"p": {**lead, "contact_phone": "2"}}
                ),
                await http.post("/rpc/crm_lead_stats", json={"p_account": str(account)}),
                await http.post("/rpc/crm_leads_page", json={"p_account": str(account)}),
                await http.post(
                    "/rpc/crm_add_instance", json={"p_instance": "x", "p_account": str(account)}
                ),
            ]
        for answer in answers:
            assert answer.status_code == status, (answer.request.url, answer.text)
            assert answer.json()["code"] == "42501", answer.text
            assert answer.json()["message"].startswith("permission denied for")
        assert all(a.headers.get("www-authenticate") == "Bearer" for a in answers) is (
            status == 401
        )
        assert await snapshot(migrated) == before


async def test_stable_functions_and_reads_run_read_only(
    results_dsn: str, account: uuid.UUID
) -> None:
    conn = await asyncpg.connect(results_dsn)
    try:
        # A STABLE function that (through a volatile one) writes: PostgREST runs it in a
        # READ ONLY transaction, so the write fails; the same call through a VOLATILE
        # function is allowed.
        await conn.execute(
            """
            CREATE FUNCTION write_note() RETURNS int LANGUAGE sql VOLATILE
                AS $$ INSERT INTO whatsapp_instances (instance_name, user_account_id)
                      VALUES ('written', gen_random_uuid()) RETURNING 1 $$;
            CREATE FUNCTION stable_write() RETURNS int LANGUAGE sql STABLE
                AS $$ SELECT write_note() $$;
            CREATE FUNCTION volatile_write() RETURNS int LANGUAGE sql VOLATILE
                AS $$ SELECT write_note() $$;
            GRANT EXECUTE ON FUNCTION write_note(), stable_write(), volatile_write()
                TO service_role;
            NOTIFY pgrst, 'reload schema';
            """
        )
    finally:
        await conn.close()
    async with running_postgrest(results_dsn) as server:
        async with rest(server, SERVICE_KEY) as http:
            read_only = await http.post("/rpc/stable_write", json={})
            assert read_only.status_code == 405 and read_only.json()["code"] == "25006"
            assert (
                await fetch(
                    results_dsn, "SELECT 1 FROM whatsapp_instances WHERE instance_name = 'written'"
                )
                == []
            )
            written = await http.post("/rpc/volatile_write", json={})
            assert written.status_code == 200 and written.json() == 1


async def test_the_schema_cache_reloads_on_notify_only(supabase_empty_db: str) -> None:
    async with running_postgrest(supabase_empty_db) as server:
        store = await SupabaseStore.open(server.url, SERVICE_KEY, backoff=0.01)
        try:
            await execute(
                supabase_empty_db,
                "CREATE TABLE later_table (id int); GRANT SELECT ON later_table TO service_role",
            )
            async with rest(server, SERVICE_KEY) as http:
                missing = await http.get("/later_table")
                assert missing.status_code == 404 and missing.json()["code"] == "PGRST205"
                stale = await http.post(
                    "/rpc/crm_lead_stats", json={"p_account": str(uuid.uuid4())}
                )
                assert stale.status_code == 404 and stale.json()["code"] == "PGRST202"

                # `migrate` ends with NOTIFY pgrst: the server reloads and the store works.
                await apply_migrations(supabase_empty_db)
                await wait_for_reload(server)
                assert (await http.get("/later_table")).status_code == 200
            assert (await store.stats(uuid.uuid4(), None)).total == 0
        finally:
            await store.close()


async def wait_for_reload(server: PostgrestServer) -> None:
    async with asyncio.timeout(10):
        while server.schema_reloads == 0:
            await asyncio.sleep(0.05)
