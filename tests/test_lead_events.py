"""Lead events on the real services: decided by the store's write rules (an outbox row in
the same transaction), published by the consume processes' drainer, confirmed and routed.

Exactly one `lead.hot` per transition from each path (consumer, backfill, POST
/dialogs/analyze in a serve process, PATCH), none with `backfill --no-notify`; the
delivered message: routing key = type, message_id = the outbox row's id, the documented
body; a consume process SIGKILLed with the event stored but not published loses nothing:
the next one publishes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import msgspec
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

from consumers.outbox import OutboxDrainer
from service.adapters.broker.topology import Topology
from service.adapters.evolution.seed import insert_webhook_message
from service.config import Settings
from service.domain.events import LeadEvent
from service.usecases.backfill import BackfillOptions, run_backfill
from tests.harness import (
    API_TOKEN,
    INSTANCE,
    Harness,
    message_body,
    running_service,
    settings_env,
)
from tests.test_consumer import HOT_DIALOG

ROOT = Path(__file__).parent.parent
AUTH = {"Authorization": f"Bearer {API_TOKEN}"}


@pytest.fixture
def settings(service_settings: Settings) -> Settings:
    return msgspec.structs.replace(
        service_settings, outbox_poll_seconds=0.1, outbox_lease_seconds=2.0
    )


@contextlib.asynccontextmanager
async def event_queue(settings: Settings) -> AsyncIterator[AbstractQueue]:
    """A queue of the test's own bound to the events exchange for `lead.*`, as a reader
    of the events binds one."""
    connection = await aio_pika.connect(settings.amqp_url)
    try:
        channel = await connection.channel()
        exchange = await channel.get_exchange(Topology(settings).events_exchange)
        queue = await channel.declare_queue("", exclusive=True)
        await queue.bind(exchange, "lead.*")
        yield queue
    finally:
        await connection.close()


async def taken(queue: AbstractQueue) -> list[AbstractIncomingMessage]:
    got = []
    while (message := await queue.get(no_ack=True, fail=False)) is not None:
        got.append(message)
    return got


def hot_of(messages: list[AbstractIncomingMessage], phone: str) -> list[AbstractIncomingMessage]:
    return [
        m
        for m in messages
        if m.routing_key == "lead.hot" and msgspec.json.decode(m.body)["data"]["contact"] == phone
    ]


async def outbox_rows(settings: Settings) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(settings.results_database_url)
    try:
        records = await conn.fetch(
            "SELECT id, event_type, body ->> 'data' AS data, published_at FROM crm_outbox "
            "ORDER BY seq"
        )
    finally:
        await conn.close()
    return [dict(r) for r in records]


async def drained(svc: Harness) -> None:
    """Every outbox row published."""

    async def check() -> bool:
        return all(r["published_at"] is not None for r in await outbox_rows(svc.settings))

    await svc.wait_for(check, timeout=20, what="the outbox drained")


def check_message(message: AbstractIncomingMessage, row_ids: set[uuid.UUID]) -> LeadEvent:
    """The delivered message as documented: confirmed JSON, message_id = outbox row id."""
    assert message.content_type == "application/json"
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.message_id is not None and uuid.UUID(message.message_id) in row_ids
    body = msgspec.json.decode(message.body)
    assert set(body) == {"type", "timestamp", "data"}
    assert set(body["data"]) == {
        "lead_id",
        "account",
        "instance",
        "contact",
        "contact_name",
        "score",
        "interest_level",
        "from_stage",
        "to_stage",
        "cause",
    }
    event = msgspec.json.decode(message.body, type=LeadEvent)
    assert event.type == message.routing_key
    return event


async def store_dialog(svc: Harness, phone: str, t0: int) -> None:
    """HOT_DIALOG in Evolution's DB only (no webhook): for backfill and REST analyze."""
    conn = await svc.evolution_conn()
    try:
        for i, (from_me, text) in enumerate(HOT_DIALOG):
            await insert_webhook_message(
                conn, message_body(phone, text, from_me=from_me, ts=t0 + i * 60)
            )
    finally:
        await conn.close()


