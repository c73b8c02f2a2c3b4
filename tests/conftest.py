"""Shared fixtures: real PostgreSQL databases and RabbitMQ, created per test and dropped after.

Databases are named `crmt_<random>` so parallel runs and leftovers never collide.
"""

from __future__ import annotations

import json
import os
import secrets
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

DATA = Path(__file__).parent / "data"
ROOT = Path(__file__).parent.parent
PG_HOST = os.environ.get("TEST_PGHOST", "127.0.0.1")
PG_PORT = int(os.environ.get("TEST_PGPORT", "5432"))
PG_USER = os.environ.get("TEST_PGUSER", "postgres")
AMQP_URL = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


def pg_dsn(database: str) -> str:
    return f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/{database}"


async def create_database(prefix: str = "crmt") -> str:
    name = f"{prefix}_{secrets.token_hex(5)}"
    conn = await asyncpg.connect(pg_dsn("postgres"))
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return name


async def drop_database(name: str) -> None:
    conn = await asyncpg.connect(pg_dsn("postgres"))
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def load_evolution_schema(dsn: str, schema: str = "public") -> None:
    conn = await asyncpg.connect(dsn)
    try:
        if schema != "public":
            await conn.execute(f'CREATE SCHEMA "{schema}"; SET search_path TO "{schema}"')
        await conn.execute((ROOT / "service" / "adapters" / "evolution" / "schema.sql").read_text())
    finally:
        await conn.close()


@pytest.fixture
async def empty_db() -> AsyncIterator[str]:
    """DSN of a new, empty database."""
    name = await create_database()
    try:
        yield pg_dsn(name)
    finally:
        await drop_database(name)


@pytest.fixture
async def evolution_dsn() -> AsyncIterator[str]:
    """DSN of a new database holding Evolution's tables (schema `public`)."""
    name = await create_database("crmt_evo")
    try:
        await load_evolution_schema(pg_dsn(name))
        yield pg_dsn(name)
    finally:
        await drop_database(name)


@pytest.fixture
async def results_dsn() -> AsyncIterator[str]:
    """A new Supabase-like database (tests/supabase_db.py) with this service's migrations
    applied by its non-superuser owner; the owner's DSN (what the SQL editor runs as)."""
    from tests.supabase_db import migrated_database

    async with migrated_database() as dsn:
        yield dsn


@pytest.fixture
async def supabase_empty_db() -> AsyncIterator[str]:
    """Owner DSN of a new Supabase-like database holding nothing yet."""
    from tests.supabase_db import create_supabase_database, owner_dsn

    name = await create_supabase_database()
    try:
        yield owner_dsn(name)
    finally:
        await drop_database(name)


@pytest.fixture
def amqp_url() -> str:
    return AMQP_URL


@pytest.fixture
def amqp_prefix() -> str:
    """A unique exchange/queue prefix per test, so tests never share queues."""
    return f"crmt.{secrets.token_hex(4)}"


@pytest.fixture
def account() -> uuid.UUID:
    return uuid.uuid4()


@pytest.fixture(scope="session")
def dialogs() -> list[dict[str, Any]]:
    """The labeled development dialogs (copied into the project as demo data)."""
    data: list[dict[str, Any]] = json.loads(
        (ROOT / "service" / "demo_data" / "dialogs.json").read_text()
    )
    return data


@pytest.fixture(scope="session")
def webhook_bodies() -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((DATA / "webhooks").glob("*.json"))}


@pytest.fixture
async def service_settings(
    evolution_dsn: str, results_dsn: str, amqp_url: str, amqp_prefix: str, account: uuid.UUID
) -> AsyncIterator[Any]:
    """Settings of a whole service under test: fresh databases, own queues, the test
    instance stored in Evolution and mapped to `account`, the topology declared."""
    from tests.harness import (
        declare_topology,
        delete_topology,
        ensure_instance_row,
        make_settings,
        map_instance,
    )

    settings = make_settings(
        evolution_dsn=evolution_dsn, results_dsn=results_dsn, amqp_url=amqp_url, prefix=amqp_prefix
    )
    await ensure_instance_row(settings)
    await map_instance(settings, account)
    await declare_topology(settings)
    yield settings
    await delete_topology(settings)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Remove every variable the service reads, so tests see only what they set."""
    import msgspec

    from service.config import Settings

    for field in msgspec.structs.fields(Settings):
        monkeypatch.delenv(field.name.upper(), raising=False)
    yield
