"""Results schema migrations: the SQL files of `migrations/`, applied in order.

Where the files are found (first that exists):
1. `$CRM_MIGRATIONS_DIR` (the Docker image sets it: it installs the package without the
   repository and copies `migrations/` to /opt/venv/share/crm-backend/migrations);
2. `migrations/` next to the `service` package: a checkout and `pip install -e .`;
3. `<sys.prefix>/share/crm-backend/migrations`: the same copy for a virtualenv install.
The files stay at the top level because the contract names `migrations/` there; one copy,
no duplicate inside the package to drift.

`apply_migrations` runs each pending file in its own transaction, holding a transaction-
scoped advisory lock, so processes starting together apply each file once; the
transaction-scoped lock also works through pgbouncer's transaction pooling (Supabase's
pooler), where a session lock would not. Every file is itself re-runnable, so
`migration_sql()` (all files, each followed by its version record) can be pasted into
Supabase's SQL editor any number of times.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import asyncpg
import msgspec
from loguru import logger

from service.stores.postgres import connection_error

MIGRATIONS_DIR_ENV = "CRM_MIGRATIONS_DIR"
# pg_advisory_xact_lock key: b"crm_mig" as a number, fixed so every process agrees.
_LOCK_KEY = int.from_bytes(b"crm_mig", "big")
_FILE_NAME = re.compile(r"(\d{4}_[a-z0-9_]+)\.sql")

_BOOTSTRAP = """
CREATE TABLE IF NOT EXISTS crm_schema_migrations (
    version text PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""
_RECORD = (
    "INSERT INTO crm_schema_migrations (version) VALUES ({version}) "
    "ON CONFLICT (version) DO NOTHING;"
)


class Migration(msgspec.Struct, frozen=True):
    version: str  # the file name without `.sql`, e.g. "0001_results_tables"
    sql: str


def migrations_dir() -> Path:
    """The directory holding the migration files (see the module docstring)."""
    candidates: list[Path] = []
    configured = os.environ.get(MIGRATIONS_DIR_ENV)
    if configured:
        candidates.append(Path(configured))
    candidates.append(Path(__file__).resolve().parent.parent / "migrations")
    candidates.append(Path(sys.prefix) / "share" / "crm-backend" / "migrations")
    for path in candidates:
        if path.is_dir() and any(path.glob("*.sql")):
            return path
    searched = ", ".join(str(p) for p in candidates)
    raise FileNotFoundError(
        f"migration files not found (looked in {searched}); set {MIGRATIONS_DIR_ENV}"
    )


def load_migrations(directory: Path | None = None) -> list[Migration]:
    """All migrations in version order."""
    folder = directory or migrations_dir()
    found: list[Migration] = []
    for path in sorted(folder.glob("*.sql")):
        match = _FILE_NAME.fullmatch(path.name)
        if match is None:
            raise ValueError(f"migration file {path.name!r} is not named NNNN_name.sql")
        found.append(Migration(version=match.group(1), sql=path.read_text(encoding="utf-8")))
    return found


def migration_sql(directory: Path | None = None) -> str:
    """Every migration as one re-runnable script (for Supabase's SQL editor)."""
    parts = [
        "-- crm-backend results schema. Safe to run more than once: it only adds what is\n"
        "-- missing and keeps every existing row.\n"
    ]
    for migration in load_migrations(directory):
        parts.append(f"\n-- ==== {migration.version} ====\n")
        parts.append(migration.sql.rstrip() + "\n")
        parts.append(_RECORD.format(version=_sql_literal(migration.version)) + "\n")
    return "".join(parts)


async def apply_migrations(dsn: str, directory: Path | None = None) -> list[str]:
    """Apply the pending migrations; returns the versions applied now (empty: up to date)."""
    migrations = load_migrations(directory)
    conn = await _connect(dsn)
    applied: list[str] = []
    try:
        for migration in migrations:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
                await conn.execute(_BOOTSTRAP)
                done = await conn.fetchval(
                    "SELECT true FROM crm_schema_migrations WHERE version = $1",
                    migration.version,
                )
                if done:
                    continue
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO crm_schema_migrations (version) VALUES ($1) "
                    "ON CONFLICT (version) DO NOTHING",
                    migration.version,
                )
            applied.append(migration.version)
            logger.info("migration applied", version=migration.version)
    finally:
        await conn.close()
    return applied


async def _connect(dsn: str) -> asyncpg.Connection:
    try:
        # No statement cache: pgbouncer in transaction mode cannot keep prepared statements.
        return await asyncpg.connect(dsn, statement_cache_size=0, timeout=15)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise connection_error(dsn, exc) from None


def _sql_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"
