"""Rows and webhook bodies of deletes and edits, written as Evolution's own code writes them.

Mirrors `src/api/integrations/channel/whatsapp/whatsapp.baileys.service.ts` of
evolution-foundation/evolution-api:

- `messageHandle['messages.update']`: a revoke (`update.message === null`, no status)
  posts `messages.delete` with `{ ...key, status: 'DELETED' }` and writes a
  "MessageUpdate" row whose status is `status[update.status] ?? 'DELETED'` (2.3.1–2.3.6)
  or `?? 'SERVER_ACK'` (2.3.7, 2.4.0-rc2); an edit's update (`update.message =
  {editedMessage: {message: …}}`, no status) posts `messages.update` and writes a row
  with that same default status;
- `messageHandle['messages.upsert']`, protocolMessage branch: posts `messages.edited`
  with the protocolMessage (its key in the sender's perspective), then rewrites the
  stored message (`message` := editedMessage, `messageTimestamp` := the edit's time,
  `status: 'EDITED'`) and writes a "MessageUpdate" row with status EDITED;
- `deleteMessage` (DELETE /chat/deleteMessageForEveryone): with
  DATABASE_DELETE_MESSAGE=true sets `key.deleted = true`, `status: 'DELETED'` and writes a
  DELETED "MessageUpdate" row, else deletes the row; then posts `messages.delete` with the
  stored message (`id` = the database id).
"""

from __future__ import annotations

from typing import Any

import asyncpg
import msgspec

from service.adapters.evolution.seed import new_id

OWNER = "77015550101@s.whatsapp.net"  # the instance's own number (`sender`, ownerJid)


def _envelope(event: str, instance: str, data: Any) -> dict[str, Any]:
    return {
        "event": event,
        "instance": instance,
        "data": data,
        "destination": "http://crm/webhooks/evolution",
        "date_time": "2026-10-03T09:14:06.512Z",
        "sender": OWNER,
        "server_url": "https://evo.example.com",
        "apikey": None,
    }


async def stored_message(conn: asyncpg.Connection[Any], key_id: str) -> asyncpg.Record:
    """getMessage(key, true): the first stored row with that WhatsApp id."""
    row = await conn.fetchrow(
        'SELECT id, "key", "instanceId", "messageType", "messageTimestamp", "pushName", '
        'message, status FROM "Message" WHERE "key"->>\'id\' = $1 LIMIT 1',
        key_id,
    )
    assert row is not None, key_id
    return row


async def message_update_row(
    conn: asyncpg.Connection[Any], row: asyncpg.Record, status: str
) -> None:
    key = msgspec.json.decode(row["key"]) if isinstance(row["key"], str) else row["key"]
    await conn.execute(
        'INSERT INTO "MessageUpdate" (id, "keyId", "remoteJid", "fromMe", participant, '
        'status, "messageId", "instanceId") VALUES ($1, $2, $3, $4, NULL, $5, $6, $7)',
        new_id(),
        key["id"],
        key["remoteJid"],
        bool(key.get("fromMe")),
        status,
        row["id"],
        row["instanceId"],
    )


def revoke_status(version: str) -> str:
    """The status the revoke's "MessageUpdate" row gets in that Evolution version."""
    return "DELETED" if version < "2.3.7" else "SERVER_ACK"


async def revoke(
    conn: asyncpg.Connection[Any], instance: str, key_id: str, *, version: str
) -> dict[str, Any]:
    """A contact's "delete for everyone": the row stays, a "MessageUpdate" row is added,
    and the `messages.delete` body (the key, flattened) is returned."""
    row = await stored_message(conn, key_id)
    await message_update_row(conn, row, revoke_status(version))
    key = msgspec.json.decode(row["key"]) if isinstance(row["key"], str) else row["key"]
    return _envelope("messages.delete", instance, {**key, "status": "DELETED"})


async def api_delete(
    conn: asyncpg.Connection[Any], instance: str, key_id: str, *, logical: bool
) -> dict[str, Any]:
    """deleteMessage through Evolution's API; returns the `messages.delete` body."""
    row = await stored_message(conn, key_id)
    key = msgspec.json.decode(row["key"]) if isinstance(row["key"], str) else row["key"]
    if logical:
        key = {**key, "deleted": True}
        await conn.execute(
            'UPDATE "Message" SET "key" = $2::jsonb, status = \'DELETED\' WHERE id = $1',
            row["id"],
            msgspec.json.encode(key).decode(),
        )
        await message_update_row(conn, row, "DELETED")
    else:
        await conn.execute('DELETE FROM "Message" WHERE id = $1', row["id"])
    return _envelope(
        "messages.delete",
        instance,
        {
            "id": row["id"],
            "instanceId": row["instanceId"],
            "key": key,
            "messageType": row["messageType"],
            "status": "DELETED",
            "messageTimestamp": row["messageTimestamp"],
            "pushName": row["pushName"],
            "message": msgspec.json.decode(row["message"]),
        },
    )


async def edit(
    conn: asyncpg.Connection[Any],
    instance: str,
    key_id: str,
    new_text: str,
    *,
    edited_at: int,
    version: str,
    write_db: bool = True,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A contact edits its message: returns the (`messages.edited`, `messages.update`)
    bodies, after writing the rows Evolution writes (unless `write_db` is off, as when
    Evolution posts the webhook before its database update)."""
    row = await stored_message(conn, key_id)
    key = msgspec.json.decode(row["key"]) if isinstance(row["key"], str) else row["key"]
    edited_message = {"conversation": new_text}
    if write_db:
        await conn.execute(
            'UPDATE "Message" SET message = $2::jsonb, "messageTimestamp" = $3, '
            "status = 'EDITED' WHERE id = $1",
            row["id"],
            msgspec.json.encode(edited_message).decode(),
            edited_at,
        )
        await message_update_row(conn, row, "EDITED")
        await message_update_row(conn, row, revoke_status(version))
    # The protocolMessage as the contact sent it: the key names the chat from the
    # sender's side (the business, fromMe true).
    protocol = {
        "key": {"remoteJid": OWNER, "fromMe": True, "id": key_id},
        "type": "MESSAGE_EDIT",
        "editedMessage": edited_message,
        "timestampMs": str(edited_at * 1000),
    }
    update = {
        "keyId": key_id,
        "remoteJid": key["remoteJid"],
        "fromMe": bool(key.get("fromMe")),
        "participant": None,
        "status": revoke_status(version),
        "instanceId": row["instanceId"],
        "message": {"editedMessage": {"message": edited_message}},
        "messageId": row["id"],
    }
    return (
        _envelope("messages.edited", instance, protocol),
        _envelope("messages.update", instance, update),
    )
