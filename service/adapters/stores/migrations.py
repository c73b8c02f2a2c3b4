"""Results schema migrations: the SQL files of `service/sql/`, applied in order.

The files ship inside the package (package data, read with importlib.resources), so an
installed wheel migrates wherever it runs; there is no directory to configure.

A file has a transactional part, then optional *online steps*, each after a line
`-- @online` (run once) or `-- @online repeat` (a batch, run until one comes back short of
its LIMIT). The whole file
is valid SQL as it stands: `migration_sql()` prints every file in order (a `repeat` step
wrapped in a loop) for pasting into Supabase's SQL editor, which runs it as one transaction
and can run it any number of times.

`apply_migrations` (the `migrate` command) instead keeps the time it locks a big table
short. It holds a session advisory lock for the whole run (processes starting together
migrate one after the other; it needs a session of its own: a direct connection or a
session pooler, not pgbouncer's transaction pooling), then for each pending file:
- the transactional part runs in one transaction with a short `lock_timeout`, retried, so a
  long query on the table cannot queue every writer behind the migration;
- each online step then runs on its own: `CREATE INDEX` steps as
  `CREATE INDEX CONCURRENTLY` (an invalid index left by an interrupted build is dropped and
  built again), `repeat` steps in small batches, each its own transaction;
- the version is recorded last, so an interrupted run is finished by the next one.
Afterwards it sends `NOTIFY pgrst, 'reload schema'`, so a PostgREST in front of the
database sees the new tables and functions.

Rule for every new file (see README, "Supabase set-up"): a file that creates a table GRANTs
`service_role` exactly what the service needs on it, grants nothing to `anon` and
`authenticated`, and enables row level security; a file that creates a function pins its
`search_path` and grants EXECUTE to `service_role` alone. tests/test_supabase_grants.py
fails for any table or function of the schema that breaks it.
"""

from __future__ import annotations

import asyncio
import re
import time
from importlib import resources
from urllib.parse import urlsplit

import asyncpg
import msgspec
from loguru import logger

from service.adapters.stores.postgres import connection_error

# pg_advisory_lock key: b"crm_mig" as a number, fixed so every process agrees.
_LOCK_KEY = int.from_bytes(b"crm_mig", "big")
_FILE_NAME = re.compile(r"(\d{4}_[a-z0-9_]+)\.sql")
_STEP = re.compile(r"^-- @online( repeat)?[ \t]*$", re.M)
_LIMIT = re.compile(r"\bLIMIT\s+(\d+)", re.I)
_INDEX = re.compile(r"^\s*CREATE\s+(UNIQUE\s+)?INDEX\s+IF\s+NOT\s+EXISTS\s+(\w+)\s", re.I)
# How long the transactional part may wait for a table lock before it lets writers pass
# and tries again.
LOCK_TIMEOUT = "5s"
LOCK_ATTEMPTS = 6

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
RELOAD_SCHEMA = "NOTIFY pgrst, 'reload schema'"


class PackageDataError(Exception):
    """The installed package lacks files it ships with (an incomplete install)."""


class MigrationConnectionError(Exception):
    """`migrate` was pointed at a connection it cannot migrate through."""


# Supabase's transaction pooler (Supavisor): statements of one session may reach different
# server connections, so the session lock that serialises `migrate` would not hold.
TRANSACTION_POOLER_PORT = 6543


class OnlineStep(msgspec.Struct, frozen=True):
    sql: str  # one statement
    repeat: bool = False  # run until it changes no row (a batch of a whole-table update)
    comment: str = ""  # the comment lines above its marker

    @property
    def batch(self) -> int | None:
        """The LIMIT of a `repeat` step's batch."""
        match = _LIMIT.search(self.sql)
        return int(match.group(1)) if match else None

    @property
    def index(self) -> str | None:
        """The index name, for a `CREATE INDEX IF NOT EXISTS name` step."""
        match = _INDEX.match(self.sql)
        return match.group(2) if match else None

    def printed(self) -> str:
        """The step as it runs inside one transaction (the SQL editor)."""
        sql = self.sql
        if self.repeat:
            body = sql.rstrip(";")
            sql = (
                f"DO $crm$\nBEGIN\n    LOOP\n{body};\n"
                "        EXIT WHEN NOT FOUND;\n    END LOOP;\nEND\n$crm$;"
            )
        return f"{self.comment}\n{sql}" if self.comment else sql


