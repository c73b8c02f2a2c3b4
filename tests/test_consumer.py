"""Event-driven path on the real RabbitMQ and PostgreSQL: webhook → queue → consumer → row."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aio_pika
import pytest

from service.adapters.analyzers.base import AnalysisResult, Analyzer
from service.adapters.analyzers.rules import RulesAnalyzer
from service.config import Settings
from service.domain.dialog import Dialog
from tests.harness import (
    message_body,
    running_service,
)


class CountingAnalyzer:
    """The real rules analyzer, recording each call and overlapping calls per contact."""

    name = "rules"

    def __init__(self, delay: float = 0.0, inner: Analyzer | None = None) -> None:
        self.inner = inner or RulesAnalyzer()
        self.delay = delay
        self.calls: list[str] = []
        self.running: dict[str, int] = {}
        self.max_overlap = 0

    async def analyze(self, dialog: Dialog) -> AnalysisResult:
        phone = dialog.contact.phone
        self.calls.append(phone)
        self.running[phone] = self.running.get(phone, 0) + 1
        self.max_overlap = max(self.max_overlap, self.running[phone])
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            return await self.inner.analyze(dialog)
        finally:
            self.running[phone] -= 1

    async def close(self) -> None:
        return None


@pytest.fixture
def settings(service_settings: Settings) -> Settings:
    return service_settings


async def test_sample_webhooks_become_rows(
    settings: Settings, webhook_bodies: dict[str, dict[str, Any]]
) -> None:
    analyzer = CountingAnalyzer()
    async with running_service(settings, analyzer=analyzer) as svc:
        statuses = {name: await svc.send(body) for name, body in webhook_bodies.items()}
        assert all(code == 200 for code in statuses.values()), statuses
        await svc.wait_idle()
        # Under the threshold (MIN_INCOMING=3): new_lead rows, no analyzer call.
        for phone in ("77017654321", "79161234567", "77051112233"):
            row = await svc.wait_row(phone)
            assert row.funnel_stage == "new_lead"
            assert row.analyzer is None
        assert analyzer.calls == []
        # The LID-addressed message is filed under the phone from remoteJidAlt.
        lid_row = await svc.row("77051112233")
        assert lid_row is not None and lid_row.incoming_count == 1
        # Groups and status broadcasts never become leads.
        assert await svc.row("120363025246125486") is None
        assert await svc.row("77019998877") is None
        counts = await svc.row("77017654321")
        assert counts is not None and (counts.incoming_count, counts.outgoing_count) == (1, 2)


async def test_burst_costs_one_analysis_and_duplicates_none(settings: Settings) -> None:
    analyzer = CountingAnalyzer()
    phone = "77010000001"
    now = int(time.time()) - 60
    texts = [
        "Здравствуйте, у нас стоматология в Алматы",
        "Я владелец клиники",
        "Бюджет на рекламу около 500 тыс тенге",
        "Рекламу сейчас не запускаем",
        "Отдел продаж есть, два администратора",
    ]
    bodies = [message_body(phone, t, ts=now + i) for i, t in enumerate(texts)]
    async with running_service(settings, analyzer=analyzer) as svc:
        for body in bodies:
            await svc.store_message(body)  # Evolution stores first ...
        started = time.monotonic()
        # ... then posts: five webhooks well inside one second, in order.
        for body in bodies:
            assert await svc.send(body, store=False) == 200
        assert time.monotonic() - started < 1.0
        row = await svc.wait_row(phone, lambda r: r.analyzer == "rules")
        await svc.wait_idle()
        assert analyzer.calls == [phone]
        assert row.niche == "medicine" and row.incoming_count == 5
        # Evolution retries the same webhook: no second analysis.
        assert await svc.send(bodies[-1], store=False) == 200
        await asyncio.sleep(settings.debounce_seconds + 0.5)
        await svc.wait_idle()
        assert analyzer.calls == [phone]


async def test_threshold_then_booking_moves_stage(settings: Settings) -> None:
    analyzer = CountingAnalyzer()
    phone = "77010000002"
    t0 = int(time.time()) - 3600
    async with running_service(settings, analyzer=analyzer) as svc:
        await svc.send(message_body(phone, "Добрый день, у меня онлайн-школа английского", ts=t0))
        await svc.send(message_body(phone, "Я основатель школы", ts=t0 + 60))
        row = await svc.wait_row(phone, lambda r: r.incoming_count == 2)
        await svc.wait_idle()
        assert row.funnel_stage == "new_lead" and row.analyzer is None
        assert analyzer.calls == []

        await svc.send(
            message_body(phone, "Бюджет 300 тысяч рублей в месяц, готовы начать", ts=t0 + 120)
        )
        row = await svc.wait_row(phone, lambda r: r.analyzer is not None)
        await svc.wait_idle()
        assert analyzer.calls == [phone]
        first_stage = row.funnel_stage
        assert first_stage not in ("consultation_booked", "new_lead")

        await svc.send(
            message_body(
                phone,
                "Записал вас на консультацию завтра в 15:00, пришлю ссылку на zoom",
                from_me=True,
                ts=t0 + 180,
            )
        )
        row = await svc.wait_row(phone, lambda r: r.funnel_stage == "consultation_booked")
        await svc.wait_idle()
        assert analyzer.calls == [phone, phone]
        assert row.has_booking is True


async def test_event_merged_when_db_lags(settings: Settings) -> None:
    """The event's own message counts even if Evolution has not stored it yet."""
    analyzer = CountingAnalyzer()
    phone = "77010000003"
    t0 = int(time.time()) - 600
    async with running_service(settings, analyzer=analyzer) as svc:
        await svc.send(
            message_body(phone, "Здравствуйте, клиника косметологии", ts=t0), store=False
        )
        row = await svc.wait_row(phone)
        assert row.incoming_count == 1 and row.funnel_stage == "new_lead"


