"""REST credentials bound to an account: API keys and Supabase Auth access tokens.

With a bound credential the account comes from the credential; naming another one is a
404, as for a foreign lead. API_TOKEN stays the platform-wide admin. Both results stores
(Postgres directly, Supabase through supabase-py and the PostgREST double) are covered.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives.asymmetric import ec

from tests.conftest import ROOT, create_database, drop_database, pg_dsn
from tests.rest_support import (
    INSTANCE,
    Api,
    api_fixture,  # noqa: F401 - fixture
    insert_leads,
    lead_values,
    open_api,
)

JWT_SECRET = "supabase-project-jwt-secret-0123456789abcdef"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def seed(api: Api) -> tuple[str, str]:
    """One lead of the account, one of another account on another instance."""
    own, foreign = await insert_leads(
        api.results_dsn,
        [
            lead_values(api.account, 1),
            lead_values(api.other_account, 2, instance_name="other-instance"),
        ],
    )
    return own, foreign


async def as_(api: Api, token: str, method: str, path: str, **kw: Any) -> tuple[int, Any]:
    headers = {**bearer(token), **kw.pop("headers", {})}
    return await api.call(method, path, headers=headers, auth=False, **kw)


async def test_api_key_reads_and_edits_only_its_account(api: Api) -> None:
    from service.usecases.api_keys import create_key

    own, foreign = await seed(api)
    key, record = await create_key(api.store, api.account, "crm front end")
    assert record.user_account_id == api.account and key.startswith(record.prefix)

    # No userAccountId needed: the key names the account.
    status, body = await as_(api, key, "GET", "/dialogs/analysis")
    assert status == 200 and [r["id"] for r in body["results"]] == [own]
    status, body = await as_(api, key, "GET", "/dialogs/stats")
    assert status == 200 and body["stats"]["total"] == 1
    # Its own account given explicitly is fine too.
    params = {"userAccountId": str(api.account)}
    assert (await as_(api, key, "GET", "/dialogs/analysis", params=params))[0] == 200

    # Another account: 404, on every route that takes one.
    other = {"userAccountId": str(api.other_account)}
    for method, path in (
        ("GET", "/dialogs/analysis"),
        ("GET", "/dialogs/stats"),
        ("GET", "/dialogs/export-csv"),
        ("DELETE", f"/dialogs/analysis/{foreign}"),
    ):
        status, body = await as_(api, key, method, path, params=other)
        assert status == 404, (method, path, body)
    status, _ = await as_(
        api,
        key,
        "PATCH",
        f"/dialogs/leads/{foreign}",
        json={"userAccountId": str(api.other_account), "notes": "mine now"},
    )
    assert status == 404
    status, _ = await as_(
        api,
        key,
        "POST",
        "/dialogs/analyze",
        json={"instanceName": "other-instance", "userAccountId": str(api.other_account)},
    )
    assert status == 404
    # A foreign lead id with the key's own account is not found either.
    assert (await as_(api, key, "DELETE", f"/dialogs/analysis/{foreign}"))[0] == 404

    # Bodies may leave userAccountId out.
    status, body = await as_(api, key, "PATCH", f"/dialogs/leads/{own}", json={"notes": "ok"})
    assert status == 200 and body["lead"]["notes"] == "ok"
    status, body = await as_(
        api,
        key,
        "POST",
        "/dialogs/leads",
        json={"phone": "+7 701 555 00 77", "instanceName": INSTANCE, "funnelStage": "qualified"},
    )
    assert status == 201 and body["lead"]["user_account_id"] == str(api.account)
    # Platform-wide metrics are the admin's.
    assert (await as_(api, key, "GET", "/metrics"))[0] == 403

    # The admin token still reaches every account.
    status, body = await api.call("GET", "/dialogs/analysis", params=other)
    assert status == 200 and [r["id"] for r in body["results"]] == [foreign]

    # Revoked: refused.
    assert await api.store.revoke_api_key(record.prefix) == 1
    status, body = await as_(api, key, "GET", "/dialogs/analysis")
    assert status == 401 and body["error"] == "invalid API key"


async def test_keys_are_stored_hashed(api: Api) -> None:
    from service.usecases.api_keys import create_key

    key, _ = await create_key(api.store, api.account, None)
    conn = await asyncpg.connect(api.results_dsn)
    try:
        rows = [dict(r) for r in await conn.fetch("SELECT * FROM crm_api_keys")]
    finally:
        await conn.close()
    assert len(rows) == 1
    assert key not in json.dumps(rows, default=str)
    assert (await as_(api, key[:-1] + ("A" if key[-1] != "A" else "B"), "GET", "/dialogs/stats"))[
        0
    ] == 401


def cli(*args: str, dsn: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.isupper() or k in ("PATH", "HOME")}
    env.update({"RESULTS_DATABASE_URL": dsn, "PYTHONPATH": str(ROOT), "LOG_LEVEL": "WARNING"})
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_keys_command_create_list_revoke(results_dsn: str, account: uuid.UUID) -> None:
    created = await asyncio.to_thread(
        cli, "keys", "create", "--account", str(account), "--name", "front end", dsn=results_dsn
    )
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith("crm_") and "shown only now" in created.stderr
    listed = await asyncio.to_thread(cli, "keys", "list", dsn=results_dsn)
    assert listed.returncode == 0 and key not in listed.stdout
    prefix, owner, name, state, _ = listed.stdout.strip().split("\t")
    assert key.startswith(prefix) and owner == str(account) and name == "front end"
    assert state == "active"
    async with open_api("postgres", results_dsn, account) as api:
        await insert_leads(results_dsn, [lead_values(account, 1)])
        assert (await as_(api, key, "GET", "/dialogs/analysis"))[0] == 200
        revoked = await asyncio.to_thread(cli, "keys", "revoke", prefix, dsn=results_dsn)
        assert revoked.returncode == 0, revoked.stderr
        assert (await as_(api, key, "GET", "/dialogs/analysis"))[0] == 401
    again = await asyncio.to_thread(cli, "keys", "revoke", prefix, dsn=results_dsn)
    assert again.returncode == 2 and again.stderr.count("\n") == 1


# -- Supabase Auth access tokens ----------------------------------------------------------
def access_token(account: uuid.UUID | None, *, secret: str = JWT_SECRET, **claims: Any) -> str:
    """Claims as Supabase Auth issues them (guides/auth/jwt-fields)."""
    now = int(time.time())
    payload: dict[str, Any] = {
        "iss": "https://project-ref.supabase.co/auth/v1",
        "sub": str(uuid.uuid4()),
        "aud": "authenticated",
        "role": "authenticated",
        "iat": now,
        "exp": now + 3600,
        "aal": "aal1",
        "session_id": str(uuid.uuid4()),
        "app_metadata": {"provider": "email"},
    }
    if account is not None:
        payload["app_metadata"]["user_account_id"] = str(account)
    payload.update(claims)
    return jwt.encode(payload, secret, algorithm="HS256")


async def test_supabase_access_token_is_bound_to_its_account(
    results_dsn: str, account: uuid.UUID
) -> None:
    async with open_api("postgres", results_dsn, account, supabase_jwt_secret=JWT_SECRET) as api:
        own, _ = await seed(api)
        token = access_token(api.account)
        status, body = await as_(api, token, "GET", "/dialogs/analysis")
        assert status == 200 and [r["id"] for r in body["results"]] == [own]
        other = {"userAccountId": str(api.other_account)}
        assert (await as_(api, token, "GET", "/dialogs/analysis", params=other))[0] == 404

        refused = {
            "wrong secret": access_token(api.account, secret="x" * 40),
            "expired": access_token(api.account, exp=int(time.time()) - 120),
            "anon key": access_token(None, role="anon"),
            "service role key": access_token(None, role="service_role", sub=None),
            "no account claim": access_token(None),
            "account not a UUID": access_token(None, app_metadata={"user_account_id": "x"}),
            "wrong audience": access_token(api.account, aud="anon"),
            "none algorithm": jwt.encode(
                {"sub": "u", "role": "authenticated", "exp": int(time.time()) + 60},
                None,
                algorithm="none",
            ),
        }
        for what, bad in refused.items():
            status, body = await as_(api, bad, "GET", "/dialogs/analysis")
            assert status == 401, (what, body)


async def test_account_claim_is_configurable(results_dsn: str, account: uuid.UUID) -> None:
    async with open_api(
        "postgres",
        results_dsn,
        account,
        supabase_jwt_secret=JWT_SECRET,
        supabase_account_claim="sub",
    ) as api:
        own, _ = await seed(api)
        status, body = await as_(
            api, access_token(None, sub=str(api.account)), "GET", "/dialogs/analysis"
        )
        assert status == 200 and [r["id"] for r in body["results"]] == [own]


Jwks = tuple[ec.EllipticCurvePrivateKey, str, list[float]]


@pytest.fixture
async def jwks() -> AsyncIterator[Jwks]:
    """A project's JWKS endpoint (asymmetric signing keys), as Supabase Auth serves it."""
    key = ec.generate_private_key(ec.SECP256R1())
    public = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    public.update({"kid": "key-1", "alg": "ES256", "use": "sig"})
    fetches: list[float] = []

    async def handler(request: web.Request) -> web.Response:
        fetches.append(time.monotonic())
        return web.json_response({"keys": [public]})

    app = web.Application()
    app.router.add_get("/auth/v1/.well-known/jwks.json", handler)
    server = TestServer(app)
    await server.start_server()
    try:
        yield key, str(server.make_url("/auth/v1/.well-known/jwks.json")), fetches
    finally:
        await server.close()