class Migration(msgspec.Struct, frozen=True):
    version: str  # the file name without `.sql`, e.g. "0001_results_tables"
    sql: str  # the transactional part
    online: tuple[OnlineStep, ...] = ()


def parse_migration(version: str, text: str) -> Migration:
    # split() with one group yields [head, flag, step, flag, step, ...]
    parts = _STEP.split(text)
    head, comment = _split_trailing_comment(parts[0])
    steps: list[OnlineStep] = []
    for flag, chunk in zip(parts[1::2], parts[2::2], strict=True):
        sql, following = _split_trailing_comment(chunk)
        if sql:
            steps.append(OnlineStep(sql=sql, repeat=bool(flag), comment=comment))
        comment = following
    return Migration(version=version, sql=head, online=tuple(steps))


def _split_trailing_comment(chunk: str) -> tuple[str, str]:
    """(statement, the comment lines after it), which describe the next step."""
    lines = chunk.strip().splitlines()
    cut = len(lines)
    while cut and (not lines[cut - 1].strip() or lines[cut - 1].lstrip().startswith("--")):
        cut -= 1
    return "\n".join(lines[:cut]).strip(), "\n".join(lines[cut:]).strip()


def load_migrations() -> list[Migration]:
    """All migrations in version order, read from the package."""
    folder = resources.files("service").joinpath("sql")
    found: list[Migration] = []
    names = sorted(p.name for p in folder.iterdir() if p.name.endswith(".sql"))
    for name in names:
        match = _FILE_NAME.fullmatch(name)
        if match is None:
            raise ValueError(f"migration file {name!r} is not named NNNN_name.sql")
        text = folder.joinpath(name).read_text(encoding="utf-8")
        found.append(parse_migration(match.group(1), text))
    if not found:
        raise PackageDataError(
            "this crm-backend installation has no SQL migrations (service/sql/*.sql): "
            "reinstall the package from a complete wheel"
        )
    return found


def migration_sql() -> str:
    """Every migration as one re-runnable script (for Supabase's SQL editor)."""
    parts = [
        "-- crm-backend results schema. Safe to run more than once: it only adds what is\n"
        "-- missing and keeps every existing row.\n"
    ]
    for migration in load_migrations():
        parts.append(f"\n-- ==== {migration.version} ====\n")
        parts.append(migration.sql.rstrip() + "\n")
        for step in migration.online:
            parts.append("\n" + step.printed().rstrip() + "\n")
        parts.append(_RECORD.format(version=_sql_literal(migration.version)) + "\n")
    parts.append(
        f"\n-- Tell PostgREST (the Data API) to reload its schema cache.\n{RELOAD_SCHEMA};\n"
    )
    return "".join(parts)