async def test_consumer_path_publishes_one_lead_hot_per_transition(settings: Settings) -> None:
    phone = "77015000001"
    t0 = int(time.time()) - 7200
    async with event_queue(settings) as queue, running_service(settings) as svc:
        for i, (from_me, text) in enumerate(HOT_DIALOG):
            await svc.send(message_body(phone, text, from_me=from_me, ts=t0 + i * 60))
        await svc.wait_row(phone, lambda r: r.interest_level == "hot")
        await svc.wait_idle()
        # A later message keeps it hot: no second lead.hot.
        await svc.send(message_body(phone, "Спасибо, до завтра!", ts=t0 + 900))
        await svc.wait_row(phone, lambda r: r.incoming_count == 5)
        await svc.wait_idle()
        await drained(svc)
        await asyncio.sleep(0.3)
        got = await taken(queue)
        rows = await outbox_rows(settings)
        ids = {r["id"] for r in rows}
        events = [check_message(m, ids) for m in got]
        hot = hot_of(got, phone)
        assert len(hot) == 1, [m.body for m in got]
        event = msgspec.json.decode(hot[0].body, type=LeadEvent)
        assert event.data.score is not None and event.data.score >= 75
        assert event.data.cause.kind == "analysis" and event.data.cause.analyzer == "rules"
        # Every stored event went out exactly once (message ids never repeat).
        assert sorted(m.message_id or "" for m in got) == sorted(str(i) for i in ids)
        assert {e.type for e in events} <= {"lead.hot", "lead.stage_changed"}
        assert svc.ctx.metrics.lead_events.labels("lead.hot")._value.get() == 1


async def test_backfill_notifies_once_and_not_at_all_with_no_notify(settings: Settings) -> None:
    loud, quiet = "77015000002", "77015000003"
    t0 = int(time.time()) - 7200
    async with (
        event_queue(settings) as queue,
        running_service(settings, consume=False, drain=True) as svc,
    ):
        await store_dialog(svc, loud, t0)
        await store_dialog(svc, quiet, t0)
        assert svc.ctx.pipeline is not None and svc.ctx.reader is not None
        account = await svc.ctx.store.instance_account(INSTANCE)
        assert account is not None
        options = BackfillOptions(instance=INSTANCE, account=account, min_incoming=3)
        quiet_options = msgspec.structs.replace(options, notify=False)
        # A history replay first: both leads become hot, no event is stored. Then a normal
        # backfill after the loud lead went back to warm (twice: the second finds everything
        # current) and a forced re-analysis of the same dialogs (no transition: no event).
        summary = await run_backfill(svc.ctx.pipeline, svc.ctx.reader, quiet_options)
        assert summary.analyzed == 2
        rows_after_quiet = await outbox_rows(settings)
        assert rows_after_quiet == []  # history only
        assert (await svc.row(quiet)) is not None
        conn = await asyncpg.connect(settings.results_database_url)
        try:
            recorded = await conn.fetchval(
                "SELECT count(*) FROM crm_lead_history h JOIN dialog_analysis d "
                "ON d.id = h.lead_id WHERE d.contact_phone = $1",
                quiet,
            )
            # The loud contact: its lead back to warm, so the next backfill is a transition.
            await conn.execute(
                "UPDATE dialog_analysis SET interest_level = 'warm', score = 60, "
                "funnel_stage = 'qualified', last_message_id = NULL WHERE contact_phone = $1",
                loud,
            )
        finally:
            await conn.close()
        assert recorded == 3  # stage, score, interest of the new row
        await run_backfill(svc.ctx.pipeline, svc.ctx.reader, options)
        await run_backfill(svc.ctx.pipeline, svc.ctx.reader, options)
        await run_backfill(
            svc.ctx.pipeline, svc.ctx.reader, msgspec.structs.replace(options, force=True)
        )
        await drained(svc)
        await asyncio.sleep(0.3)
        got = await taken(queue)
        ids = {r["id"] for r in await outbox_rows(settings)}
        for message in got:
            check_message(message, ids)
        assert len(hot_of(got, loud)) == 1
        assert hot_of(got, quiet) == []


