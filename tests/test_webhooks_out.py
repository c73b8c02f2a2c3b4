"""Outbound webhooks on the real services: RabbitMQ, PostgreSQL and a real HTTP receiver.

Events are published as the outbox publishes them (confirmed and routed to the events
exchange, routing key = type, message id = event id); the receiver (tests/webhook_receiver)
verifies every request with the `standardwebhooks` package.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import msgspec
import pytest
from standardwebhooks.webhooks import Webhook

from consumers.webhooks import WebhookWorkers
from service.adapters.broker.confirm import publish_confirmed
from service.adapters.broker.connection import connect_once
from service.adapters.broker.dead_letters import list_dead, replay_dead
from service.adapters.broker.topology import Topology
from service.adapters.stores.base import StoreUnavailableError
from service.adapters.stores.postgres import PostgresStore
from service.adapters.webhooks_out.signing import new_secret, secret_key, signature
from service.adapters.webhooks_out.targets import TargetPolicy, TargetRefusedError
from service.config import Settings
from service.domain.webhooks import (
    check_url,
    parse_events,
    parse_retry_after,
    redact_url,
    retry_tier,
    webhook_id,
)
from service.metrics import Metrics
from service.usecases.webhook_endpoints import EndpointError, add_endpoint
from tests.harness import declare_topology, delete_topology, make_settings
from tests.webhook_receiver import Answer, Receiver, running_receiver

DELAYS = "0.3,0.6,1.2,2.5"
ANY = TargetPolicy([], deny_private=False)


# -- pure parts ---------------------------------------------------------------------------
def test_signature_is_the_standard_webhooks_one() -> None:
    secret = new_secret()
    assert secret.startswith("whsec_") and len(base64.b64decode(secret[6:])) >= 24
    body = b'{"type":"lead.hot","timestamp":"2026-12-02T05:00:00Z","data":{}}'
    now = int(time.time())
    headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": str(now),
        "webhook-signature": signature(secret_key(secret), "msg_1", now, body),
    }
    assert Webhook(secret).verify(body, headers) == msgspec.json.decode(body)
    with pytest.raises(Exception, match="No matching signature"):
        Webhook(new_secret()).verify(body, headers)
    with pytest.raises(Exception, match="No matching signature"):
        Webhook(secret).verify(body + b" ", headers)


def test_retry_timing() -> None:
    delays = [5.0, 30.0, 120.0]
    assert [retry_tier(a, delays, None) for a in (1, 2, 3, 4, 9)] == [0, 1, 2, 2, 2]
    assert retry_tier(1, delays, 10) == 1  # never sooner than Retry-After asks
    assert retry_tier(1, delays, 3600) == 2  # capped at the longest tier
    assert retry_tier(3, delays, 1) == 2  # the backoff is a floor too
    now = datetime(2026, 12, 2, 5, 0, tzinfo=UTC)
    assert parse_retry_after("17", now) == 17
    assert parse_retry_after(format_datetime(now + timedelta(seconds=90), usegmt=True), now) == 90
    assert parse_retry_after("soon", now) is None and parse_retry_after(None, now) is None


def test_urls_events_and_ids() -> None:
    assert check_url(" http://127.0.0.1:5678/webhook/x ") == "http://127.0.0.1:5678/webhook/x"
    for bad, says in [
        ("ftp://example.com/x", "http:// or https://"),
        ("https:///path", "no host"),
        ("https://example.com/a#b", "fragment"),
        ("example.com/hook", "http:// or https://"),
    ]:
        with pytest.raises(ValueError, match=says):
            check_url(bad)
    assert parse_events(None) is None
    assert parse_events("lead.hot, lead.hot") == ["lead.hot"]
    with pytest.raises(ValueError, match=r"unknown event 'lead\.cold'"):
        parse_events("lead.hot,lead.cold")
    endpoint = uuid.uuid4()
    assert webhook_id("e1", endpoint) == webhook_id("e1", endpoint) != webhook_id("e2", endpoint)
    assert "." not in webhook_id("e1", endpoint)
    assert (
        redact_url("https://u:pw@relay.example.com/bot/send?token=abc&chat=1")
        == "https://u:***@relay.example.com/bot/send?token=***&chat=***"
    )


def test_target_policy() -> None:
    strict = TargetPolicy(["hooks.example.com", "*.n8n.example.com"], deny_private=True)
    strict.check_url("https://hooks.example.com/x")
    strict.check_url("https://a.n8n.example.com/webhook/1")
    for url in ("https://other.example.com/x", "http://127.0.0.1/x"):
        with pytest.raises(TargetRefusedError):
            strict.check_url(url)
    private = TargetPolicy([], deny_private=True)
    for url in (
        "http://10.1.2.3/x",
        "http://[::1]/x",
        "http://169.254.169.254/",
        "http://localhost/",
    ):
        with pytest.raises(TargetRefusedError):
            private.check_url(url)
    private.check_url("https://93.184.215.14/x")
    ANY.check_url("http://127.0.0.1:1/x")


async def test_private_addresses_are_refused_after_dns() -> None:
    resolver = TargetPolicy([], deny_private=True).resolver()
    try:
        with pytest.raises(OSError, match="private address"):
            await resolver.resolve("localhost", 80)
    finally:
        await resolver.close()


# -- on the real services -----------------------------------------------------------------
class Rig:
    def __init__(
        self, settings: Settings, store: PostgresStore, workers: WebhookWorkers, metrics: Metrics
    ) -> None:
        self.settings = settings
        self.store = store
        self.workers = workers
        self.metrics = metrics

    async def endpoint(
        self, receiver: Receiver, name: str, account: uuid.UUID, events: str | None = None
    ) -> uuid.UUID:
        endpoint = await add_endpoint(self.store, ANY, account, receiver.url_of(name), events)
        receiver.secrets[name] = endpoint.secret
        return endpoint.id

    def count(self, outcome: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "crm_notify_deliveries_total", {"outcome": outcome}
        )
        return value or 0.0


def event_body(kind: str, account: uuid.UUID, **data: Any) -> bytes:
    return msgspec.json.encode(
        {
            "type": kind,
            "timestamp": datetime.now(UTC).isoformat(),
            "data": {
                "lead_id": str(uuid.uuid4()),
                "account": str(account),
                "instance": "clinic-sales",
                "contact": "77015550101",
                "contact_name": "Айгерим",
                "score": 82,
                "interest_level": "hot",
                "from_stage": "qualified",
                "to_stage": "booking",
                "cause": {"kind": "analysis", "analyzer": "rules", "model": None, "key": None},
                **data,
            },
        }
    )


async def publish_event(
    settings: Settings, kind: str, account: uuid.UUID, event_id: str | None = None
) -> tuple[str, bytes]:
    """As the outbox does: confirmed and routed to the events exchange."""
    event_id = event_id or str(uuid.uuid4())
    body = event_body(kind, account)
    await publish_raw_event(settings, kind, body, event_id)
    return event_id, body


async def publish_raw_event(settings: Settings, kind: str, body: bytes, event_id: str) -> None:
    connection = await connect_once(settings, "test")
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await publish_confirmed(
            channel, Topology(settings).events_exchange, kind, body, message_id=event_id
        )
    finally:
        await connection.close()


@contextlib.asynccontextmanager
async def running_webhooks(
    results_dsn: str, amqp_url: str, amqp_prefix: str, **overrides: Any
) -> AsyncIterator[Rig]:
    env: dict[str, Any] = {
        "notify_retry_delays": DELAYS,
        "notify_timeout": 1,
        "notify_max_attempts": 4,
        **overrides,
    }
    settings = make_settings(
        evolution_dsn=results_dsn,
        results_dsn=results_dsn,
        amqp_url=amqp_url,
        prefix=amqp_prefix,
        **env,
    )
    await declare_topology(settings)
    store = await PostgresStore.open(results_dsn)
    metrics = Metrics()
    workers = WebhookWorkers(settings, store, metrics)
    try:
        await workers.start()
        yield Rig(settings, store, workers, metrics)
    finally:
        await workers.stop()
        await store.close()
        await delete_topology(settings)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with running_receiver() as r:
        yield r


async def test_signed_deliveries_follow_each_endpoints_events(
    results_dsn: str, amqp_url: str, amqp_prefix: str, receiver: Receiver, account: uuid.UUID
) -> None:
    other = uuid.uuid4()
    async with running_webhooks(results_dsn, amqp_url, amqp_prefix) as rig:
        every = await rig.endpoint(receiver, "every", account)
        await rig.endpoint(receiver, "stages", account, "lead.stage_changed")
        await rig.endpoint(receiver, "other-account", other)
        hot_id, hot = await publish_event(rig.settings, "lead.hot", account)
        stage_id, stage = await publish_event(rig.settings, "lead.stage_changed", account)
        await receiver.wait(lambda: len(receiver.of("every")) == 2 and receiver.of("stages"))
        await asyncio.sleep(0.5)  # nothing else arrives
    assert all(r.verified for r in receiver.received)
    assert sorted(r.body for r in receiver.of("every")) == sorted([hot, stage])  # byte for byte
    assert {r.webhook_id for r in receiver.of("every")} == {
        webhook_id(hot_id, every),
        webhook_id(stage_id, every),
    }
    assert [r.body for r in receiver.of("stages")] == [stage]
    assert receiver.of("other-account") == []
    assert rig.count("sent") == 3 and rig.count("queued") == 3


async def test_retries_after_500_and_timeout_keep_the_webhook_id(
    results_dsn: str, amqp_url: str, amqp_prefix: str, receiver: Receiver, account: uuid.UUID
) -> None:
    receiver.scripts["flaky"] = [Answer(500), Answer(200, delay=2.0), Answer(204)]
    async with running_webhooks(results_dsn, amqp_url, amqp_prefix) as rig:
        endpoint = await rig.endpoint(receiver, "flaky", account)
        event_id, body = await publish_event(rig.settings, "lead.hot", account)
        await receiver.wait(lambda: receiver.accepted("flaky"), what="the third attempt")
        await asyncio.sleep(1.0)
    got = receiver.of("flaky")
    assert [r.status for r in got] == [500, 0, 204]  # the second timed out (1 s per attempt)
    assert {r.webhook_id for r in got} == {webhook_id(event_id, endpoint)}
    assert all(r.verified and r.body == body for r in got)
    assert 0.25 <= got[1].at - got[0].at < 1.5  # the first retry: the shortest tier
    assert rig.count("failed") == 2 and rig.count("sent") == 1 and rig.count("dead") == 0


async def test_retry_after_is_honoured(
    results_dsn: str, amqp_url: str, amqp_prefix: str, receiver: Receiver, account: uuid.UUID
) -> None:
    receiver.scripts["busy"] = [Answer(503, headers={"Retry-After": "2"})]
    receiver.scripts["limited"] = [
        Answer(
            429,
            headers={
                "Retry-After": format_datetime(datetime.now(UTC) + timedelta(seconds=3), True)
            },
        )
    ]
    async with running_webhooks(results_dsn, amqp_url, amqp_prefix) as rig:
        await rig.endpoint(receiver, "busy", account)
        await rig.endpoint(receiver, "limited", account)
        await publish_event(rig.settings, "lead.hot", account)
        await receiver.wait(
            lambda: receiver.accepted("busy") and receiver.accepted("limited"), what="retries"
        )
    busy, limited = receiver.of("busy"), receiver.of("limited")
    assert [r.status for r in busy] == [503, 200] and [r.status for r in limited] == [429, 200]
    # Not before the asked time; the date form is capped at the longest tier (2.5 s here).
    assert busy[1].at - busy[0].at >= 2.0
    assert limited[1].at - limited[0].at >= 2.4


async def test_each_event_is_accepted_once_per_endpoint(
    results_dsn: str, amqp_url: str, amqp_prefix: str, receiver: Receiver, account: uuid.UUID
) -> None:
    async with running_webhooks(results_dsn, amqp_url, amqp_prefix) as rig:
        endpoint = await rig.endpoint(receiver, "once", account)
        event_id, body = await publish_event(rig.settings, "lead.hot", account)
        # The same event published again (an outbox retry after a lost confirm), twice.
        await publish_raw_event(rig.settings, "lead.hot", body, event_id)
        await publish_raw_event(rig.settings, "lead.hot", body, event_id)
        await receiver.wait(lambda: receiver.accepted("once"))
        await asyncio.sleep(2.0)  # time for every copy to come back from the retry tier
        assert rig.count("duplicate") + rig.count("deferred") >= 2
    assert [r.webhook_id for r in receiver.accepted("once")] == [webhook_id(event_id, endpoint)]
    assert len(receiver.of("once")) == 1


async def test_dead_endpoint_goes_to_the_dlq_and_replay_redelivers(
    results_dsn: str, amqp_url: str, amqp_prefix: str, receiver: Receiver, account: uuid.UUID
) -> None:
    receiver.scripts["down"] = [Answer(500)] * 3
    async with running_webhooks(results_dsn, amqp_url, amqp_prefix, notify_max_attempts=3) as rig:
        endpoint = await rig.endpoint(receiver, "down", account)
        event_id, body = await publish_event(rig.settings, "lead.stage_changed", account)

        async def dead() -> bool:
            depth, _ = await list_dead(rig.settings)
            return depth == 1

        deadline = time.monotonic() + 15
        while not await dead():
            assert time.monotonic() < deadline, receiver.received
            await asyncio.sleep(0.2)
        assert [r.status for r in receiver.of("down")] == [500, 500, 500]
        _, letters = await list_dead(rig.settings)
        assert letters[0].webhook is not None
        assert letters[0].webhook.webhook_id == webhook_id(event_id, endpoint)
        assert letters[0].webhook.stage == "delivery" and letters[0].attempts == 3
        assert letters[0].error == f"HTTP 500 from {receiver.url}"
        assert rig.count("dead") == 1

        result = await replay_dead(rig.settings)
        assert result.replayed == 1 and result.webhooks == 1
        await receiver.wait(lambda: receiver.accepted("down"), what="the replayed delivery")
        assert (await list_dead(rig.settings))[0] == 0
    replayed = receiver.accepted("down")[0]
    assert replayed.webhook_id == webhook_id(event_id, endpoint)
    assert replayed.body == body and replayed.verified


async def test_unreachable_endpoint_is_dead_lettered(
    results_dsn: str, amqp_url: str, amqp_prefix: str, account: uuid.UUID
) -> None:
    async with running_webhooks(results_dsn, amqp_url, amqp_prefix, notify_max_attempts=2) as rig:
        # Nothing listens on port 1: every attempt is refused.
        await add_endpoint(rig.store, ANY, account, "http://127.0.0.1:1/hook", None)
        await publish_event(rig.settings, "lead.hot", account)
        deadline = time.monotonic() + 15
        while rig.count("dead") < 1:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        _, letters = await list_dead(rig.settings)
        assert letters[0].error is not None and "127.0.0.1:1" in letters[0].error
        assert "/hook" not in letters[0].error  # the path may carry a token


async def test_a_slow_endpoint_does_not_delay_another(
    results_dsn: str, amqp_url: str, amqp_prefix: str, receiver: Receiver, account: uuid.UUID
) -> None:
    receiver.scripts["slow"] = [Answer(200, delay=2.5)] * 10
    async with running_webhooks(
        results_dsn,
        amqp_url,
        amqp_prefix,
        notify_timeout=5,
        notify_concurrency=8,
        notify_endpoint_concurrency=2,
    ) as rig:
        await rig.endpoint(receiver, "slow", account)
        await rig.endpoint(receiver, "fast", account)
        started = time.monotonic()
        for _ in range(10):
            await publish_event(rig.settings, "lead.hot", account)
        await receiver.wait(lambda: len(receiver.accepted("fast")) == 10, what="fast deliveries")
        fast_done = time.monotonic() - started
        slow_done = len(receiver.accepted("slow"))
        await receiver.wait(
            lambda: len(receiver.accepted("slow")) == 10, timeout=40, what="slow deliveries"
        )
    assert fast_done < 2.0, fast_done  # not behind the slow endpoint's 2.5 s answers
    assert slow_done < 10
    assert len(receiver.of("slow")) == 10  # no attempt wasted: deferred, not timed out


async def test_removed_endpoint_drops_its_pending_deliveries(
    results_dsn: str, amqp_url: str, amqp_prefix: str, receiver: Receiver, account: uuid.UUID
) -> None:
    receiver.scripts["gone"] = [Answer(500)]
    async with running_webhooks(results_dsn, amqp_url, amqp_prefix) as rig:
        endpoint = await rig.endpoint(receiver, "gone", account)
        await publish_event(rig.settings, "lead.hot", account)
        await receiver.wait(lambda: receiver.of("gone"))
        assert await rig.store.remove_webhook_endpoint(endpoint)
        deadline = time.monotonic() + 10
        while rig.count("dropped") < 1:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
    assert len(receiver.of("gone")) == 1


async def test_undecodable_event_goes_to_the_dlq_alone(
    results_dsn: str, amqp_url: str, amqp_prefix: str, receiver: Receiver, account: uuid.UUID
) -> None:
    async with running_webhooks(results_dsn, amqp_url, amqp_prefix) as rig:
        await rig.endpoint(receiver, "good", account)
        await publish_raw_event(rig.settings, "lead.hot", b'{"not": "an event"}', "bad-1")
        await publish_event(rig.settings, "lead.hot", account)
        await receiver.wait(lambda: receiver.accepted("good"))
        _, letters = await list_dead(rig.settings)
    assert len(letters) == 1 and letters[0].webhook is not None
    assert letters[0].webhook.stage == "event"
    assert letters[0].error is not None and letters[0].error.startswith("not an event body")


async def test_add_refuses_bad_targets(results_dsn: str, account: uuid.UUID) -> None:
    store = await PostgresStore.open(results_dsn)
    try:
        with pytest.raises(EndpointError, match="http:// or https://"):
            await add_endpoint(store, ANY, account, "file:///etc/passwd", None)
        with pytest.raises(EndpointError, match="NOTIFY_ALLOWED_HOSTS"):
            await add_endpoint(
                store, TargetPolicy(["hooks.example.com"], False), account, "https://x.io/", None
            )
        assert await store.list_webhook_endpoints(account) == []
    finally:
        await store.close()


class FailingFirst:
    """The real store, failing its first `failures` endpoint look-ups as an outage would."""

    def __init__(self, store: PostgresStore, failures: int) -> None:
        self._store = store
        self.failures = failures

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def webhook_endpoints_for(self, account: uuid.UUID, event_type: str) -> Any:
        if self.failures > 0:
            self.failures -= 1
            raise StoreUnavailableError("results database unavailable while reading")
        return await self._store.webhook_endpoints_for(account, event_type)


async def test_fanout_waits_out_a_store_outage(
    results_dsn: str, amqp_url: str, amqp_prefix: str, receiver: Receiver, account: uuid.UUID
) -> None:
    settings = make_settings(
        evolution_dsn=results_dsn,
        results_dsn=results_dsn,
        amqp_url=amqp_url,
        prefix=amqp_prefix,
        notify_retry_delays=DELAYS,
        notify_timeout=1,
    )
    await declare_topology(settings)
    store = await PostgresStore.open(results_dsn)
    flaky = FailingFirst(store, failures=2)
    metrics = Metrics()
    workers = WebhookWorkers(settings, flaky, metrics)  # type: ignore[arg-type]
    try:
        await workers.start()
        endpoint = await add_endpoint(store, ANY, account, receiver.url_of("later"), None)
        receiver.secrets["later"] = endpoint.secret
        started = time.monotonic()
        event_id, body = await publish_event(settings, "lead.hot", account)
        await receiver.wait(lambda: receiver.accepted("later"), what="the delivery")
        waited = time.monotonic() - started
    finally:
        await workers.stop()
        await store.close()
        await delete_topology(settings)
    assert flaky.failures == 0 and waited >= 0.3 + 0.6  # two retry tiers waited out
    assert [r.webhook_id for r in receiver.of("later")] == [webhook_id(event_id, endpoint.id)]
    assert receiver.of("later")[0].body == body