async def apply_migrations(dsn: str) -> list[str]:
    """Apply the pending migrations; returns the versions applied now (empty: up to date)."""
    migrations = load_migrations()
    if _port(dsn) == TRANSACTION_POOLER_PORT:
        raise MigrationConnectionError(
            "migrate needs a session of its own: use the project's direct connection or its "
            "session pooler (port 5432) in RESULTS_DATABASE_URL, not the transaction pooler "
            f"(port {TRANSACTION_POOLER_PORT})"
        )
    conn = await _connect(dsn)
    applied: list[str] = []
    try:
        # One `migrate` at a time, online steps included (concurrent index builds and
        # validations on one table can deadlock each other). Polled, not waited for: a
        # statement waiting for the lock would be a transaction that a CONCURRENTLY build
        # of the lock's holder waits for in turn.
        while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", _LOCK_KEY):  # noqa: ASYNC110
            await asyncio.sleep(0.2)
        for migration in migrations:
            if not await _run_transactional_part(conn, migration):
                continue
            for step in migration.online:
                started = time.monotonic()
                await _run_online_step(conn, step)
                logger.info(
                    "migration step done",
                    version=migration.version,
                    step=step.index or step.sql.split(None, 1)[0],
                    seconds=round(time.monotonic() - started, 2),
                )
            async with conn.transaction():
                recorded = await conn.fetchval(
                    "INSERT INTO crm_schema_migrations (version) VALUES ($1) "
                    "ON CONFLICT (version) DO NOTHING RETURNING version",
                    migration.version,
                )
            if recorded:
                applied.append(migration.version)
                logger.info("migration applied", version=migration.version)
        await conn.execute(RELOAD_SCHEMA)
    finally:
        await conn.close()  # ends the session: releases the advisory lock
    return applied


async def _run_transactional_part(conn: asyncpg.Connection, migration: Migration) -> bool:
    """Run the file's transactional part unless recorded; False when it was recorded."""
    for attempt in range(1, LOCK_ATTEMPTS + 1):
        try:
            async with conn.transaction():
                await conn.execute(_BOOTSTRAP)
                done = await conn.fetchval(
                    "SELECT true FROM crm_schema_migrations WHERE version = $1",
                    migration.version,
                )
                if done:
                    return False
                await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
                await conn.execute(migration.sql)
            return True
        except asyncpg.LockNotAvailableError:
            if attempt == LOCK_ATTEMPTS:
                raise
            logger.warning(
                "migration waits for a table lock; letting writers pass",
                version=migration.version,
                attempt=attempt,
            )
            await asyncio.sleep(min(attempt, 5))
    raise AssertionError("unreachable")


async def _run_online_step(conn: asyncpg.Connection, step: OnlineStep) -> None:
    index = step.index
    if index is not None:
        await _build_index(conn, index, step.sql)
    elif step.repeat:
        sql = step.sql.rstrip().rstrip(";")
        batch = step.batch
        while True:
            changed = int((await conn.execute(sql)).rsplit(" ", 1)[-1])
            # A short batch reached the end of the table: rows that writers add meanwhile
            # would keep a full batch from ever coming back empty.
            if changed == 0 or (batch is not None and changed < batch):
                return
    else:
        await conn.execute(step.sql)


async def _build_index(conn: asyncpg.Connection, name: str, sql: str) -> None:
    state = await conn.fetchrow(
        """
        SELECT i.indisvalid AS valid,
               EXISTS (SELECT 1 FROM pg_stat_progress_create_index p
                       WHERE p.index_relid = i.indexrelid) AS building
        FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
        WHERE c.relname = $1 AND c.relnamespace = current_schema()::regnamespace
        """,
        name,
    )
    if state is not None and (state["valid"] or state["building"]):
        return  # built already, or another process is building it now
    if state is not None:
        # Left invalid by an interrupted CONCURRENTLY build: IF NOT EXISTS would keep it.
        logger.warning("rebuilding an invalid index", index=name)
        await conn.execute(f'DROP INDEX CONCURRENTLY IF EXISTS "{name}"')
    concurrent = _INDEX.sub(
        lambda m: f"CREATE {m.group(1) or ''}INDEX CONCURRENTLY IF NOT EXISTS {m.group(2)} ",
        sql,
        count=1,
    )
    try:
        await conn.execute(concurrent)
    except (asyncpg.DuplicateTableError, asyncpg.UniqueViolationError):
        pass  # another process created it between the check and the build


async def _connect(dsn: str) -> asyncpg.Connection:
    try:
        # No statement cache: pgbouncer in transaction mode cannot keep prepared statements.
        return await asyncpg.connect(dsn, statement_cache_size=0, timeout=15)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise connection_error(dsn, exc) from None


def _port(dsn: str) -> int | None:
    try:
        return urlsplit(dsn).port
    except ValueError:
        return None


def _sql_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"