async def test_rest_analyze_and_patch_in_a_serve_process(settings: Settings) -> None:
    """POST /dialogs/analyze and PATCH in a process that runs no drainer: the rows wait,
    then a consume process's drainer publishes each once."""
    phone = "77015000004"
    t0 = int(time.time()) - 7200
    async with event_queue(settings) as queue:
        async with running_service(settings, consume=False) as svc:
            assert svc.drainer is None  # as `serve`: stores events, publishes none
            await store_dialog(svc, phone, t0)
            account = await svc.ctx.store.instance_account(INSTANCE)
            body = {"instanceName": INSTANCE, "userAccountId": str(account), "minIncoming": 3}
            for _ in range(2):  # the second run finds the dialog unchanged
                response = await svc.client.post("/dialogs/analyze", json=body, headers=AUTH)
                assert response.status == 200, await response.text()
            row = await svc.row(phone)
            assert row is not None and row.interest_level == "hot"
            # By hand: down to warm (no event but the stage change), back to hot (one).
            for stage in ("qualified", "consultation_booked", "consultation_booked"):
                response = await svc.client.patch(
                    f"/dialogs/leads/{row.id}",
                    json={"userAccountId": str(account), "funnelStage": stage},
                    headers=AUTH,
                )
                assert response.status == 200, await response.text()
            waiting = await outbox_rows(settings)
            assert waiting and all(r["published_at"] is None for r in waiting)
            assert await taken(queue) == []
        async with running_service(settings, consume=False, drain=True) as svc:
            await drained(svc)
            await asyncio.sleep(0.3)
        got = await taken(queue)
        ids = {r["id"] for r in await outbox_rows(settings)}
        events = [check_message(m, ids) for m in got]
        hot = [e for e in events if e.type == "lead.hot"]
        assert [e.data.cause.kind for e in hot] == ["analysis", "manual"]
        assert hot[1].data.cause.key == "admin"
        stages = [(e.data.from_stage, e.data.to_stage) for e in events if e.type != "lead.hot"]
        assert stages[-2:] == [
            ("consultation_booked", "qualified"),
            ("qualified", "consultation_booked"),
        ]
        assert len(got) == len(ids)  # each stored event once