async def test_unmapped_instance_is_skipped_not_lost(settings: Settings) -> None:
    analyzer = CountingAnalyzer()
    async with running_service(settings, analyzer=analyzer) as svc:
        body = message_body("77010000004", "Здравствуйте", instance="unknown-instance")
        assert await svc.send(body, store=False) == 200
        await svc.wait_idle()
        skipped = svc.ctx.metrics.consumer_skips.labels("unmapped_instance")._value.get()
        assert skipped == 1
        assert analyzer.calls == []


# A dialog the rules analyzer scores hot (medicine, owner, budget, consultation booked).
HOT_DIALOG = [
    (False, "Здравствуйте, у меня стоматологическая клиника"),
    (True, "Вы владелец?"),
    (False, "Да, я владелец клиники"),
    (True, "Какой бюджет на рекламу?"),
    (False, "Около 500 тыс тенге в месяц"),
    (True, "Записал вас на консультацию завтра в 15:00"),
    (False, "Да, договорились, завтра в 15:00"),
]


async def test_lead_hot_published_once(settings: Settings, amqp_url: str) -> None:
    analyzer = CountingAnalyzer()
    phone = "77010000005"
    t0 = int(time.time()) - 7200
    connection = await aio_pika.connect(amqp_url)
    channel = await connection.channel()
    from service.adapters.broker.topology import Topology

    topology = Topology(settings)
    async with running_service(settings, analyzer=analyzer) as svc:
        events = await channel.get_exchange(topology.events_exchange)
        queue = await channel.declare_queue("", exclusive=True)
        await queue.bind(events, "lead.#")
        for i, (from_me, text) in enumerate(HOT_DIALOG):
            await svc.send(message_body(phone, text, from_me=from_me, ts=t0 + i * 60))
        row = await svc.wait_row(phone, lambda r: r.interest_level == "hot")
        await svc.wait_idle()
        # Another message keeps the lead hot: no second event.
        await svc.send(message_body(phone, "Спасибо, до завтра!", ts=t0 + 900))
        await svc.wait_row(phone, lambda r: r.incoming_count == 5)
        await svc.wait_idle()

        async def published() -> bool:
            return await svc.ctx.store.outbox_depth() == 0

        await svc.wait_for(published, what="the lead events published")
        await asyncio.sleep(0.3)
        got = []
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            got.append(message)
        hot = [m for m in got if m.routing_key == "lead.hot"]
        assert len(hot) == 1, [m.body for m in got]
        assert b'"score":' in hot[0].body and phone.encode() in hot[0].body
        assert hot[0].message_id is not None  # the outbox row's id, stable across retries
        assert {m.routing_key for m in got} == {"lead.hot", "lead.stage_changed"}
        assert row.score is not None and row.score >= 75
    await connection.close()


