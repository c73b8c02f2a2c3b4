"""What only events tell, kept; what events claim, checked against Evolution's DB.

Rows and bodies as evolution-foundation/evolution-api builds them
(`src/api/integrations/channel/whatsapp/whatsapp.baileys.service.ts`, 2.3.7):
- `messageHandle['messages.update']`, revoke branch (`update.message === null`, no
  status): posts `messages.delete` and writes a "MessageUpdate" row with status
  `status[update.status] ?? 'SERVER_ACK'`, which on the business's own message reads like
  an acknowledgement (`tests.evolution_writes.revoke`);
- `messageHandle['messages.upsert']`, protocolMessage branch: posts `messages.edited`, then
  rewrites the stored row (`tests.evolution_writes.edit`); a forged edit is the same body
  with no row rewritten.
On the real PostgreSQL and RabbitMQ, with the rules analyzer.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import asyncpg
import msgspec
import pytest

from service.adapters.evolution.reader import EvolutionReader
from service.adapters.evolution.resolver import ContactResolver
from service.adapters.stores.factory import open_store
from service.config import Settings
from service.usecases.backfill import BackfillOptions, run_backfill
from service.usecases.intake import Accepted, parse_webhook
from tests.evolution_writes import edit, revoke
from tests.harness import INSTANCE, running_service
from tests.test_evolution_changes import (
    DIALOG,
    LID,
    PHONE,
    dialog_bodies,
    lid_only,
    paired,
    score_of,
    set_owner,
    stored_dialog,
)

REPLY = DIALOG[3][1]  # the business's own reply, deleted for everyone from the phone


@pytest.fixture
def settings(service_settings: Settings) -> Settings:
    return service_settings


async def deleted_records(settings: Settings) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(settings.results_database_url)
    try:
        return await conn.fetch(
            "SELECT user_account_id, instance_name, remote_jid, message_id "
            "FROM crm_deleted_messages ORDER BY message_id"
        )
    finally:
        await conn.close()


async def test_own_delete_on_2_3_7_stays_deleted_in_later_reads(
    settings: Settings, account: uuid.UUID
) -> None:
    """The business deletes its reply from the phone: Evolution's DB keeps only a
    SERVER_ACK "MessageUpdate" on a fromMe message; the next full re-read and a backfill
    must not count it again."""
    async with running_service(settings) as svc:
        bodies = dialog_bodies()
        row = await stored_dialog(svc, bodies)
        assert row.outgoing_count == 2
        reply_id = bodies[3]["data"]["key"]["id"]
        conn = await svc.evolution_conn()
        try:
            deleted = await revoke(conn, INSTANCE, reply_id, version="2.3.7")
        finally:
            await conn.close()
        assert await svc.send(deleted, store=False) == 200
        row = await svc.wait_row(PHONE, lambda r: r.outgoing_count == 1)
        assert all(m["text"] != REPLY for m in row.messages or [])
        assert [(r["instance_name"], r["message_id"]) for r in await deleted_records(settings)] == [
            (INSTANCE, reply_id)
        ]

        pipeline = svc.ctx.pipeline
        await pipeline.analyze_contact(INSTANCE, PHONE, account, force=True)
        assert svc.ctx.reader is not None
        stats = await run_backfill(
            pipeline,
            svc.ctx.reader,
            BackfillOptions(instance=INSTANCE, account=account, min_incoming=1, force=True),
        )
        assert stats.analyzed == 1
        row = await svc.wait_row(PHONE)
        assert (row.incoming_count, row.outgoing_count) == (4, 1)
        assert all(m["text"] != REPLY for m in row.messages or [])

        # The record is the account's: another account's lead of the chat ignores it.
        store = svc.ctx.store
        jid = f"{PHONE}@s.whatsapp.net"
        assert await store.deleted_ids(account, INSTANCE, jid) == {reply_id}
        assert await store.deleted_ids(uuid.uuid4(), INSTANCE, jid) == set()


async def test_forged_edit_cannot_rewrite_a_dialog_the_db_holds(settings: Settings) -> None:
    """A `messages.edited` with a valid token for a message Evolution never rewrote: the
    stored row is the truth, the event's text is ignored."""
    async with running_service(settings) as svc:
        bodies = dialog_bodies()
        assert score_of(await stored_dialog(svc, bodies)) == ("deal_lost", 35, "cold")
        conn = await svc.evolution_conn()
        try:
            forged, forged_update = await edit(
                conn,
                INSTANCE,
                bodies[-1]["data"]["key"]["id"],
                "Берём пакет, оплата сегодня",
                edited_at=int(time.time()),
                version="2.3.7",
                write_db=False,
            )
        finally:
            await conn.close()
        for body in (forged, forged_update):
            assert await svc.send(body, store=False) == 200
        await svc.wait_idle()
        row = await svc.wait_row(PHONE)
        assert score_of(row) == ("deal_lost", 35, "cold")
        texts = [m["text"] for m in row.messages or []]
        assert "Берём пакет, оплата сегодня" not in texts
        assert DIALOG[-1][1] in texts