def start_consumer(settings: Settings) -> subprocess.Popen[bytes]:
    env = settings_env(settings)
    env["LOG_LEVEL"] = "WARNING"
    return subprocess.Popen(
        [sys.executable, "-m", "service", "consume"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def subscribed(settings: Settings) -> int:
    """Consumers on the shard queues (a consume process is up once it has subscribed)."""
    topology = Topology(settings)
    connection = await aio_pika.connect(settings.amqp_url)
    try:
        channel = await connection.channel()
        total = 0
        for shard in range(settings.queue_shards):
            queue = await channel.declare_queue(topology.shard_queue(shard), passive=True)
            total += queue.declaration_result.consumer_count or 0
        return total
    finally:
        await connection.close()


async def test_a_consumer_killed_between_store_and_publish_loses_no_event(
    settings: Settings,
) -> None:
    """A real `consume` process analyses a contact into hot, which stores the events, and
    is SIGKILLed before its drainer publishes them (its next drain is a minute away). The
    events stay in the outbox; the next consume process publishes each, once."""
    topology = Topology(settings)
    phone = "77015000005"
    t0 = int(time.time()) - 7200
    first = start_consumer(msgspec.structs.replace(settings, outbox_poll_seconds=60.0))
    connection = await aio_pika.connect(settings.amqp_url)
    try:
        channel = await connection.channel()
        queue = await channel.get_queue(topology.notification_queue)
        async with running_service(settings, consume=False) as svc:

            async def up() -> bool:
                return await subscribed(settings) > 0

            await svc.wait_for(up, timeout=30, what="the consume process")
            await asyncio.sleep(1.0)  # its drainer's first (empty) drain is done
            for i, (from_me, text) in enumerate(HOT_DIALOG):
                await svc.send(message_body(phone, text, from_me=from_me, ts=t0 + i * 60))
            await svc.wait_row(phone, lambda r: r.interest_level == "hot", timeout=60)

            async def stored() -> bool:
                return any(r["event_type"] == "lead.hot" for r in await outbox_rows(settings))

            await svc.wait_for(stored, timeout=20, what="the event stored")
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=10)
        rows = await outbox_rows(settings)
        assert rows and all(r["published_at"] is None for r in rows)
        hot_ids = [r["id"] for r in rows if r["event_type"] == "lead.hot"]
        assert len(hot_ids) == 1
        assert await taken(queue) == []

        second = start_consumer(settings)
        try:
            deadline = time.monotonic() + 30
            while not all(r["published_at"] is not None for r in await outbox_rows(settings)):
                assert time.monotonic() < deadline, "the next consume process never published"
                await asyncio.sleep(0.2)
            await asyncio.sleep(0.3)
            got = await taken(queue)
        finally:
            second.send_signal(signal.SIGTERM)
            second.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
        await connection.close()
    hot = hot_of(got, phone)
    assert len(hot) == 1
    assert hot[0].message_id == str(hot_ids[0])
    assert sorted(m.message_id or "" for m in got) == sorted(str(r["id"]) for r in rows)


async def test_a_batch_claimed_by_a_dead_process_is_published_after_its_lease(
    settings: Settings,
) -> None:
    """A process that claimed a batch and died (the claim is all it did) holds it for
    OUTBOX_LEASE_SECONDS; then another drainer publishes it. Two drainers at once never
    take the same rows."""
    async with (
        event_queue(settings) as queue,
        running_service(settings, consume=False) as svc,
    ):
        store = svc.ctx.store
        account = await store.instance_account(INSTANCE)
        assert account is not None
        for n in range(6):
            response = await svc.client.post(
                "/dialogs/leads",
                json={
                    "phone": f"7701600000{n}",
                    "userAccountId": str(account),
                    "instanceName": INSTANCE,
                    "funnelStage": "deal_closed",
                    "niche": "medicine",
                },
                headers=AUTH,
            )
            assert response.status == 201
        claimed = await store.claim_outbox(100, settings.outbox_lease_seconds)
        assert len(claimed) == 12  # stage and hot of each
        assert await store.claim_outbox(100, 60) == []  # leased: nobody else takes them
        claimed_at = time.monotonic()
        drainers = [OutboxDrainer(svc.ctx), OutboxDrainer(svc.ctx)]
        for drainer in drainers:
            await drainer.start()
        try:
            await drained(svc)
            waited = time.monotonic() - claimed_at
        finally:
            for drainer in drainers:
                await drainer.stop()
        await asyncio.sleep(0.3)
        got = await taken(queue)
    assert waited >= settings.outbox_lease_seconds - 0.5
    assert sorted(m.message_id or "" for m in got) == sorted(str(e.id) for e in claimed)
    assert sum(d.published for d in drainers) == 12


def test_backfill_help_says_it_notifies_by_default() -> None:
    from service.cli.main import build_parser

    parser = build_parser()
    assert parser.parse_args(["backfill", "--instance", "x"]).notify is True
    assert parser.parse_args(["backfill", "--instance", "x", "--no-notify"]).notify is False
    sub = next(a for a in parser._subparsers._group_actions if a.dest == "command")  # type: ignore[union-attr]
    text = " ".join(sub.choices["backfill"].format_help().split())  # type: ignore[attr-defined]
    assert "--no-notify" in text and "default: notify" in text