async def test_supabase_token_signed_with_jwks_key(
    results_dsn: str, account: uuid.UUID, jwks: Jwks
) -> None:
    key, url, fetches = jwks
    async with open_api("postgres", results_dsn, account, supabase_jwks_url=url) as api:
        own, _ = await seed(api)
        now = int(time.time())
        claims = {
            "sub": str(uuid.uuid4()),
            "aud": "authenticated",
            "role": "authenticated",
            "exp": now + 600,
            "iat": now,
            "app_metadata": {"user_account_id": str(account)},
        }
        token = jwt.encode(claims, key, algorithm="ES256", headers={"kid": "key-1"})
        status, body = await as_(api, token, "GET", "/dialogs/analysis")
        assert status == 200 and [r["id"] for r in body["results"]] == [own]
        stranger = ec.generate_private_key(ec.SECP256R1())
        forged = jwt.encode(claims, stranger, algorithm="ES256", headers={"kid": "key-1"})
        assert (await as_(api, forged, "GET", "/dialogs/analysis"))[0] == 401
        # Made-up key ids do not make a fetch each.
        fetched = len(fetches)
        for n in range(20):
            odd = jwt.encode(claims, stranger, algorithm="ES256", headers={"kid": f"k{n}"})
            assert (await as_(api, odd, "GET", "/dialogs/analysis"))[0] == 401
        assert len(fetches) - fetched <= 1, fetches
        # An HS256 token is not accepted when only the JWKS is configured.
        assert (await as_(api, access_token(account), "GET", "/dialogs/analysis"))[0] == 401