async def test_forged_delete_of_a_message_the_db_does_not_hold_is_not_recorded(
    settings: Settings,
) -> None:
    """A `messages.delete` naming an id that is not in this contact's stored chat (another
    chat's message, or none): no record, no change. A real one is recorded."""
    async with running_service(settings) as svc:
        bodies = dialog_bodies()
        other = dialog_bodies("77017009988")
        for body in other:
            await svc.store_message(body)
        assert score_of(await stored_dialog(svc, bodies)) == ("deal_lost", 35, "cold")
        key = bodies[-1]["data"]["key"]
        for forged_id in (other[0]["data"]["key"]["id"], "3EB0NOTSTORED0001"):
            # The revoke's body ({ ...key, status: 'DELETED' }) with another id.
            data = {**key, "id": forged_id, "status": "DELETED"}
            forged = {**bodies[-1], "event": "messages.delete", "data": data}
            assert await svc.send(forged, store=False) == 200
        await svc.wait_idle()
        assert await deleted_records(settings) == []
        assert score_of(await svc.wait_row(PHONE)) == ("deal_lost", 35, "cold")

        conn = await svc.evolution_conn()
        try:
            real = await revoke(conn, INSTANCE, key["id"], version="2.3.7")
        finally:
            await conn.close()
        assert await svc.send(real, store=False) == 200
        row = await svc.wait_row(PHONE, lambda r: r.funnel_stage == "qualified")
        assert score_of(row) == ("qualified", 65, "warm")
        assert [r["message_id"] for r in await deleted_records(settings)] == [
            bodies[-1]["data"]["key"]["id"]
        ]


def _event(body: dict[str, Any]) -> Any:
    parsed = parse_webhook(msgspec.json.encode(body))
    assert isinstance(parsed, Accepted)
    (event,) = parsed.events
    return event


async def test_lid_pair_seen_by_one_process_resolves_in_another(settings: Settings) -> None:
    """Two consumer processes (two resolvers with their own memory), Evolution's DB without
    the pair: the pair one saw resolves the other's LID-only event."""
    await set_owner(settings)
    t0 = int(time.time()) - 600
    store = await open_store(settings)
    reader = await EvolutionReader.connect(settings.evolution_dsn())
    try:
        first = ContactResolver(reader, pairs=store)
        second = ContactResolver(reader, pairs=store)
        lone = _event(lid_only("3EB0LIDX1", "Здравствуйте", t0))
        assert await second.resolve(lone) is None
        await first.remember(_event(paired("3EB0LIDX2", "Сколько стоит?", t0 + 10)))
        assert await second.resolve(lone) == f"{PHONE}@s.whatsapp.net"
        # Scoped to the instance's account: an unmapped instance neither stores nor finds.
        assert await store.remember_lid("unmapped-instance", LID, "1@s.whatsapp.net") is False
        assert await store.lid_phone("unmapped-instance", LID) is None
    finally:
        await reader.close()
        await store.close()


async def test_backfill_counts_unpaired_lid_only_chats(
    settings: Settings, account: uuid.UUID
) -> None:
    await set_owner(settings)
    t0 = int(time.time()) - 600
    async with running_service(settings, consume=False) as svc:
        for body in dialog_bodies():
            await svc.store_message(body)
        await svc.store_message(lid_only("3EB0LIDU1", "Здравствуйте", t0))
        await svc.store_message(lid_only("3EB0LIDU2", "Есть кто?", t0 + 5))
        assert svc.ctx.reader is not None
        stats = await run_backfill(
            svc.ctx.pipeline,
            svc.ctx.reader,
            BackfillOptions(instance=INSTANCE, account=account, min_incoming=1),
        )
        assert (stats.total, stats.unpaired_lid_chats) == (1, 1)
        # Once a stored message pairs the LID with the phone, it is no longer unpaired.
        await svc.store_message(paired("3EB0LIDU3", "Это я", t0 + 10))
        assert await svc.ctx.reader.unpaired_lid_chats(INSTANCE) == 0
