"""Fixtures and helpers of the REST API tests: the real app on real databases.

Test modules import the fixtures by their function names (`api_fixture`, `pg_api_fixture`)
and use them by fixture name (`api`, `pg_api`).

`api` runs each test against both results stores: PostgresStore directly, and
SupabaseStore → supabase-py → HTTP → fake PostgREST → the same kind of real PostgreSQL.
Test rows are inserted with plain SQL (`insert_leads`), so both stores read the same data.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer

from handlers.http_app import make_app
from service.adapters.stores.base import ResultsStore
from service.bootstrap.context import AppContext
from service.config import Settings, load_settings
from tests.fakes.postgrest_server import SERVICE_KEY
from tests.parts import parts_around

API_TOKEN = "rest-test-token-0123456789abcdef0123456"
INSTANCE = "clinic-sales"
AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
BASE_TIME = datetime(2026, 9, 1, 12, 0, tzinfo=UTC)
NO_BROKER = "amqp://guest:guest@127.0.0.1:9/"  # nothing listens on port 9 (discard)

_json = msgspec.json.Encoder()


def rest_settings(results_dsn: str, evolution_dsn: str = "", **overrides: Any) -> Settings:
    env = {
        "RESULTS_DATABASE_URL": results_dsn,
        "API_TOKEN": API_TOKEN,
        "WEBHOOK_TOKEN": "rest-test-webhook-token-0123456789abcdef",
        "ANALYZER": "rules",
        "LOG_LEVEL": "WARNING",
        # No broker unless a test names one: nothing here declares on the shared broker.
        "AMQP_URL": NO_BROKER,
    }
    if evolution_dsn:
        env["EVOLUTION_DATABASE_URL"] = evolution_dsn
    env.update({k.upper(): str(v) for k, v in overrides.items()})
    return load_settings(env, dotenv=None)


@dataclass
class Api:
    client: TestClient[Any, Any]
    ctx: AppContext
    results_dsn: str
    account: uuid.UUID
    instance: str = INSTANCE
    kind: str = "postgres"
    other_account: uuid.UUID = field(default_factory=uuid.uuid4)

    @property
    def store(self) -> ResultsStore:
        return self.ctx.store

    async def call(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        json: Any = None,
        data: bytes | str | None = None,
        headers: dict[str, str] | None = None,
        auth: bool = True,
    ) -> tuple[int, Any]:
        """(status, decoded JSON body — or the raw text when it is not JSON)."""
        all_headers = dict(AUTH) if auth else {}
        all_headers.update(headers or {})
        body = data if json is None else _json.encode(json)
        response = await self.client.request(
            method, path, params=params, data=body, headers=all_headers
        )
        raw = await response.read()
        if response.content_type == "application/json":
            return response.status, msgspec.json.decode(raw)
        return response.status, raw.decode("utf-8")

    async def get(self, path: str, **params: Any) -> tuple[int, Any]:
        return await self.call("GET", path, params=_query(params))

    async def leads(self, **params: Any) -> tuple[int, Any]:
        params.setdefault("userAccountId", self.account)
        return await self.get("/dialogs/analysis", **params)


def _query(params: dict[str, Any]) -> dict[str, str]:
    out = {}
    for key, value in params.items():
        if isinstance(value, bool):
            out[key] = "true" if value else "false"
        else:
            out[key] = str(value)
    return out


def lead_values(account: uuid.UUID, index: int, **values: Any) -> dict[str, Any]:
    """A plausible analysed row (override any column)."""
    row: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "instance_name": INSTANCE,
        "user_account_id": str(account),
        "contact_phone": f"7701{index:07d}",
        "contact_name": f"Клиент {index}",
        "incoming_count": 3 + index % 5,
        "outgoing_count": 2,
        "first_message": (BASE_TIME - timedelta(hours=1)).isoformat(),
        "last_message": (BASE_TIME + timedelta(minutes=index)).isoformat(),
        "funnel_stage": "qualified",
        "niche": "other",
        "score": 30,
        "interest_level": "cold",
        "qualification_complete": False,
        "next_message": "Здравствуйте!",
        "main_intent": "other",
        "action": "none",
        "analyzer": "rules",
        "analyzed_at": datetime.now(UTC).isoformat(),
        "source": "auto",
        "manual_fields": [],
        "messages": [{"id": "m1", "text": "секрет"}],
    }
    row.update({k: (str(v) if isinstance(v, uuid.UUID) else v) for k, v in values.items()})
    if isinstance(row.get("last_message"), datetime):
        row["last_message"] = row["last_message"].isoformat()
    return row


async def insert_leads(dsn: str, rows: Iterable[dict[str, Any]]) -> list[str]:
    """Insert rows (column -> JSON value) in one statement; returns their ids."""
    rows = list(rows)
    columns = sorted({c for r in rows for c in r})
    names = ", ".join(columns)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            f"INSERT INTO dialog_analysis ({names}) SELECT {names} "
            "FROM jsonb_populate_recordset(NULL::dialog_analysis, $1::jsonb)",
            _json.encode(rows).decode(),
        )
    finally:
        await conn.close()
    return [r["id"] for r in rows]


async def fetch_row(dsn: str, lead_id: str | uuid.UUID) -> dict[str, Any] | None:
    conn = await asyncpg.connect(dsn)
    try:
        record = await conn.fetchrow(
            "SELECT * FROM dialog_analysis WHERE id = $1", uuid.UUID(str(lead_id))
        )
    finally:
        await conn.close()
    return None if record is None else dict(record)


@contextlib.asynccontextmanager
async def serve(ctx: AppContext) -> AsyncIterator[TestClient[Any, Any]]:
    client = TestClient(TestServer(make_app(ctx)))
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()


@contextlib.asynccontextmanager
async def open_store(kind: str, results_dsn: str) -> AsyncIterator[ResultsStore]:
    if kind == "postgres":
        from service.adapters.stores.postgres import PostgresStore

        store: ResultsStore = await PostgresStore.open(results_dsn)
        try:
            yield store
        finally:
            await store.close()
        return
    from service.adapters.stores.supabase import SupabaseStore
    from tests.fakes.postgrest_server import running_postgrest

    async with running_postgrest(results_dsn) as server:
        store = await SupabaseStore.open(server.url, SERVICE_KEY)
        try:
            yield store
        finally:
            await store.close()


@contextlib.asynccontextmanager
async def open_api(
    kind: str, results_dsn: str, account: uuid.UUID, **settings: Any
) -> AsyncIterator[Api]:
    async with open_store(kind, results_dsn) as store:
        await store.add_instance(INSTANCE, account)
        async with (
            parts_around(rest_settings(results_dsn, **settings), store) as ctx,
            serve(ctx) as client,
        ):
            yield Api(client=client, ctx=ctx, results_dsn=results_dsn, account=account, kind=kind)


@pytest.fixture(name="api", params=["postgres", "supabase"])
async def api_fixture(
    request: pytest.FixtureRequest, results_dsn: str, account: uuid.UUID
) -> AsyncIterator[Api]:
    """The app on each results store in turn."""
    async with open_api(request.param, results_dsn, account) as opened:
        yield opened


@pytest.fixture(name="pg_api")
async def pg_api_fixture(results_dsn: str, account: uuid.UUID) -> AsyncIterator[Api]:
    """The app on the Postgres store (for behaviour that is the handlers', not the store's)."""
    async with open_api("postgres", results_dsn, account) as opened:
        yield opened


def leads_from_spec(
    account: uuid.UUID, spec: list[tuple[str, str, int, str, bool | None]]
) -> list[dict[str, Any]]:
    """Lead rows from (instance, interest, score, stage, qualification_complete) tuples."""
    return [
        lead_values(
            account,
            i,
            instance_name=inst,
            interest_level=interest,
            score=score,
            funnel_stage=stage,
            qualification_complete=qual,
        )
        for i, (inst, interest, score, stage, qual) in enumerate(spec)
    ]
