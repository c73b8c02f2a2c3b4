"""Deletes, edits, wrapped non-turns, LID-only and own-number messages, end to end.

Rows and bodies are built as evolution-foundation/evolution-api builds them
(`src/api/integrations/channel/whatsapp/whatsapp.baileys.service.ts`; see
`tests/evolution_writes.py` for the functions mirrored), on the real PostgreSQL and
RabbitMQ, with the rules analyzer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from service.adapters.evolution.reader import EvolutionReader
from service.config import Settings
from service.usecases.intake import Accepted, Ignored, parse_webhook
from tests.evolution_writes import OWNER, api_delete, edit, revoke
from tests.harness import INSTANCE, message_body, running_service

PHONE = "77017001122"
# The dialog of the measurement: stored, it scores deal_lost / 35 / cold; without
# the last message (deleted for everyone) it is qualified / 65 / warm.
DIALOG = [
    (False, "Здравствуйте, я владелец стоматологической клиники в Алматы"),
    (True, "Добрый день! Расскажите, есть ли у вас отдел продаж и запускаете ли рекламу?"),
    (
        False,
        "Отдел продаж есть, рекламу сейчас не запускаем. Бюджет на рекламу 500 тыс тенге в месяц",
    ),
    (True, "Отлично, можем предложить консультацию по продвижению клиники"),
    (False, "Интересно, расскажите подробнее"),
    (False, "Нет, спасибо, мы уже выбрали другое агентство, не актуально"),
]


def dialog_bodies(phone: str = PHONE, start: int | None = None) -> list[dict[str, Any]]:
    t0 = start or int(time.time()) - 3600
    return [
        message_body(phone, text, from_me=fm, ts=t0 + 60 * i, msg_id=f"3EB0{phone[-4:]}{i:04d}")
        for i, (fm, text) in enumerate(DIALOG)
    ]


def score_of(row: Any) -> tuple[str | None, int | None, str | None]:
    return row.funnel_stage, row.score, row.interest_level


@pytest.fixture
def settings(service_settings: Settings) -> Settings:
    return service_settings


async def set_owner(settings: Settings) -> None:
    conn = await asyncpg.connect(settings.evolution_dsn())
    try:
        await conn.execute('UPDATE "Instance" SET "ownerJid" = $1 WHERE name = $2', OWNER, INSTANCE)
    finally:
        await conn.close()


@pytest.fixture
async def reader(settings: Settings) -> AsyncIterator[EvolutionReader]:
    evo = await EvolutionReader.connect(settings.evolution_dsn())
    yield evo
    await evo.close()


async def stored_dialog(svc: Any, bodies: list[dict[str, Any]]) -> Any:
    for body in bodies:
        assert await svc.send(body) == 200
    await svc.wait_idle()
    return await svc.wait_row(PHONE, lambda r: r.analyzer is not None)


# -- 3. deletes ---------------------------------------------------------------------------
@pytest.mark.parametrize("version", ["2.3.6", "2.3.7"])
async def test_delete_for_everyone_rescores_the_lead(settings: Settings, version: str) -> None:
    """The measurement: deal_lost / 35 / cold becomes qualified / 65 / warm once the
    contact deletes its last message (messages.update revoke branch)."""
    async with running_service(settings) as svc:
        bodies = dialog_bodies()
        row = await stored_dialog(svc, bodies)
        assert score_of(row) == ("deal_lost", 35, "cold")
        assert row.incoming_count == 4

        conn = await svc.evolution_conn()
        try:
            deleted = await revoke(conn, INSTANCE, bodies[-1]["data"]["key"]["id"], version=version)
        finally:
            await conn.close()
        assert await svc.send(deleted, store=False) == 200
        row = await svc.wait_row(PHONE, lambda r: r.funnel_stage == "qualified")
        assert score_of(row) == ("qualified", 65, "warm")
        assert row.incoming_count == 3
        assert all("другое агентство" not in m["text"] for m in row.messages or [])
        # The lead's history names the delete as the cause of the re-analysis.
        page = await svc.ctx.store.lead_history(row.user_account_id, row.id, 3, 0)
        assert page is not None
        assert {(e.field, e.from_, e.to, e.cause.kind) for e in page.history} == {
            ("funnel_stage", "deal_lost", "qualified", "delete"),
            ("score", 35, 65, "delete"),
            ("interest_level", "cold", "warm", "delete"),
        }
        assert {e.cause.analyzer for e in page.history} == {"rules"}


@pytest.mark.parametrize("logical", [True, False])
async def test_delete_through_evolutions_api(settings: Settings, logical: bool) -> None:
    """deleteMessage (DELETE /chat/deleteMessageForEveryone): key.deleted / status DELETED,
    or the row removed (DATABASE_DELETE_MESSAGE); its body names the database id."""
    async with running_service(settings) as svc:
        bodies = dialog_bodies()
        assert score_of(await stored_dialog(svc, bodies)) == ("deal_lost", 35, "cold")
        conn = await svc.evolution_conn()
        try:
            deleted = await api_delete(
                conn, INSTANCE, bodies[-1]["data"]["key"]["id"], logical=logical
            )
        finally:
            await conn.close()
        assert await svc.send(deleted, store=False) == 200
        row = await svc.wait_row(PHONE, lambda r: r.funnel_stage == "qualified")
        assert score_of(row) == ("qualified", 65, "warm")


async def test_reader_excludes_deleted_messages_in_dialog_and_aggregate(
    settings: Settings, reader: EvolutionReader
) -> None:
    """What the reader sees after each kind of delete, without any event."""
    t0 = int(time.time()) - 7200
    phones = {
        "2.3.6": "77017000001",
        "logical": "77017000002",
        "removed": "77017000003",
        "2.3.7": "77017000004",
    }
    async with running_service(settings, consume=False) as svc:
        for phone in phones.values():
            for body in dialog_bodies(phone, t0):
                await svc.store_message(body)
        conn = await svc.evolution_conn()
        try:
            last = {p: dialog_bodies(p, t0)[-1]["data"]["key"]["id"] for p in phones.values()}
            await revoke(conn, INSTANCE, last[phones["2.3.6"]], version="2.3.6")
            await revoke(conn, INSTANCE, last[phones["2.3.7"]], version="2.3.7")
            await api_delete(conn, INSTANCE, last[phones["logical"]], logical=True)
            await api_delete(conn, INSTANCE, last[phones["removed"]], logical=False)
        finally:
            await conn.close()
    summaries = {s.contact.phone: s for s in await reader.contacts(INSTANCE, min_incoming=1)}
    for phone in phones.values():
        dialog = await reader.dialog(INSTANCE, phone, limit=50)
        assert dialog is not None
        assert [m.text for m in dialog.messages] == [text for _, text in DIALOG[:-1]]
        assert (dialog.incoming_count, dialog.outgoing_count) == (3, 2)
        summary = summaries[phone]
        assert (summary.incoming_count, summary.outgoing_count) == (3, 2)
        assert summary.last_message_id == dialog.last_message_id


# -- 4. edits -----------------------------------------------------------------------------
@pytest.mark.parametrize("event", ["messages.edited", "messages.update"])
async def test_edit_rescores_with_the_new_text(settings: Settings, event: str) -> None:
    """The contact edits its refusal; Evolution posts the webhook, then rewrites the row
    (messages.upsert protocolMessage branch): by the analysis, DEBOUNCE_SECONDS later, the
    row holds the new text, which counts (the event's text is only a claim)."""
    async with running_service(settings) as svc:
        bodies = dialog_bodies()
        assert score_of(await stored_dialog(svc, bodies)) == ("deal_lost", 35, "cold")
        conn = await svc.evolution_conn()
        try:
            edited, updated = await edit(
                conn,
                INSTANCE,
                bodies[-1]["data"]["key"]["id"],
                "Да, давайте продолжим, нам интересно",
                edited_at=int(time.time()),
                version="2.3.7",
            )
        finally:
            await conn.close()
        assert await svc.send(edited if event == "messages.edited" else updated, store=False) == 200
        row = await svc.wait_row(PHONE, lambda r: r.funnel_stage != "deal_lost")
        assert score_of(row) == ("qualified", 65, "warm")
        texts = [m["text"] for m in row.messages or []]
        assert "Да, давайте продолжим, нам интересно" in texts
        assert row.incoming_count == 4


async def test_edited_message_stored_twice_counts_once(
    settings: Settings, reader: EvolutionReader
) -> None:
    """An older copy of an edited message may remain beside the rewritten one."""
    async with running_service(settings, consume=False) as svc:
        bodies = dialog_bodies()
        for body in bodies:
            await svc.store_message(body)
        await svc.store_message(bodies[-1])  # stored twice, as Evolution sometimes does
        conn = await svc.evolution_conn()
        try:
            await edit(
                conn,
                INSTANCE,
                bodies[-1]["data"]["key"]["id"],
                "Да, давайте продолжим",
                edited_at=int(time.time()),
                version="2.3.6",  # also writes a DELETED "MessageUpdate" row for the edit
            )
        finally:
            await conn.close()
    dialog = await reader.dialog(INSTANCE, PHONE, limit=50)
    assert dialog is not None
    assert (dialog.incoming_count, dialog.outgoing_count) == (4, 2)
    assert dialog.messages[-1].text == "Да, давайте продолжим"
    (summary,) = await reader.contacts(INSTANCE, min_incoming=1)
    assert (summary.incoming_count, summary.outgoing_count) == (4, 2)
    assert summary.last_message_id == dialog.last_message_id


# -- 5. wrapped non-turns -----------------------------------------------------------------
def ephemeral_notice(phone: str, msg_id: str, ts: int) -> dict[str, Any]:
    """ "Disappearing messages turned on": an EPHEMERAL_SETTING protocolMessage inside
    ephemeralMessage; Evolution skips only a top-level protocolMessage, so prepareMessage
    stores and sends it with messageType = getContentType() = ephemeralMessage."""
    body = message_body(phone, "", ts=ts, msg_id=msg_id)
    body["data"]["message"] = {
        "ephemeralMessage": {
            "message": {
                "protocolMessage": {"type": "EPHEMERAL_SETTING", "ephemeralExpiration": 86400}
            }
        }
    }
    body["data"]["messageType"] = "ephemeralMessage"
    return body


def wrapped(
    phone: str, msg_id: str, ts: int, wrapper: str, inner: dict[str, Any]
) -> dict[str, Any]:
    body = message_body(phone, "", ts=ts, msg_id=msg_id)
    body["data"]["message"] = {wrapper: {"message": inner}}
    body["data"]["messageType"] = wrapper
    return body


async def test_wrapped_protocol_and_reactions_are_not_turns(
    settings: Settings, reader: EvolutionReader
) -> None:
    t0 = int(time.time()) - 600
    notice = ephemeral_notice(PHONE, "3EB0NOTICE", t0)
    reaction = wrapped(
        PHONE,
        "3EB0REACT",
        t0 + 1,
        "viewOnceMessageV2",
        {"reactionMessage": {"key": {"id": "X"}, "text": "👍"}},
    )
    text = wrapped(
        PHONE, "3EB0TEXT", t0 + 2, "ephemeralMessage", {"conversation": "Сколько стоит?"}
    )
    # Intake: nothing queued for the non-turns, the wrapped text is a message.
    for body in (notice, reaction):
        outcome = parse_webhook(__import__("json").dumps(body).encode())
        assert isinstance(outcome, Ignored) and outcome.reason == "not_dialog"
    accepted = parse_webhook(__import__("json").dumps(text).encode())
    assert isinstance(accepted, Accepted) and accepted.events[0].text == "Сколько стоит?"
    # Reader SQL: the same rule on stored rows.
    async with running_service(settings, consume=False) as svc:
        for body in (notice, reaction, text):
            await svc.store_message(body)
    dialog = await reader.dialog(INSTANCE, PHONE, limit=10)
    assert dialog is not None
    assert [m.text for m in dialog.messages] == ["Сколько стоит?"]
    assert dialog.incoming_count == 1
    (summary,) = await reader.contacts(INSTANCE, min_incoming=1)
    assert summary.incoming_count == 1 and summary.last_message_id == "3EB0TEXT"


# -- 6. LID-only messages and the instance's own number -------------------------------------
LID = "181736458731542@lid"


def lid_only(
    msg_id: str, text: str, ts: int, *, from_me: bool = False, alt: str | None = None
) -> dict[str, Any]:
    """A LID chat message with no phone at all (Evolution issues #1764, #2466), or the
    business's reply from the phone whose remoteJidAlt Baileys 7 filled with the
    business's own number (participant_pn || sender_pn || peer_recipient_pn)."""
    body = message_body(PHONE, text, ts=ts, msg_id=msg_id, from_me=from_me)
    key: dict[str, Any] = {
        "remoteJid": LID,
        "fromMe": from_me,
        "id": msg_id,
        "addressingMode": "lid",
    }
    if alt is not None:
        key["remoteJidAlt"] = alt
    body["data"]["key"] = key
    return body


def paired(msg_id: str, text: str, ts: int) -> dict[str, Any]:
    """2.3.5–2.3.6: remoteJid = LID, remoteJidAlt = phone (no swap before posting)."""
    body = message_body(PHONE, text, ts=ts, msg_id=msg_id)
    body["data"]["key"] = {
        "remoteJid": LID,
        "remoteJidAlt": f"{PHONE}@s.whatsapp.net",
        "fromMe": False,
        "id": msg_id,
        "addressingMode": "lid",
    }
    return body


async def test_lid_only_messages_are_held_and_merged_when_the_pair_appears(
    settings: Settings,
) -> None:
    """Evolution's database off (DATABASE_SAVE_DATA_NEW_MESSAGE unset: no rows), so only
    the events can pair the LID with the phone."""
    t0 = int(time.time()) - 600
    await set_owner(settings)
    async with running_service(settings) as svc:
        first = [
            lid_only("3EB0LID1", "Здравствуйте, я владелец клиники", t0),
            lid_only("3EB0LID2", "Добрый день!", t0 + 10, from_me=True, alt=OWNER),
            lid_only("3EB0LID3", "Сколько стоит продвижение?", t0 + 20),
        ]
        for body in first:
            assert await svc.send(body, store=False) == 200
        held = svc.ctx.metrics.held_events

        async def all_held() -> bool:
            return held.labels("lid", "held")._value.get() == 3

        await svc.wait_for(all_held, what="three LID-only events held")
        # Nothing was filed under the business's own number, nothing dropped silently.
        assert await svc.row(OWNER.split("@")[0]) is None
        assert svc.ctx.metrics.consumer_skips.labels("no_contact")._value.get() == 0
        # A message carrying the pair arrives: the held ones join the contact.
        assert (
            await svc.send(paired("3EB0PAIR", "Бюджет 500 тыс тенге", t0 + 30), store=False) == 200
        )
        row = await svc.wait_row(PHONE, lambda r: r.incoming_count == 3, timeout=30)
        assert (row.incoming_count, row.outgoing_count) == (3, 1)
        assert [m["id"] for m in row.messages or []] == [
            "3EB0LID1",
            "3EB0LID2",
            "3EB0LID3",
            "3EB0PAIR",
        ]
        assert held.labels("lid", "resolved")._value.get() == 3


async def test_lid_only_messages_resolved_through_evolutions_database(
    settings: Settings, reader: EvolutionReader
) -> None:
    t0 = int(time.time()) - 600
    await set_owner(settings)
    async with running_service(settings) as svc:
        await svc.store_message(paired("3EB0PAIR", "Здравствуйте", t0))
        for body in (
            lid_only("3EB0LID1", "Я владелец клиники", t0 + 10),
            lid_only("3EB0LID2", "Добрый день!", t0 + 20, from_me=True, alt=OWNER),
            lid_only("3EB0LID3", "Сколько стоит?", t0 + 30),
        ):
            assert await svc.send(body) == 200
        row = await svc.wait_row(PHONE, lambda r: r.incoming_count == 3)
        assert (row.incoming_count, row.outgoing_count) == (3, 1)
        assert svc.ctx.metrics.held_events.labels("lid", "held")._value.get() == 0
    # The reader agrees, and the business's own number is no contact.
    summaries = await reader.contacts(INSTANCE, min_incoming=0)
    assert [s.contact.phone for s in summaries] == [PHONE]
    assert await reader.dialog(INSTANCE, OWNER.split("@")[0], limit=10) is None
    assert await reader.phone_for_lid(INSTANCE, LID) == f"{PHONE}@s.whatsapp.net"


def test_own_number_is_never_a_contact_at_intake() -> None:
    import json

    body = lid_only("3EB0X", "ok", int(time.time()), from_me=True, alt=OWNER)
    outcome = parse_webhook(json.dumps(body).encode())
    assert isinstance(outcome, Accepted)
    (event,) = outcome.events
    assert event.phone_jid is None and event.lid == LID
    own_chat = message_body(OWNER.split("@")[0], "note to self", from_me=True)
    assert parse_webhook(json.dumps(own_chat).encode()) == Ignored(
        event="messages.upsert", reason="own_chat"
    )


# -- 7. DATABASE_SAVE_DATA_NEW_MESSAGE off -------------------------------------------------
async def test_events_without_rows_add_to_the_lead(settings: Settings) -> None:
    """With Evolution's database write off (no rows), a later event adds to the stored
    lead: counts and first message are not started over."""
    async with running_service(settings) as svc:
        bodies = dialog_bodies()
        for body in bodies[:5]:
            assert await svc.send(body, store=False) == 200
        await svc.wait_idle()
        row = await svc.wait_row(PHONE, lambda r: r.incoming_count == 3)
        first = row.first_message
        await asyncio.sleep(1.2)  # a separate debounce window
        assert await svc.send(bodies[5], store=False) == 200
        row = await svc.wait_row(PHONE, lambda r: r.incoming_count == 4)
        assert (row.incoming_count, row.outgoing_count) == (4, 2)
        assert row.first_message == first
        assert score_of(row) == ("deal_lost", 35, "cold")
        # And a delete then works on the stored dialog too.
        deleted = message_body(PHONE, "", msg_id=bodies[5]["data"]["key"]["id"])
        deleted["event"] = "messages.delete"
        deleted["data"] = {**deleted["data"]["key"], "status": "DELETED"}
        assert await svc.send(deleted, store=False) == 200
        row = await svc.wait_row(PHONE, lambda r: r.funnel_stage == "qualified")
        assert (row.incoming_count, row.first_message) == (3, first)


# -- intake of the change events, as Evolution posts them ---------------------------------
def _parse(body: dict[str, Any]) -> Any:
    import json

    return parse_webhook(json.dumps(body).encode(), received_at=1_760_000_000)


def test_change_event_shapes_at_intake() -> None:
    key = {"remoteJid": f"{PHONE}@s.whatsapp.net", "fromMe": False, "id": "3EB0DEL"}
    envelope = message_body(PHONE, "x")
    # messages.update revoke branch: `{ ...key, status: 'DELETED' }`.
    revoked = {**envelope, "event": "messages.delete", "data": {**key, "status": "DELETED"}}
    (event,) = _parse(revoked).events
    assert (event.change, event.message_id, event.phone_jid) == (
        "delete",
        "3EB0DEL",
        f"{PHONE}@s.whatsapp.net",
    )
    # messages.update with a delivery/read status: nothing for the dialog.
    read = {
        **envelope,
        "event": "messages.update",
        "data": {
            "keyId": "3EB0DEL",
            "remoteJid": key["remoteJid"],
            "fromMe": True,
            "status": "READ",
            "instanceId": "i",
            "messageId": "c1",
        },
    }
    assert _parse(read) == Ignored(event="messages.update", reason="messages.update")
    # messages.update with status DELETED and no edited message: 2.3.1-2.3.6's default
    # status of a status-less update such as a star (messageHandle['messages.update'];
    # its revoke branch posts messages.delete and `continue`s): not a delete.
    starred = {**read, "data": {**read["data"], "status": "DELETED", "fromMe": False}}
    assert _parse(starred) == Ignored(event="messages.update", reason="messages.update")
    # The edit's protocolMessage: REVOKE type is a delete too; the contact is unknown
    # when the key names the business.
    protocol = {"key": {"remoteJid": OWNER, "fromMe": True, "id": "3EB0DEL"}, "type": "REVOKE"}
    (revoke_event,) = _parse({**envelope, "event": "messages.edited", "data": protocol}).events
    assert (revoke_event.change, revoke_event.phone_jid, revoke_event.lid) == ("delete", None, None)
    edited = {**protocol, "type": 14, "editedMessage": {"conversation": "новый текст"}}
    (edit_event,) = _parse({**envelope, "event": "messages.edited", "data": edited}).events
    assert (edit_event.change, edit_event.text) == ("edit", "новый текст")
    # A change is its own event: its idempotency key differs from the message's.
    assert edit_event.idempotency_key != f"{INSTANCE}:3EB0DEL"


async def test_history_sync_push_name_of_digits_is_no_name(
    settings: Settings, reader: EvolutionReader
) -> None:
    """messaging-history.set: `m.pushName = participantJid.split('@')[0]` when the contact
    has no name; such a pushName is not the contact's name."""
    t0 = int(time.time()) - 600
    items = []
    for i, text in enumerate(["Здравствуйте", "Я владелец клиники", "Сколько стоит?"]):
        data = message_body(PHONE, text, ts=t0 + i, msg_id=f"3EB0SET{i}")["data"]
        data["pushName"] = PHONE
        items.append(data)
    body = {**message_body(PHONE, "x"), "event": "messages.set", "data": items}
    accepted = _parse(body)
    assert isinstance(accepted, Accepted)
    assert [e.push_name for e in accepted.events] == [None, None, None]
    async with running_service(settings) as svc:
        assert await svc.send(body) == 200
        row = await svc.wait_row(PHONE, lambda r: r.incoming_count == 3)
        assert row.contact_name is None
    dialog = await reader.dialog(INSTANCE, PHONE, limit=10)
    assert dialog is not None and dialog.contact.name is None
    (summary,) = await reader.contacts(INSTANCE, min_incoming=1)
    assert summary.contact.name is None
