"""The Evolution reader on a real PostgreSQL holding Evolution's own tables."""

from __future__ import annotations

import copy
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from service.adapters.evolution.identity import phone_jid, phone_jid_sql
from service.adapters.evolution.index import CONTACT_INDEX, LID_INDEX, apply_index, index_sql
from service.adapters.evolution.reader import EvolutionReader, EvolutionUnavailableError, dialog_sql
from service.adapters.evolution.seed import (
    create_instance,
    create_schema,
    dialog_key_id,
    insert_webhook_message,
    load_dialogs,
)
from service.domain.dialog import ContactSummary

INSTANCE = "clinic-sales"  # the instance named by the webhook examples


# -- helpers -----------------------------------------------------------------------------
def _unix(ts: str) -> int:
    return int(datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp())


def expected_contacts(dialogs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """What the aggregate must say about each dev dialog, computed independently."""
    out: dict[str, dict[str, Any]] = {}
    for dialog in dialogs:
        msgs = [
            (_unix(m["ts"]), dialog_key_id(dialog["id"], i), m["from_me"])
            for i, m in enumerate(dialog["messages"])
        ]
        incoming = sum(1 for m in msgs if not m[2])
        out[dialog["contact"]["phone"]] = {
            "incoming": incoming,
            "outgoing": len(msgs) - incoming,
            "first": min(m[0] for m in msgs),
            "last": max(m[0] for m in msgs),
            "last_id": max(msgs)[1],
            "name": dialog["contact"]["push_name"] if incoming else None,
        }
    return out


def body(
    remote_jid: str,
    key_id: str,
    ts: int,
    *,
    text: str = "hello",
    from_me: bool = False,
    push: str | None = "Марат",
    message_type: str = "conversation",
    message: dict[str, Any] | None = None,
    status: str = "DELIVERY_ACK",
    **key: Any,
) -> dict[str, Any]:
    """A messages.upsert webhook body (as Evolution stores and posts it)."""
    return {
        "event": "messages.upsert",
        "instance": INSTANCE,
        "data": {
            "key": {"remoteJid": remote_jid, "fromMe": from_me, "id": key_id, **key},
            "pushName": push,
            "status": status,
            "message": message if message is not None else {"conversation": text},
            "messageType": message_type,
            "messageTimestamp": ts,
            "instanceId": "cm1x2y3z40000abcd1234efgh",
            "source": "android",
        },
    }


async def store(dsn: str, *bodies: dict[str, Any]) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for item in bodies:
            await insert_webhook_message(conn, item)
    finally:
        await conn.close()


@pytest.fixture
async def reader(evolution_dsn: str) -> AsyncIterator[EvolutionReader]:
    evo = await EvolutionReader.connect(evolution_dsn)
    try:
        yield evo
    finally:
        await evo.close()


@pytest.fixture
async def dev_dsn(evolution_dsn: str, dialogs: list[dict[str, Any]]) -> str:
    """The Evolution DB with the labeled dev dialogs stored as instance `clinic-sales`."""
    await load_dialogs(evolution_dsn, INSTANCE, dialogs)
    return evolution_dsn


async def all_contacts(reader: EvolutionReader, **kwargs: Any) -> list[ContactSummary]:
    return [c async for c in reader.iter_contacts(INSTANCE, **kwargs)]


# -- contacts ----------------------------------------------------------------------------
async def test_contacts_match_the_dialogs(
    dev_dsn: str, reader: EvolutionReader, dialogs: list[dict[str, Any]]
) -> None:
    expected = expected_contacts(dialogs)
    listed = await reader.contacts(INSTANCE, min_incoming=3)
    wanted = {phone for phone, e in expected.items() if e["incoming"] >= 3}
    assert {c.contact.phone for c in listed} == wanted
    assert len(wanted) < len(expected)  # the threshold really filtered something
    for summary in listed:
        e = expected[summary.contact.phone]
        assert summary.contact.remote_jid == f"{summary.contact.phone}@s.whatsapp.net"
        assert (summary.incoming_count, summary.outgoing_count) == (e["incoming"], e["outgoing"])
        assert summary.first_message_at == datetime.fromtimestamp(e["first"], UTC)
        assert summary.last_message_at == datetime.fromtimestamp(e["last"], UTC)
        assert summary.last_message_id == e["last_id"]
        assert summary.contact.name == e["name"]
    # Newest last message first (ties: phone, descending).
    keys = [(c.last_message_at, c.contact.remote_jid) for c in listed]
    assert keys == sorted(keys, reverse=True)


async def test_limit_keeps_the_newest_and_streaming_matches(
    dev_dsn: str, reader: EvolutionReader
) -> None:
    full = await reader.contacts(INSTANCE, min_incoming=1)
    assert await reader.contacts(INSTANCE, min_incoming=1, limit=5) == full[:5]
    assert await all_contacts(reader, min_incoming=1, page_size=3) == full
    assert await all_contacts(reader, min_incoming=1, limit=7, page_size=3) == full[:7]
    assert await reader.contacts(INSTANCE, min_incoming=1, limit=0) == []


async def test_min_incoming_zero_includes_outgoing_only_contacts(
    dev_dsn: str, reader: EvolutionReader, dialogs: list[dict[str, Any]]
) -> None:
    expected = expected_contacts(dialogs)
    listed = {c.contact.phone: c for c in await reader.contacts(INSTANCE, min_incoming=0)}
    assert set(listed) == set(expected)
    silent = [phone for phone, e in expected.items() if e["incoming"] == 0]
    assert silent, "the dev set has contacts who never wrote"
    for phone in silent:
        assert listed[phone].incoming_count == 0 and listed[phone].contact.name is None


async def test_since_keeps_contacts_active_from_then(
    dev_dsn: str, reader: EvolutionReader, dialogs: list[dict[str, Any]]
) -> None:
    expected = expected_contacts(dialogs)
    lasts = sorted({e["last"] for e in expected.values()})
    cut = lasts[len(lasts) // 2]
    since = datetime.fromtimestamp(cut, UTC)
    listed = await reader.contacts(INSTANCE, min_incoming=0, since=since)
    assert {c.contact.phone for c in listed} == {
        phone for phone, e in expected.items() if e["last"] >= cut
    }
    # Counts still cover the whole history, not only messages after `since`.
    for c in listed:
        assert c.incoming_count == expected[c.contact.phone]["incoming"]
    naive = await reader.contacts(INSTANCE, min_incoming=0, since=since.replace(tzinfo=None))
    assert naive == listed


# -- dialog ------------------------------------------------------------------------------
async def test_dialog_text_order_and_limit(
    dev_dsn: str, reader: EvolutionReader, dialogs: list[dict[str, Any]]
) -> None:
    longest = max(dialogs, key=lambda d: len(d["messages"]))
    phone = longest["contact"]["phone"]
    full = await reader.dialog(INSTANCE, phone, limit=1000)
    assert full is not None
    assert [m.text for m in full.messages] == [m["text"] for m in longest["messages"]]
    assert [m.from_me for m in full.messages] == [m["from_me"] for m in longest["messages"]]
    assert full.messages[0].type == "conversation"
    assert full.messages[0].timestamp == datetime.fromisoformat(
        longest["messages"][0]["ts"].replace("Z", "+00:00")
    )
    assert full.contact.name == longest["contact"]["push_name"]

    newest = await reader.dialog(INSTANCE, f"+{phone[0]} ({phone[1:4]}) {phone[4:]}", limit=5)
    assert newest is not None
    assert newest.messages == full.messages[-5:]
    assert newest.last_message_id == full.last_message_id
    # Counts and first/last describe the whole history, not the five kept.
    assert newest.incoming_count + newest.outgoing_count == len(longest["messages"])
    assert (newest.first_message_at, newest.last_message_at) == (
        full.first_message_at,
        full.last_message_at,
    )


async def test_dialog_and_summary_agree(dev_dsn: str, reader: EvolutionReader) -> None:
    for summary in await reader.contacts(INSTANCE, min_incoming=0):
        dialog = await reader.dialog(INSTANCE, summary.contact.phone, limit=200)
        assert dialog is not None
        assert dialog.last_message_id == summary.last_message_id
        assert (dialog.incoming_count, dialog.outgoing_count) == (
            summary.incoming_count,
            summary.outgoing_count,
        )
        assert dialog.contact == summary.contact


async def test_unknown_instance_and_contact(dev_dsn: str, reader: EvolutionReader) -> None:
    assert await reader.instance_exists(INSTANCE)
    assert not await reader.instance_exists("nope")
    assert await reader.contacts("nope", min_incoming=0) == []
    assert [c async for c in reader.iter_contacts("nope", min_incoming=0)] == []
    assert await reader.dialog("nope", "77012345601", limit=10) is None
    assert await reader.dialog(INSTANCE, "70000000000", limit=10) is None
    assert await reader.dialog(INSTANCE, "", limit=10) is None


# -- Evolution's message forms -----------------------------------------------------------
async def test_duplicates_deleted_protocol_and_reactions_do_not_count(
    evolution_dsn: str, reader: EvolutionReader, webhook_bodies: dict[str, dict[str, Any]]
) -> None:
    text = webhook_bodies["messages-upsert-text-incoming"]
    phone = "77017654321"
    await store(
        evolution_dsn,
        text,
        copy.deepcopy(text),  # the same WhatsApp message stored twice
        webhook_bodies["messages-upsert-fromme-phone"],
        webhook_bodies["send-message-api"],
        body(
            f"{phone}@s.whatsapp.net",
            "PROTO1",
            1759483600,
            message_type="protocolMessage",
            message={"protocolMessage": {"type": 0, "key": {"id": "3EB0C431C26A1916E07E"}}},
        ),
        body(
            f"{phone}@s.whatsapp.net",
            "REACT1",
            1759483700,
            message_type="reactionMessage",
            message={"reactionMessage": {"text": "👍"}},
        ),
        body(f"{phone}@s.whatsapp.net", "GONE1", 1759483800, status="DELETED"),
        body(f"{phone}@s.whatsapp.net", "GONE2", 1759483900, deleted=True),
    )
    [summary] = await reader.contacts(INSTANCE, min_incoming=0)
    assert (summary.incoming_count, summary.outgoing_count) == (1, 2)
    assert summary.last_message_id == "BAE5F1E2D3C4B5A69788"  # protocol/reaction are not last
    assert summary.contact.name == "Айгерим"  # not "Você" nor the empty API sender name
    dialog = await reader.dialog(INSTANCE, phone, limit=50)
    assert dialog is not None
    assert [m.id for m in dialog.messages] == [
        "3EB0C431C26A1916E07E",
        "3EB0A1B2C3D4E5F60718",
        "BAE5F1E2D3C4B5A69788",
    ]
    assert (dialog.incoming_count, dialog.outgoing_count) == (1, 2)


async def test_groups_broadcast_and_newsletters_never_appear(
    evolution_dsn: str, reader: EvolutionReader, webhook_bodies: dict[str, dict[str, Any]]
) -> None:
    await store(
        evolution_dsn,
        webhook_bodies["messages-upsert-text-incoming"],
        webhook_bodies["messages-upsert-group"],  # participant 77019998877
        webhook_bodies["messages-upsert-status-broadcast"],  # participant 77017654321
        body(
            "120363999999999999@newsletter",
            "NEWS1",
            1759500300,
            senderPn="77019998877@s.whatsapp.net",
        ),
    )
    listed = await reader.contacts(INSTANCE, min_incoming=0)
    assert [c.contact.phone for c in listed] == ["77017654321"]
    assert listed[0].incoming_count == 1  # the status post of the same person is not a turn
    assert await reader.dialog(INSTANCE, "77019998877", limit=10) is None


async def test_lid_and_phone_forms_are_one_contact(
    evolution_dsn: str, reader: EvolutionReader, webhook_bodies: dict[str, dict[str, Any]]
) -> None:
    lid, phone = "181736458731542@lid", "77051112233"
    await store(
        evolution_dsn,
        webhook_bodies["messages-upsert-lid-addressed"],  # remoteJid LID, remoteJidAlt phone
        body(f"{phone}@s.whatsapp.net", "PHONE1", 1759500100, text="plain phone form"),
        body(lid, "SPN1", 1759500200, text="2.3.4 form", senderPn=f"{phone}@s.whatsapp.net"),
        body(
            f"{phone}@s.whatsapp.net",
            "V24",
            1759500300,
            text="2.4 form",
            from_me=True,
            push="Você",
            remoteJidAlt=lid,
        ),
        body(lid, "LIDONLY", 1759500400, text="LID only, no phone at all"),
        body(f"{phone}:12@s.whatsapp.net", "DEVICE", 1759500500, text="with a device part"),
        body("999999999@lid", "STRANGER", 1759500600, text="LID never seen with a phone"),
    )
    listed = await reader.contacts(INSTANCE, min_incoming=0)
    assert [c.contact.phone for c in listed] == [phone]
    [summary] = listed
    assert (summary.incoming_count, summary.outgoing_count) == (5, 1)
    assert summary.last_message_id == "DEVICE"
    assert summary.contact.name == "Марат"

    dialog = await reader.dialog(INSTANCE, phone, limit=50)
    assert dialog is not None
    assert [m.id for m in dialog.messages] == [
        "3EB05D6E7F8091A2B3C4",
        "PHONE1",
        "SPN1",
        "V24",
        "LIDONLY",
        "DEVICE",
    ]
    assert dialog.messages[0].text.startswith("Добрый вечер, я таргетолог")
    assert (dialog.incoming_count, dialog.outgoing_count) == (5, 1)
    assert dialog.last_message_id == summary.last_message_id


async def test_media_messages_read_as_text(
    evolution_dsn: str, reader: EvolutionReader, webhook_bodies: dict[str, dict[str, Any]]
) -> None:
    await store(
        evolution_dsn,
        webhook_bodies["messages-upsert-image-caption"],
        webhook_bodies["messages-upsert-audio-transcribed"],
        body(
            "79161234567@s.whatsapp.net",
            "ODD1",
            1759490400,
            push="Dr. Petrov",
            message_type="documentMessage",
            message={"documentMessage": {"fileName": {"0": 1}, "fileLength": {"low": 5}}},
        ),
    )
    dialog = await reader.dialog(INSTANCE, "79161234567", limit=10)
    assert dialog is not None
    assert [(m.type, m.text) for m in dialog.messages] == [
        (
            "imageMessage",
            "[image] Вот наш прайс на имплантацию, бюджет на рекламу около 200 тыс в месяц",
        ),
        ("audioMessage", "[audio] Да, я владелец, давайте созвонимся в четверг в 11"),
        ("documentMessage", "[document]"),
    ]
    assert dialog.contact.name == "Dr. Petrov"


async def test_phone_expression_matches_python(evolution_dsn: str) -> None:
    keys: list[dict[str, Any]] = [
        {"remoteJid": "77011234567@s.whatsapp.net"},
        {"remoteJid": "77011234567:3@s.whatsapp.net"},
        {"remoteJid": "1@lid", "remoteJidAlt": "77011234567@s.whatsapp.net"},
        {"remoteJid": "1@lid", "senderPn": "77011234567@s.whatsapp.net"},
        {"remoteJid": "1@lid"},
        {"remoteJid": "123@g.us", "participant": "77011234567@s.whatsapp.net"},
        {"remoteJid": "status@broadcast", "senderPn": "77011234567@s.whatsapp.net"},
        {"remoteJid": "1@newsletter"},
        {"remoteJid": "undefined@s.whatsapp.net", "remoteJidAlt": "7701@s.whatsapp.net"},
        {"remoteJid": "@s.whatsapp.net"},
        {"remoteJid": 77011234567, "remoteJidAlt": None},
        {},
    ]
    conn = await asyncpg.connect(evolution_dsn)
    try:
        got = await conn.fetch(
            f"SELECT {phone_jid_sql('k')} AS jid "
            "FROM unnest($1::jsonb[]) WITH ORDINALITY AS t(k, n) ORDER BY n",
            [json.dumps(k) for k in keys],
        )
    finally:
        await conn.close()
    assert [r["jid"] for r in got] == [phone_jid(k) for k in keys]
    assert [phone_jid(k) for k in keys][:4] == ["77011234567@s.whatsapp.net"] * 4


# -- the indexes -------------------------------------------------------------------------
async def test_index_is_used_and_changes_no_result(
    dev_dsn: str, reader: EvolutionReader, webhook_bodies: dict[str, dict[str, Any]]
) -> None:
    await store(dev_dsn, *webhook_bodies.values())  # LID, groups, broadcast too
    before_contacts = await reader.contacts(INSTANCE, min_incoming=0)
    phones = [c.contact.phone for c in before_contacts]
    before = [await reader.dialog(INSTANCE, p, limit=20) for p in phones]

    assert "CREATE INDEX CONCURRENTLY IF NOT EXISTS" in index_sql("public")
    assert await apply_index(dev_dsn, "public") is True
    assert await apply_index(dev_dsn, "public") is False  # already there

    assert await reader.contacts(INSTANCE, min_incoming=0) == before_contacts
    assert [await reader.dialog(INSTANCE, p, limit=20) for p in phones] == before

    conn = await asyncpg.connect(dev_dsn)
    try:
        # Plan as on a big instance: a sequential scan must look expensive.
        await conn.execute("SET enable_seqscan = off")
        plan = "\n".join(
            r[0]
            for r in await conn.fetch(
                f"EXPLAIN {dialog_sql('public')}",
                INSTANCE,
                ["protocolMessage"],
                "77051112233@s.whatsapp.net",
                10,
                ["", "Você"],
                ["3EB0DELETED"],  # deletes known from events
            )
        )
    finally:
        await conn.close()
    assert CONTACT_INDEX in plan
    assert LID_INDEX in plan


async def test_apply_index_replaces_an_invalid_index(dev_dsn: str) -> None:
    conn = await asyncpg.connect(dev_dsn)
    try:
        # What an interrupted CREATE INDEX CONCURRENTLY leaves behind.
        await conn.execute(f'CREATE INDEX "{CONTACT_INDEX}" ON "Message" ("instanceId")')
        await conn.execute(
            "UPDATE pg_index SET indisvalid = false WHERE indexrelid = $1::regclass",
            CONTACT_INDEX,
        )
        assert await apply_index(dev_dsn, "public") is True
        valid = await conn.fetchval(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = $1::regclass", CONTACT_INDEX
        )
        definition = await conn.fetchval("SELECT pg_get_indexdef($1::regclass)", CONTACT_INDEX)
    finally:
        await conn.close()
    assert valid is True
    assert "messageTimestamp" in definition


# -- schema and connection ---------------------------------------------------------------
async def test_auto_schema_finds_evolution_api(
    empty_db: str, dialogs: list[dict[str, Any]]
) -> None:
    assert await create_schema(empty_db, "evolution_api") is True
    assert await create_schema(empty_db, "evolution_api") is False
    await load_dialogs(empty_db, INSTANCE, dialogs[:3], schema="evolution_api")
    evo = await EvolutionReader.connect(empty_db)
    try:
        assert evo.schema == "evolution_api"
        listed = await evo.contacts(INSTANCE, min_incoming=0)
        assert {c.contact.phone for c in listed} == {d["contact"]["phone"] for d in dialogs[:3]}
        assert await evo.dialog(INSTANCE, dialogs[0]["contact"]["phone"], limit=5) is not None
    finally:
        await evo.close()
    assert await apply_index(empty_db, "evolution_api") is True
    explicit = await EvolutionReader.connect(empty_db, "public")
    try:
        assert explicit.schema == "public"
    finally:
        await explicit.close()


async def test_auto_schema_falls_back_to_public(evolution_dsn: str) -> None:
    await create_instance(evolution_dsn, INSTANCE)
    evo = await EvolutionReader.connect(evolution_dsn, "auto")
    try:
        assert evo.schema == "public"
        await evo.ping()
        assert await evo.instance_exists(INSTANCE)
    finally:
        await evo.close()


async def test_unreachable_database_is_a_clear_error() -> None:
    with pytest.raises(EvolutionUnavailableError) as caught:
        await EvolutionReader.connect(
            "postgresql://crm:s3cret-pass@127.0.0.1:1/evolution", connect_timeout=2
        )
    message = str(caught.value)
    assert message.startswith("cannot reach Evolution database at 127.0.0.1:1/evolution: ")
    assert "s3cret" not in message


async def test_missing_database_is_a_clear_error(evolution_dsn: str) -> None:
    dsn = evolution_dsn.rsplit("/", 1)[0] + "/crmt_no_such_db"
    with pytest.raises(EvolutionUnavailableError, match="crmt_no_such_db"):
        await EvolutionReader.connect(dsn)


async def test_abandoned_stream_leaves_the_pool_usable(
    dev_dsn: str, reader: EvolutionReader
) -> None:
    for _ in range(12):  # more than the pool's connections
        stream = reader.iter_contacts(INSTANCE, min_incoming=0, page_size=2)
        first = await anext(stream)
        await stream.aclose()
        assert first.contact.phone
    assert len(await reader.contacts(INSTANCE, min_incoming=0)) == 40


async def test_webhook_bodies_without_a_message_store_nothing(
    evolution_dsn: str, webhook_bodies: dict[str, dict[str, Any]]
) -> None:
    conn = await asyncpg.connect(evolution_dsn)
    try:
        assert await insert_webhook_message(conn, webhook_bodies["connection-update"]) == 0
        assert await insert_webhook_message(conn, webhook_bodies["send-message-api"]) == 1
        stored = await conn.fetchrow('SELECT * FROM "Message"')
        instance = await conn.fetchrow('SELECT * FROM "Instance"')
    finally:
        await conn.close()
    assert stored is not None and instance is not None
    assert instance["name"] == INSTANCE and stored["instanceId"] == instance["id"]
    assert stored["messageTimestamp"] == 1759483500
    assert stored["source"] == "unknown"
