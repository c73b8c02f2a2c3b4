"""Expression indexes that make per-contact reads of Evolution's "Message" table fast.

Evolution indexes "Message" only on "instanceId", so reading one contact's dialog scans the
instance's whole history. These two indexes are opt-in (the database is Evolution's):

- `crm_message_contact_idx`: instance, contact phone JID, newest first — the dialog query;
- `crm_message_lid_idx` (partial, LID-addressed rows only): instance, LID — the LID-only
  messages of a contact, and the LID-to-phone map of the contacts aggregate.

Both are built with CREATE INDEX CONCURRENTLY, so Evolution keeps writing meanwhile.
"""

from __future__ import annotations

from typing import Any

import asyncpg
from loguru import logger

from service.adapters.evolution.identity import lid_jid_sql, phone_jid_sql
from service.adapters.evolution.reader import quote_ident

CONTACT_INDEX = "crm_message_contact_idx"
LID_INDEX = "crm_message_lid_idx"


def index_statements(schema: str) -> list[tuple[str, str]]:
    """(index name, CREATE statement) pairs, in the order they should be built."""
    table = f'{quote_ident(schema)}."Message"'
    phone = phone_jid_sql('"key"')
    lid = lid_jid_sql('"key"')
    return [
        (
            CONTACT_INDEX,
            f'CREATE INDEX CONCURRENTLY IF NOT EXISTS "{CONTACT_INDEX}" ON {table} '
            f'("instanceId", ({phone}), "messageTimestamp" DESC)',
        ),
        (
            LID_INDEX,
            f'CREATE INDEX CONCURRENTLY IF NOT EXISTS "{LID_INDEX}" ON {table} '
            f'("instanceId", ({lid})) WHERE ({lid}) IS NOT NULL',
        ),
    ]


def index_sql(schema: str) -> str:
    """The SQL an operator can run by hand (each statement outside a transaction)."""
    lines = [
        "-- crm-backend: indexes for fast per-contact reads of Evolution's messages.",
        "-- Run each statement on its own (CONCURRENTLY cannot run inside a transaction).",
    ]
    lines.extend(f"{statement};" for _, statement in index_statements(schema))
    return "\n".join(lines) + "\n"


async def apply_index(dsn: str, schema: str) -> bool:
    """Create the indexes that are missing (or were left invalid by an interrupted build).

    Returns whether anything was created. Needs a role that may create indexes on
    Evolution's "Message" table.
    """
    quoted = quote_ident(schema)
    conn: asyncpg.Connection[Any] = await asyncpg.connect(dsn)
    created = False
    try:
        for name, statement in index_statements(schema):
            state = await _index_state(conn, schema, name)
            if state == "valid":
                continue
            if state == "invalid":
                # A failed CONCURRENTLY build leaves an invalid index that IF NOT EXISTS
                # would keep forever.
                await conn.execute(f'DROP INDEX CONCURRENTLY IF EXISTS {quoted}."{name}"')
            logger.info("creating index on Evolution messages", index=name, schema=schema)
            # No arguments: sent as a simple query, outside any transaction block.
            await conn.execute(statement)
            created = True
        if created:
            # Statistics on the index expressions let the planner see how selective a
            # contact is; only the table's owner may collect them.
            try:
                await conn.execute(f'ANALYZE {quoted}."Message"')
            except asyncpg.InsufficientPrivilegeError:
                logger.warning("could not ANALYZE Evolution messages (not the owner)")
    finally:
        await conn.close()
    return created


async def index_present(conn: asyncpg.Connection[Any], schema: str) -> bool:
    """Whether both indexes exist and are valid."""
    for name, _ in index_statements(schema):
        if await _index_state(conn, schema, name) != "valid":
            return False
    return True


async def _index_state(conn: asyncpg.Connection[Any], schema: str, name: str) -> str:
    valid = await conn.fetchval(
        "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname = $2",
        schema,
        name,
    )
    if valid is None:
        return "missing"
    return "valid" if valid else "invalid"
