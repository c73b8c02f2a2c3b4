"""A wrong Supabase key is loud: start-up fails in one line naming SUPABASE_SERVICE_KEY, and
/ready answers 503 naming it; a 403 from missing grants says to re-run the migration SQL.

Everything over real HTTP: supabase-py → the role-enforcing PostgREST test server → a
Supabase-like database.
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from pathlib import Path

import jwt
import pytest

from service.adapters.stores.base import StoreAccessError
from service.adapters.stores.factory import open_store
from service.adapters.stores.supabase import SupabaseStore, key_role
from service.config import Settings
from tests.fakes.postgrest_server import (
    ANON_KEY,
    AUTHENTICATED_KEY,
    PUBLISHABLE_KEY,
    SECRET_KEY,
    SERVICE_KEY,
    running_postgrest,
)
from tests.parts import parts_around
from tests.rest_support import AUTH, rest_settings, serve
from tests.supabase_db import execute, fetch

ROOT = Path(__file__).parent.parent
# Claims service_role, but is not signed with the project's secret: the gateway refuses it.
FORGED_KEY = jwt.encode({"role": "service_role"}, "another-projects-secret-of-32-chars!", "HS256")


def test_the_keys_role_is_read_from_its_form() -> None:
    assert key_role(SERVICE_KEY) == "service_role"
    assert key_role(ANON_KEY) == "anon"
    assert key_role(AUTHENTICATED_KEY) == "authenticated"
    assert key_role(SECRET_KEY) == "service_role"
    assert key_role(PUBLISHABLE_KEY) == "anon"
    assert key_role("some-other-key") is None
    assert key_role("a.b.c") is None


async def run_cli(*args: str, **env: str) -> tuple[int, list[str]]:
    base = {k: v for k, v in os.environ.items() if not k.isupper() or k in ("PATH", "HOME")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        *args,
        env={**base, **env, "PYTHONPATH": str(ROOT), "LOG_LEVEL": "ERROR"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT / "tests",  # no .env here
    )
    async with asyncio.timeout(60):
        _, err = await process.communicate()
    lines = [line for line in err.decode().splitlines() if line.strip()]
    assert process.returncode is not None
    return process.returncode, lines


@pytest.mark.parametrize(
    ("key", "says"),
    [
        (ANON_KEY, "SUPABASE_SERVICE_KEY is a key of role 'anon'"),
        (AUTHENTICATED_KEY, "SUPABASE_SERVICE_KEY is a key of role 'authenticated'"),
        (PUBLISHABLE_KEY, "SUPABASE_SERVICE_KEY is the project's publishable key"),
        (FORGED_KEY, "Supabase rejected SUPABASE_SERVICE_KEY (HTTP 401: Invalid API key)"),
    ],
    ids=["anon", "authenticated", "publishable", "forged"],
)
async def test_serve_with_a_wrong_key_stops_in_one_line(
    results_dsn: str, key: str, says: str
) -> None:
    async with running_postgrest(results_dsn) as server:
        code, lines = await run_cli(
            "serve",
            SUPABASE_URL=server.url,
            SUPABASE_SERVICE_KEY=key,
            AUTH_DISABLED="true",
            PORT="19150",
        )
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("crm-backend: error: ") and says in lines[0], lines[0]
    assert key not in lines[0]


async def test_missing_grants_say_to_rerun_the_migration_sql(results_dsn: str) -> None:
    # As a table created after 2026-10-30 without the migration's GRANTs.
    await execute(results_dsn, "REVOKE ALL ON dialog_analysis FROM service_role")
    async with running_postgrest(results_dsn) as server:
        code, lines = await run_cli(
            "instances", "list", SUPABASE_URL=server.url, SUPABASE_SERVICE_KEY=SECRET_KEY
        )
    assert code == 2 and len(lines) == 1, lines
    assert "permission denied for table dialog_analysis" in lines[0]
    assert "re-run the SQL of `crm-backend migrate --print`" in lines[0]
    assert "SUPABASE_SERVICE_KEY" not in lines[0]  # the key is right: do not blame it


async def test_an_unmigrated_project_says_to_run_the_migration_sql(supabase_empty_db: str) -> None:
    async with running_postgrest(supabase_empty_db) as server:
        with pytest.raises(StoreAccessError, match=r"migrate --print"):
            await open_store(Settings(supabase_url=server.url, supabase_service_key=SERVICE_KEY))


async def test_the_secret_key_and_the_service_role_key_pass(
    results_dsn: str, account: uuid.UUID
) -> None:
    async with running_postgrest(results_dsn) as server:
        for key in (SECRET_KEY, SERVICE_KEY):
            store = await open_store(Settings(supabase_url=server.url, supabase_service_key=key))
            try:
                await store.add_instance("inst-k", account)
                assert await store.instance_account("inst-k") == account
            finally:
                await store.close()
        # The access check wrote nothing.
        counts = await fetch(
            results_dsn,
            "SELECT (SELECT count(*) FROM dialog_analysis), "
            "(SELECT count(*) FROM whatsapp_instances)",
        )
        assert tuple(counts[0]) == (0, 1)


async def test_ready_answers_503_naming_the_key(results_dsn: str) -> None:
    async with running_postgrest(results_dsn) as server:
        for key, says in [
            (ANON_KEY, "SUPABASE_SERVICE_KEY is a key of role 'anon'"),
            (FORGED_KEY, "Supabase rejected SUPABASE_SERVICE_KEY"),
        ]:
            # Opened without the start-up check, as a store whose key stopped working.
            store = await SupabaseStore.open(server.url, key, backoff=0.01)
            try:
                async with (
                    parts_around(rest_settings(results_dsn), store) as ctx,
                    serve(ctx) as client,
                ):
                    response = await client.get("/ready", headers=AUTH)
                    body = await response.json()
                assert response.status == 503
                assert body["checks"]["results_db"].startswith("down: ")
                assert says in body["checks"]["results_db"], body
                assert server.url not in body["checks"]["results_db"]
            finally:
                await store.close()


async def test_ready_tells_missing_grants_from_a_wrong_key(results_dsn: str) -> None:
    async with running_postgrest(results_dsn) as server:
        store = await SupabaseStore.open(server.url, SERVICE_KEY, backoff=0.01)
        try:
            async with (
                parts_around(rest_settings(results_dsn), store) as ctx,
                serve(ctx) as client,
            ):
                assert (await (await client.get("/ready", headers=AUTH)).json())["checks"][
                    "results_db"
                ] == "ok"
                await execute(
                    results_dsn,
                    "REVOKE EXECUTE ON FUNCTION crm_upsert_analysis(jsonb) FROM service_role",
                )
                response = await client.get("/ready", headers=AUTH)
                check = (await response.json())["checks"]["results_db"]
            assert response.status == 503
            assert "permission denied for function crm_upsert_analysis" in check
            assert "re-run the SQL of `crm-backend migrate --print`" in check
        finally:
            await store.close()
