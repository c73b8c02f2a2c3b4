"""Scale-out on the shared broker: several nodes in AMQP_URL, failover, confirmed AND
routed publishes on every path, fair shard sharing, and the queue-layout migration.

The real-cluster versions (three RabbitMQ nodes, kill -9) are in tests/test_cluster.py.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import msgspec
import pytest

from consumers.contacts import ContactConsumer
from service.adapters.broker.assignment import assign
from service.adapters.broker.connection import connect_cluster, connection_name
from service.adapters.broker.envelope import H_ATTEMPT, H_IDEMPOTENCY_KEYS, encode_batch, shard_for
from service.adapters.broker.migrate import migrate_topology
from service.adapters.broker.publisher import BrokerUnavailableError, EventPublisher
from service.adapters.broker.topology import H_LEGACY_RETRY_TIER, Topology
from service.amqp_urls import node_urls
from service.bootstrap.builders import app_context
from service.config import ConfigError, Settings, load_settings
from tests.harness import delete_topology, message_body, queue_depth, running_service
from tests.test_consumer import HOT_DIALOG, CountingAnalyzer, FailingAnalyzer
from tests.test_publisher import TcpProxy, closed_port, make_event, take_all

ROOT = Path(__file__).parent.parent


@pytest.fixture
def settings(service_settings: Settings) -> Settings:
    return service_settings


# -- AMQP_URL with several nodes -----------------------------------------------------------
def test_node_list_forms() -> None:
    assert node_urls("amqp://u:p@h1,h2:5673,h3/vh?heartbeat=30") == [
        "amqp://u:p@h1/vh?heartbeat=30",
        "amqp://u:p@h2:5673/vh?heartbeat=30",
        "amqp://u:p@h3/vh?heartbeat=30",
    ]
    assert node_urls("amqp://u:p@h1:5681/, amqps://v:q@h2/x") == [
        "amqp://u:p@h1:5681/",
        "amqps://v:q@h2/x",
    ]
    assert node_urls("amqp://guest:guest@localhost:5672/") == ["amqp://guest:guest@localhost:5672/"]


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("amqp://u:secret@h1,,h2/", "node 2 of 3 has no host name"),
        ("amqp://u:secret@h1:99999/", "not a valid URL"),
        ("amqp://u:secret@h1,h2:x/", "node 2 of 2 is not a valid URL"),
        ("amqp://u:secret@h1/,http://h2/", "node 2 of 2 must start with amqp://"),
        ("redis://h1", "must be an amqp:// or amqps:// URL"),
    ],
)
def test_bad_amqp_url_is_one_clear_config_error(url: str, says: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings({"AMQP_URL": url}, dotenv=None)
    assert says in str(err.value) and "AMQP_URL" in str(err.value)
    assert "secret" not in str(err.value)


@pytest.mark.parametrize("command", ["consume", "serve"])
def test_bad_amqp_url_exits_2_without_traceback(command: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AMQP", "API_", "WEBHOOK"))}
    env.update({"AMQP_URL": "amqp://u:secret@h1,,h3/", "AUTH_DISABLED": "true"})
    done = subprocess.run(
        [sys.executable, "-m", "service", command],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "AMQP_URL" in lines[0] and "node 2 of 3" in lines[0] and "secret" not in lines[0]


async def test_connects_to_a_live_node_and_names_the_connection(amqp_url: str) -> None:
    live = aio_pika.connection.make_url(amqp_url)
    dead = f"{live.host}:{closed_port()}"
    settings = load_settings(
        {"AMQP_URL": f"amqp://guest:guest@{dead},{dead},{live.host}:{live.port}/"},
        dotenv=None,
    )
    for _ in range(3):  # the first node tried is random: every start finds the live one
        connection = await connect_cluster(settings, "test")
        try:
            assert connection.connected.is_set()
            channel = await connection.channel()
            assert not channel.is_closed
        finally:
            await connection.close()
    name = connection_name("consume")
    assert str(os.getpid()) in name and os.uname().nodename in name


async def test_publisher_fails_over_and_answers_at_once_when_no_node_is_left(
    amqp_url: str, amqp_prefix: str
) -> None:
    from tests.test_publisher import amqp_settings

    target = aio_pika.connection.make_url(amqp_url)
    first, second = (
        TcpProxy(target.host or "127.0.0.1", target.port or 5672),
        TcpProxy(target.host or "127.0.0.1", target.port or 5672),
    )
    await first.start()
    await second.start()
    settings = amqp_settings(
        f"amqp://guest:guest@127.0.0.1:{first.port},127.0.0.1:{second.port}/", amqp_prefix
    )
    publisher = EventPublisher(settings, retry_interval=0.3)
    try:
        await publisher.publish([make_event(1)])
        connection = publisher._connection
        assert connection is not None
        # The node in use goes away: publishing resumes through the other one.
        used = first if f":{first.port}/" in str(connection.url) else second
        other = second if used is first else first
        await used.stop()
        deadline = time.monotonic() + 10
        while True:
            try:
                await publisher.publish([make_event(2)])
                break
            except BrokerUnavailableError:
                assert time.monotonic() < deadline, "no failover within 10 s"
                await asyncio.sleep(0.1)
        assert f":{other.port}/" in str(connection.url)
        # Every node gone: once each refused, intake's publish fails at once (503).
        await other.stop()
        await asyncio.sleep(1.5)
        took = []
        for n in range(5):
            started = time.monotonic()
            with pytest.raises(BrokerUnavailableError):
                await publisher.publish([make_event(10 + n)])
            took.append(time.monotonic() - started)
        assert max(took) < 0.5, took
    finally:
        await publisher.close()
        await first.stop()
        await second.stop()
        await delete_topology(msgspec.structs.replace(settings, amqp_url=amqp_url))


async def test_intake_answers_503_at_once_when_no_node_answers(settings: Settings) -> None:
    down = msgspec.structs.replace(
        settings,
        amqp_url=f"amqp://guest:guest@127.0.0.1:{closed_port()},127.0.0.1:{closed_port()}/",
    )
    async with running_service(down, consume=False) as svc:
        for n in range(4):
            started = time.monotonic()
            status = await svc.send(message_body("77014000001", f"привет {n}"), store=False)
            assert status == 503
            assert time.monotonic() - started < 1.0


# -- confirmed AND routed, on every publish path ---------------------------------------------
async def _delete_queues(settings: Settings, *names: str) -> None:
    connection = await aio_pika.connect(settings.amqp_url)
    try:
        channel = await connection.channel()
        for name in names:
            await channel.queue_delete(name)
    finally:
        await connection.close()


async def test_unroutable_retry_keeps_the_original_delivery(settings: Settings) -> None:
    """The retry queue of the first tier is gone, so the retry publish comes back as a
    Basic.Return: the delivery must stay in its shard queue, not be acked away."""
    topology = Topology(settings)
    phone = "77014000002"
    t0 = int(time.time()) - 600
    failing = FailingAnalyzer()
    async with running_service(settings, analyzer=failing) as svc:
        for i, text in enumerate(["Здравствуйте", "У нас клиника", "Я владелец"]):
            assert await svc.send(message_body(phone, text, ts=t0 + i)) == 200
        # Within the 1 s debounce, before the first analysis fails.
        await _delete_queues(settings, topology.retry_queue(0))

        async def retried_twice() -> bool:
            return failing.calls >= 2

        await svc.wait_for(retried_twice, timeout=30, what="a second attempt")
    # Nothing acked away: the event still waits in its shard queue, nothing dead-lettered.
    assert await queue_depth(settings) == 3  # one message per webhook
    from service.adapters.broker.dead_letters import dead_queue_depth

    assert await dead_queue_depth(settings, 5.0) == 0


async def test_lead_hot_is_not_lost_while_unroutable(settings: Settings) -> None:
    """`lead.hot` publishes come back unroutable (its queue is gone): the event stays in
    the outbox (the analysis itself is not failed or repeated), and goes out once the
    queue is back, exactly once."""
    topology = Topology(settings)
    phone = "77014000003"
    t0 = int(time.time()) - 7200
    async with running_service(settings, analyzer=CountingAnalyzer()) as svc:
        for i, (from_me, text) in enumerate(HOT_DIALOG):
            await svc.send(message_body(phone, text, from_me=from_me, ts=t0 + i * 60))
            if i == 0:  # intake and drainer have declared the topology by now
                # Every queue bound for lead.hot: its readers' and the outbound webhooks'.
                await _delete_queues(
                    settings, topology.notification_queue, topology.webhook_events_queue
                )
        await svc.wait_row(phone, lambda r: r.interest_level == "hot")
        await svc.wait_idle()
        store = svc.ctx.store
        await asyncio.sleep(1.0)  # several drains, each returned unroutable
        assert await store.outbox_depth() >= 1
        assert svc.drainer.published == 0
        assert svc.ctx.metrics.retries._value.get() == 0  # the analysis did not fail
        connection = await aio_pika.connect(settings.amqp_url)
        try:
            await topology.declare(await connection.channel())  # the queue is back
            channel = await connection.channel()
            queue = await channel.get_queue(topology.notification_queue)

            async def published() -> bool:
                return await store.outbox_depth() == 0

            await svc.wait_for(published, timeout=30, what="the events published")
            await asyncio.sleep(0.3)
            got = []
            while (message := await queue.get(no_ack=True, fail=False)) is not None:
                got.append(message)
        finally:
            await connection.close()
        hot = [m for m in got if m.routing_key == "lead.hot"]
        assert len(hot) == 1
        assert phone.encode() in hot[0].body and b'"score":' in hot[0].body
        assert len({m.message_id for m in got}) == len(got)  # each event once


# -- sharing the shards ------------------------------------------------------------------
def test_assignment_is_fair_complete_and_stable() -> None:
    shards = list(range(32))
    for n in range(1, 40):
        members = [f"host:{1000 + i}:ab" for i in range(n)]
        split = assign(members, shards)
        counts = [len(v) for v in split.values()]
        assert sorted(s for v in split.values() for s in v) == shards
        assert max(counts) - min(counts) <= 1
        assert split == assign(list(reversed(members)), shards)  # same answer everywhere
    eight = assign(["a", "b", "c"], range(8))
    assert sorted(len(v) for v in eight.values()) == [2, 3, 3]
    # One member more moves about a fair share, not everything.
    before = assign([f"m{i}" for i in range(4)], shards)
    after = assign([f"m{i}" for i in range(5)], shards)
    moved = sum(len(set(before[m]) - set(after[m])) for m in before)
    assert moved <= 12, moved


async def _consumer_counts(settings: Settings) -> list[int]:
    topology = Topology(settings)
    connection = await aio_pika.connect(settings.amqp_url)
    try:
        channel = await connection.channel()
        counts = []
        for shard in range(settings.queue_shards):
            queue = await channel.declare_queue(topology.shard_queue(shard), passive=True)
            counts.append(queue.declaration_result.consumer_count or 0)
        return counts
    finally:
        await connection.close()


async def _until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.2)


@pytest.fixture
async def eight_shards(service_settings: Settings) -> AsyncIterator[Settings]:
    s = msgspec.structs.replace(service_settings, queue_shards=8)
    yield s
    await delete_topology(s)


async def test_consumers_started_apart_converge_and_take_over(eight_shards: Settings) -> None:
    settings = eight_shards
    async with app_context(settings) as ctx:
        consumers: list[ContactConsumer] = []

        def split() -> list[int]:
            return sorted(len(c.shards) for c in consumers)

        async def converged_to(expected: list[int]) -> bool:
            owned = [s for c in consumers for s in c.shards]
            if split() != expected or sorted(owned) != list(range(8)):
                return False
            # The broker's view: one consumer on every shard queue, no standby left.
            return await _consumer_counts(settings) == [1] * 8

        try:
            for n, expected in ((1, [8]), (2, [4, 4]), (3, [2, 3, 3])):
                consumer = ContactConsumer(
                    ctx, member=f"test:{n}:{uuid.uuid4().hex[:4]}", heartbeat=0.5
                )
                await consumer.start()
                consumers.append(consumer)
                started = time.monotonic()
                await _until(lambda e=expected: converged_to(e), 30, f"split {expected}")
                assert time.monotonic() - started < 30
            # A process stops: the survivors take its shards.
            gone = consumers.pop(1)
            await gone.stop()
            await _until(lambda: converged_to([4, 4]), 30, "survivors take over")
        finally:
            for consumer in consumers:
                await consumer.stop()


# -- moving an older queue layout ----------------------------------------------------------
async def test_migrate_moves_the_first_layouts_events(settings: Settings) -> None:
    """Classic retry queues and `P.contacts.<i>` shard queues (the first layout, with
    messages in them) are emptied into the new queues; nothing is lost."""
    topology = Topology(settings)
    connection = await aio_pika.connect(settings.amqp_url)
    events = [make_event(n, instance="clinic-sales") for n in range(1, 13)]
    try:
        channel = await connection.channel()
        retry = await channel.get_exchange(topology.retry_exchange)
        intake = await channel.get_exchange(topology.intake_exchange)
        for tier in range(2):  # the first layout's classic retry queues, as it declared them
            queue = await channel.declare_queue(
                topology.legacy_retry_queue(tier),
                durable=True,
                arguments={
                    "x-queue-type": "classic",
                    "x-message-ttl": 3_600_000,
                    "x-dead-letter-exchange": topology.intake_exchange,
                },
            )
            await queue.bind(
                retry, "", arguments={"x-match": "all-with-x", H_LEGACY_RETRY_TIER: str(tier)}
            )
        for shard in range(2):
            queue = await channel.declare_queue(
                topology.legacy_shard_queue(shard),
                durable=True,
                arguments={"x-queue-type": "quorum", "x-single-active-consumer": True},
            )
            await queue.bind(intake, f"shard.{shard}")
        publish = await connection.channel(publisher_confirms=True)
        for n, event in enumerate(events):
            old_shard = shard_for(event.instance, event.contact_key, 2)
            headers = {H_ATTEMPT: 1, H_IDEMPOTENCY_KEYS: [event.idempotency_key]}
            if n % 2:
                exchange = await publish.get_exchange(topology.retry_exchange)
                headers[H_LEGACY_RETRY_TIER] = str(n % 4 // 2)
            else:
                exchange = await publish.get_exchange(topology.intake_exchange)
            await exchange.publish(
                aio_pika.Message(encode_batch([event]), headers=headers),
                routing_key=f"shard.{old_shard}",
                mandatory=True,
            )
    finally:
        await connection.close()

    report = await migrate_topology(settings)
    assert report.complete, report
    assert sum(move.messages for move in report.moved) == len(events)
    # Retry messages wait (TTL) in the new quorum retry queues, then return to their
    # shard (x-death names the retry queue); the rest went straight to the shards.
    found = {}
    connection = await aio_pika.connect(settings.amqp_url)
    try:
        channel = await connection.channel()
        for shard in range(settings.queue_shards):
            for m in await take_all(channel, topology.shard_queue(shard)):
                deaths = (m.headers or {}).get("x-death") or [{}]
                via = str(deaths[0].get("queue", ""))  # type: ignore[union-attr,index]
                for e in msgspec.json.decode(m.body)["events"]:
                    found[e["message_id"]] = (via, shard, m.routing_key)
        for tier in range(2):
            queue = await channel.get_queue(topology.retry_queue(tier))
            while (m := await queue.get(no_ack=True, fail=False)) is not None:
                for e in msgspec.json.decode(m.body)["events"]:
                    found[e["message_id"]] = (topology.retry_queue(tier), tier, m.routing_key)
        for name in (topology.legacy_retry_queue(0), topology.legacy_shard_queue(0)):
            probe = await connection.channel()
            with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
                await probe.declare_queue(name, passive=True)
    finally:
        await connection.close()
    assert sorted(found) == sorted(e.message_id for e in events)
    for event in events:
        via, _, key = found[event.message_id]
        shard = shard_for(event.instance, event.contact_key, settings.queue_shards)
        assert key == topology.shard_key(shard)
        n = events.index(event)
        tier = n % 4 // 2
        assert via == (topology.retry_queue(tier) if n % 2 else ""), (n, via)
