"""Supabase-like databases on the test PostgreSQL: Supabase's roles, a non-superuser owner
and no default privileges for the API roles.

Mirrors supabase/postgres:
- `migrations/db/init-scripts/00000000000000-initial-schema.sql`: roles `anon`,
  `authenticated` (NOLOGIN), `service_role` (NOLOGIN, BYPASSRLS), `authenticator` (LOGIN,
  NOINHERIT, granted the three), USAGE on schema public for them;
- `migrations/db/migrations/10000000000000_demote-postgres.sql`: the `postgres` role that
  owns the user's objects and runs the SQL editor is NOSUPERUSER CREATEDB CREATEROLE LOGIN
  REPLICATION BYPASSRLS; here it is `OWNER` (the shared server's `postgres` is its
  superuser, standing for `supabase_admin`);
- `20230201083204_grant_auth_roles_to_postgres.sql`: the owner is granted the API roles;
- Supabase changelog 45329 (in force for every project since 2026-10-30): the owner's new
  tables and functions in `public` get no privileges for `anon`, `authenticated` or
  `service_role`. PostgreSQL's own default (EXECUTE on new functions for PUBLIC) is
  revoked too, so a function without an explicit GRANT is not callable by the API roles.

Roles are cluster-wide: they are created once, idempotently, and left in place (parallel
test runs share them); databases are per test and dropped after.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg

from service.adapters.stores.migrations import apply_migrations
from tests.conftest import DATA, PG_HOST, PG_PORT, create_database, drop_database, pg_dsn

OWNER = "crmt_supabase_owner"
API_ROLES = ("anon", "authenticated", "service_role")
AUTHENTICATOR = "authenticator"
_ROLES = (
    ("anon", "NOLOGIN"),
    ("authenticated", "NOLOGIN"),
    ("service_role", "NOLOGIN BYPASSRLS"),
    (AUTHENTICATOR, "LOGIN NOINHERIT"),
    (OWNER, "LOGIN NOSUPERUSER CREATEDB CREATEROLE REPLICATION BYPASSRLS"),
)


def role_dsn(database: str, role: str) -> str:
    return f"postgresql://{role}@{PG_HOST}:{PG_PORT}/{database}"


def owner_dsn(database: str) -> str:
    return role_dsn(database, OWNER)


def database_of(dsn: str) -> str:
    return dsn.rsplit("/", 1)[1].split("?", 1)[0]


async def ensure_roles() -> None:
    conn = await asyncpg.connect(pg_dsn("postgres"))
    try:
        for name, options in _ROLES:
            exists = await conn.fetchval("SELECT true FROM pg_roles WHERE rolname = $1", name)
            if not exists:
                try:
                    await conn.execute(f'CREATE ROLE "{name}" {options}')
                except (asyncpg.DuplicateObjectError, asyncpg.UniqueViolationError):
                    pass  # a parallel run created it meanwhile
        for role in API_ROLES:
            for member in (AUTHENTICATOR, OWNER):
                granted = await conn.fetchval("SELECT pg_has_role($1, $2, 'MEMBER')", member, role)
                if not granted:
                    try:
                        await conn.execute(f'GRANT "{role}" TO "{member}"')
                    except asyncpg.UniqueViolationError:
                        pass
    finally:
        await conn.close()


async def create_supabase_database(prefix: str = "crmt_sb") -> str:
    """A new database set up as a Supabase project's (see the module docstring)."""
    await ensure_roles()
    name = await create_database(prefix)
    conn = await asyncpg.connect(pg_dsn(name))
    try:
        await conn.execute(
            f"""
            GRANT ALL ON DATABASE "{name}" TO {OWNER};
            GRANT ALL ON SCHEMA public TO {OWNER};
            GRANT USAGE ON SCHEMA public TO anon, authenticated, service_role;
            ALTER DEFAULT PRIVILEGES FOR ROLE {OWNER} REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC;
            """
        )
    finally:
        await conn.close()
    return name


@contextlib.asynccontextmanager
async def migrated_database(kind: str = "fresh") -> AsyncIterator[str]:
    """Owner DSN of a new Supabase-like database, migrated by the owner; `kind="upgraded"`:
    the migrations upgrade the original's tables holding rows (of another account)."""
    name = await create_supabase_database("crmt_res")
    try:
        if kind == "upgraded":
            await load_original(owner_dsn(name), uuid.uuid4())
        await apply_migrations(owner_dsn(name))
        yield owner_dsn(name)
    finally:
        await drop_database(name)


async def load_original(dsn: str, account: uuid.UUID) -> None:
    """The original's tables (tests/data/original_tables.sql, a copy of
    shared/original/original_tables.sql) with rows as its service wrote them, and the grants
    Supabase's old default privileges gave every table: ALL to the three API roles."""
    await ensure_roles()
    await execute(dsn, (DATA / "original_tables.sql").read_text())
    await execute(
        dsn,
        "GRANT ALL ON TABLE whatsapp_instances, dialog_analysis "
        "TO anon, authenticated, service_role",
    )
    await execute(
        dsn,
        "INSERT INTO whatsapp_instances (user_account_id, instance_name, instance_id, status) "
        "VALUES ($1, 'clinic-main', 'evo-1', 'connected')",
        account,
    )
    rows = [
        # analysed by the original's model
        ("77011111111", "Dana", "hot", 85, "consultation_booked", True, "Зубная клиника"),
        ("77012222222", "Erlan", "warm", 45, "qualified", False, None),
        # under the threshold: stored as new_lead without a model call
        ("77013333333", None, "cold", 5, "new_lead", False, None),
        # from before the original tracked the funnel stage
        ("77014444444", "Old", "cold", 20, None, None, "кафе"),
    ]
    for phone, name, interest, score, stage, qualified, business in rows:
        await execute(
            dsn,
            "INSERT INTO dialog_analysis (instance_name, user_account_id, contact_phone, "
            "contact_name, incoming_count, outgoing_count, first_message, last_message, "
            "business_type, interest_level, score, funnel_stage, qualification_complete, "
            "next_message, reasoning, messages, notes, main_intent, action) "
            "VALUES ('clinic-main', $1, $2, $3, 4, 3, $4, $5, $6, $7, $8, $9, $10, $11, $12, "
            "$13::jsonb, $14, 'clinic_lead', 'want_call')",
            account,
            phone,
            name,
            datetime(2024, 5, 1, tzinfo=UTC),
            datetime(2024, 5, 2, tzinfo=UTC),
            business,
            interest,
            score,
            stage,
            qualified,
            "Перезвонить",
            "because",
            json.dumps([{"from": "client", "text": "Здравствуйте"}]),
            "VIP" if score > 80 else None,
        )


async def execute(dsn: str, sql: str, *args: Any) -> None:
    """One statement (or script) on its own connection."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql, *args)
    finally:
        await conn.close()


async def fetch(dsn: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()
