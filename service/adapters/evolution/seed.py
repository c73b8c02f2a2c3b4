"""Evolution-shaped test and demo data: the tables, an instance, and its messages.

Writes rows the way Evolution's Prisma client does (client-side ids, UTC wall-clock
timestamps, the webhook's `data` stored as one "Message" row). Used by the tests, the demo
and the benchmarks; the service itself never writes to Evolution's database.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from importlib import resources
from typing import Any

import asyncpg
import msgspec

from service.adapters.evolution.reader import quote_ident

_SOURCES = frozenset({"ios", "android", "web", "unknown", "desktop"})
_MESSAGE_COLUMNS = (
    "id",
    "key",
    "pushName",
    "participant",
    "messageType",
    "message",
    "contextInfo",
    "source",
    "messageTimestamp",
    "instanceId",
    "status",
)
_json = msgspec.json.Encoder()


def schema_sql() -> str:
    """Evolution's DDL for the tables this service reads (packaged copy)."""
    return resources.files("service.adapters.evolution").joinpath("schema.sql").read_text("utf-8")


def new_id() -> str:
    """A unique, roughly time-ordered text id in the spirit of Prisma's cuid()."""
    return f"c{time.time_ns() // 1000:x}{secrets.token_hex(6)}"


@asynccontextmanager
async def _connection(
    conn_or_dsn: asyncpg.Connection[Any] | str,
) -> AsyncIterator[asyncpg.Connection[Any]]:
    if isinstance(conn_or_dsn, str):
        conn = await asyncpg.connect(conn_or_dsn)
        try:
            yield conn
        finally:
            await conn.close()
    else:
        yield conn_or_dsn


async def create_schema(conn_or_dsn: asyncpg.Connection[Any] | str, schema: str = "public") -> bool:
    """Create Evolution's tables in `schema` unless a "Message" table is already there.

    Returns whether anything was created.
    """
    quoted = quote_ident(schema)
    async with _connection(conn_or_dsn) as conn:
        exists = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", f'{quoted}."Message"')
        if exists:
            return False
        async with conn.transaction():
            await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quoted}")
            # SET LOCAL keeps the search path change inside this transaction.
            await conn.execute(f"SET LOCAL search_path TO {quoted}")
            await conn.execute(schema_sql())
        return True


async def create_instance(
    conn_or_dsn: asyncpg.Connection[Any] | str,
    name: str,
    *,
    instance_id: str | None = None,
    schema: str = "public",
) -> str:
    """Ensure an "Instance" row named `name`; returns its id."""
    table = f'{quote_ident(schema)}."Instance"'
    async with _connection(conn_or_dsn) as conn:
        await conn.execute(
            f'INSERT INTO {table} (id, name, "connectionStatus", "updatedAt") '  # noqa: S608
            "VALUES ($1, $2, 'open', now() AT TIME ZONE 'UTC') ON CONFLICT DO NOTHING",
            instance_id or new_id(),
            name,
        )
        sql = f"SELECT id FROM {table} WHERE name = $1"  # noqa: S608
        found: str = await conn.fetchval(sql, name)
        return found


def dialog_key_id(dialog_id: str, index: int) -> str:
    """Stable WhatsApp-like message id of a sample dialog's n-th message."""
    digest = hashlib.blake2s(f"{dialog_id}/{index}".encode(), digest_size=10).hexdigest()
    return "3EB0" + digest.upper()


def dialog_rows(instance_id: str, dialog: Mapping[str, Any]) -> list[tuple[Any, ...]]:
    """ "Message" rows of one dialogs.json item (text messages, phone-addressed)."""
    contact = dialog["contact"]
    phone = str(contact["phone"])
    push_name = contact.get("push_name")
    rows: list[tuple[Any, ...]] = []
    for index, message in enumerate(dialog["messages"]):
        from_me = bool(message["from_me"])
        key = {
            "remoteJid": f"{phone}@s.whatsapp.net",
            "fromMe": from_me,
            "id": dialog_key_id(str(dialog.get("id", phone)), index),
        }
        rows.append(
            (
                new_id(),
                _json.encode(key).decode(),
                "Você" if from_me else push_name,
                None,
                "conversation",
                _json.encode({"conversation": message["text"]}).decode(),
                None,
                "web" if from_me else "android",
                _unix(message["ts"]),
                instance_id,
                "SERVER_ACK" if from_me else "DELIVERY_ACK",
            )
        )
    return rows


async def load_dialogs(
    conn_or_dsn: asyncpg.Connection[Any] | str,
    instance: str,
    dialogs: Iterable[Mapping[str, Any]],
    *,
    schema: str = "public",
) -> int:
    """Store sample dialogs (dialogs.json items) as an instance's messages; returns rows."""
    async with _connection(conn_or_dsn) as conn:
        instance_id = await create_instance(conn, instance, schema=schema)
        rows = [row for dialog in dialogs for row in dialog_rows(instance_id, dialog)]
        await insert_rows(conn, rows, schema=schema)
        return len(rows)


async def insert_rows(
    conn: asyncpg.Connection[Any], rows: Sequence[tuple[Any, ...]], *, schema: str = "public"
) -> None:
    """Bulk-insert "Message" rows (tuples in `_MESSAGE_COLUMNS` order) with COPY."""
    if rows:
        await conn.copy_records_to_table(
            "Message", records=rows, columns=_MESSAGE_COLUMNS, schema_name=schema
        )


async def insert_webhook_message(
    conn: asyncpg.Connection[Any], body: Mapping[str, Any], *, schema: str = "public"
) -> int:
    """Store a webhook body's message(s) as Evolution does; returns rows written.

    Bodies without a message (`connection.update`, …) write nothing. The instance row is
    created when missing, with the id the body's `data.instanceId` names.
    """
    data = body.get("data")
    items = data if isinstance(data, list) else [data]
    messages = [m for m in items if isinstance(m, Mapping) and isinstance(m.get("key"), Mapping)]
    if not messages:
        return 0
    instance = str(body.get("instance") or "")
    if not instance:
        raise ValueError("webhook body has no instance name")
    instance_id = await create_instance(
        conn, instance, instance_id=_text(messages[0].get("instanceId")), schema=schema
    )
    await insert_rows(conn, [_webhook_row(instance_id, m) for m in messages], schema=schema)
    return len(messages)


def _webhook_row(instance_id: str, data: Mapping[str, Any]) -> tuple[Any, ...]:
    key = data["key"]
    message = data.get("message")
    context = data.get("contextInfo")
    source = data.get("source")
    return (
        new_id(),
        _json.encode(key).decode(),
        _text(data.get("pushName")),
        _text(key.get("participant")),
        _text(data.get("messageType")) or "unknown",
        _json.encode(message if message is not None else {}).decode(),
        None if context is None else _json.encode(context).decode(),
        source if source in _SOURCES else "unknown",
        _timestamp(data.get("messageTimestamp")),
        instance_id,
        _text(data.get("status")),
    )


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _timestamp(value: Any) -> int:
    """Unix seconds from the shapes Evolution uses: int, numeric string or {low, high}."""
    if isinstance(value, Mapping):
        low, high = value.get("low", 0), value.get("high", 0)
        if isinstance(low, int) and isinstance(high, int):
            return (high << 32) | (low & 0xFFFFFFFF)
        return int(time.time())
    if isinstance(value, bool):
        return int(time.time())
    if isinstance(value, int | float):
        return int(value)
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return int(time.time())


def _unix(ts: Any) -> int:
    if isinstance(ts, int | float):
        return int(ts)
    return int(datetime.fromisoformat(str(ts).replace("Z", "+00:00")).timestamp())