# -- the keys table on Supabase: service_role only, row level security on ----------------
async def test_keys_table_is_closed_to_public_roles() -> None:
    from service.adapters.stores.migrations import apply_migrations

    admin = await asyncpg.connect(pg_dsn("postgres"))
    try:
        for role in ("anon", "authenticated", "service_role"):
            await admin.execute(
                f"DO $$ BEGIN CREATE ROLE {role} NOLOGIN; "
                "EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$"
            )
    finally:
        await admin.close()
    name = await create_database("crmt_keys")
    try:
        await apply_migrations(pg_dsn(name))
        conn = await asyncpg.connect(pg_dsn(name))
        try:
            assert await conn.fetchval(
                "SELECT relrowsecurity FROM pg_class WHERE relname = 'crm_api_keys'"
            )
            for role, allowed in (
                ("anon", False),
                ("authenticated", False),
                ("service_role", True),
            ):
                for privilege in ("SELECT", "INSERT", "UPDATE", "DELETE"):
                    has = await conn.fetchval(
                        "SELECT has_table_privilege($1, 'crm_api_keys', $2)", role, privilege
                    )
                    # Revoking a key is an UPDATE: nothing deletes keys.
                    assert has is (allowed and privilege != "DELETE"), (role, privilege)
                can_run = await conn.fetchval(
                    "SELECT has_function_privilege($1, 'crm_api_key_account(text)', 'EXECUTE')",
                    role,
                )
                assert can_run is allowed, role
        finally:
            await conn.close()
    finally:
        await drop_database(name)
