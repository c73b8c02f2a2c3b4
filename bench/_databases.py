"""Throw-away databases for the benchmarks (module name starts with `_`: not a benchmark)."""

from __future__ import annotations

import os

import asyncpg

PG_HOST = os.environ.get("BENCH_PGHOST", os.environ.get("TEST_PGHOST", "127.0.0.1"))
PG_PORT = int(os.environ.get("BENCH_PGPORT", os.environ.get("TEST_PGPORT", "5432")))
PG_USER = os.environ.get("BENCH_PGUSER", os.environ.get("TEST_PGUSER", "postgres"))


def dsn(database: str) -> str:
    return f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/{database}"


async def _admin(statement: str) -> None:
    conn = await asyncpg.connect(dsn("postgres"))
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


async def create_database(name: str) -> str:
    await _admin(f'CREATE DATABASE "{name}"')
    return dsn(name)


async def drop_database(name: str) -> None:
    await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