class FailingAnalyzer:
    name = "rules"

    def __init__(self) -> None:
        self.calls = 0

    async def analyze(self, dialog: Dialog) -> AnalysisResult:
        from service.adapters.analyzers.base import AnalyzerUnavailableError

        self.calls += 1
        raise AnalyzerUnavailableError("model overloaded (test)")

    async def close(self) -> None:
        return None


async def test_failing_analyzer_dead_letters_then_replay_completes(settings: Settings) -> None:
    from service.adapters.broker.dead_letters import list_dead, replay_dead

    phone = "77010000006"
    t0 = int(time.time()) - 600
    failing = FailingAnalyzer()
    async with running_service(settings, analyzer=failing) as svc:
        for i, text in enumerate(["Здравствуйте", "У нас клиника", "Я владелец"]):
            await svc.send(message_body(phone, text, ts=t0 + i))

        async def dead() -> bool:
            depth, _ = await list_dead(settings, 10)
            return depth >= 1

        await svc.wait_for(dead, timeout=30, what="dead letter")
        assert failing.calls == settings.max_attempts
        depth, letters = await list_dead(settings, 10)
        assert (
            depth == 1 and letters[0].events == 3 and letters[0].attempts == settings.max_attempts
        )
        assert "overloaded" in (letters[0].error or "")
        row = await svc.row(phone)
        assert row is None or row.analyzer is None

    working = CountingAnalyzer()
    async with running_service(settings, analyzer=working) as svc:
        result = await replay_dead(settings)
        assert result.replayed == 1 and result.events == 3
        row = await svc.wait_row(phone, lambda r: r.analyzer == "rules")
        assert working.calls == [phone]
        assert row.incoming_count == 3
        depth, _ = await list_dead(settings, 10)
        assert depth == 0


async def test_poison_message_goes_straight_to_dlq(settings: Settings) -> None:
    from service.adapters.broker.dead_letters import list_dead
    from service.adapters.broker.topology import Topology

    analyzer = CountingAnalyzer()
    topology = Topology(settings)
    async with running_service(settings, analyzer=analyzer) as svc:
        connection = await aio_pika.connect(settings.amqp_url)
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(topology.intake_exchange)
        await exchange.publish(
            aio_pika.Message(b"\x00not json", delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=topology.shard_key(0),
        )
        await connection.close()

        async def dead() -> bool:
            depth, _ = await list_dead(settings, 10)
            return depth == 1

        await svc.wait_for(dead, timeout=10, what="poison in DLQ")
        await svc.wait_idle()
        _, letters = await list_dead(settings, 10)
        assert letters[0].decodable is False
        assert "undecodable" in (letters[0].error or "")
        assert analyzer.calls == []


async def test_many_contacts_never_analysed_twice_at_once(settings: Settings) -> None:
    analyzer = CountingAnalyzer(delay=0.2)
    t0 = int(time.time()) - 3000
    phones = [f"7701100{i:04d}" for i in range(12)]
    async with running_service(settings, analyzer=analyzer) as svc:
        sends = []
        for round_ in range(3):
            for i, phone in enumerate(phones):
                text = ["Здравствуйте, у нас клиника", "Я владелец", "Бюджет 200к"][round_]
                sends.append(svc.send(message_body(phone, text, ts=t0 + round_ * 60 + i)))
        assert set(await asyncio.gather(*sends)) == {200}
        for phone in phones:
            await svc.wait_row(phone, lambda r: r.incoming_count == 3 and r.analyzer is not None)
        await svc.wait_idle()
        assert analyzer.max_overlap == 1
        assert sorted(set(analyzer.calls)) == sorted(phones)
        assert len(analyzer.calls) == len(phones)
