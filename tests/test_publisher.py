"""Topology and the confirmed, batched publisher on the real RabbitMQ.

Network faults are made with a small TCP proxy between the publisher and the broker
(drop its connections, stop it, start it again), never by touching RabbitMQ itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import aio_pika
import aiormq
import msgspec
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from service.adapters.broker.confirm import (
    NackedError,
    Outgoing,
    UnroutableError,
    publish_confirmed_many,
)
from service.adapters.broker.envelope import (
    H_ATTEMPT,
    H_IDEMPOTENCY_KEYS,
    QueuedEvent,
    decode_batch,
    shard_for,
)
from service.adapters.broker.publisher import BrokerUnavailableError, EventPublisher
from service.adapters.broker.topology import DELIVERY_LIMIT, H_RETRY_DELAY, Topology
from service.config import Settings, load_settings
from tests.harness import delete_topology

WEBHOOK_TOKEN = "intake-test-token-0123456789abcdef012345"
API_TOKEN = "intake-test-api-token-0123456789abcdef01"


# -- shared helpers (also used by test_intake and test_webhook_auth) -----------------------
def amqp_settings(amqp_url: str, prefix: str, **overrides: Any) -> Settings:
    env = {
        "AMQP_URL": amqp_url,
        "AMQP_PREFIX": prefix,
        "QUEUE_SHARDS": "4",
        "RETRY_DELAYS": "0.2,0.4",
        "WEBHOOK_TOKEN": WEBHOOK_TOKEN,
        "API_TOKEN": API_TOKEN,
        "LOG_LEVEL": "WARNING",
    }
    env.update({k.upper(): str(v) for k, v in overrides.items()})
    return load_settings(env, dotenv=None)


def make_event(n: int, *, phone: str | None = None, instance: str = "clinic-sales") -> QueuedEvent:
    number = phone or f"7701{n:07d}"
    return QueuedEvent(
        event="messages.upsert",
        instance=instance,
        message_id=f"3EB0{n:012d}",
        remote_jid=f"{number}@s.whatsapp.net",
        phone_jid=f"{number}@s.whatsapp.net",
        from_me=False,
        timestamp=1_759_482_845 + n,
        message_type="conversation",
        text=f"message {n}",
        push_name="Клиент",
    )


async def take_all(
    channel: AbstractChannel, queue_name: str, timeout: float = 5.0
) -> list[AbstractIncomingMessage]:
    """Consume every message waiting in a queue (shard queues refuse basic.get: they have
    a single active consumer)."""
    queue = await channel.declare_queue(queue_name, passive=True)
    expected = queue.declaration_result.message_count or 0
    got: list[AbstractIncomingMessage] = []
    if expected == 0:
        return got
    done = asyncio.Event()

    async def on_message(message: AbstractIncomingMessage) -> None:
        got.append(message)
        if len(got) >= expected:
            done.set()

    tag = await queue.consume(on_message, no_ack=True)
    try:
        await asyncio.wait_for(done.wait(), timeout)
    finally:
        await queue.cancel(tag)
    return got


async def queued_count(settings: Settings, queue_name: str) -> int:
    connection = await aio_pika.connect(settings.amqp_url)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(queue_name, passive=True)
        return queue.declaration_result.message_count or 0
    finally:
        await connection.close()


async def drain(settings: Settings) -> list[tuple[int, AbstractIncomingMessage]]:
    """Every message waiting in the shard queues (removed), with its shard number."""
    topology = Topology(settings)
    got: list[tuple[int, AbstractIncomingMessage]] = []
    connection = await aio_pika.connect(settings.amqp_url)
    try:
        channel = await connection.channel()
        for shard in range(settings.queue_shards):
            for message in await take_all(channel, topology.shard_queue(shard)):
                got.append((shard, message))
    finally:
        await connection.close()
    return got


def events_of(messages: list[tuple[int, AbstractIncomingMessage]]) -> list[QueuedEvent]:
    return [event for _, message in messages for event in decode_batch(message.body).events]


def closed_port() -> int:
    """A local port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class TcpProxy:
    """Forwards a local port to the broker; can drop its connections or stop listening."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.WriteTransport] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(
            self._accept, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        for w in (writer, up_writer):
            self._transports.add(w.transport)
        pumps = [
            asyncio.create_task(self._pump(reader, up_writer)),
            asyncio.create_task(self._pump(up_reader, writer)),
        ]
        self._tasks.update(pumps)
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for w in (writer, up_writer):
            w.transport.abort()
            self._transports.discard(w.transport)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()

    def drop_connections(self) -> None:
        """Abort every proxied TCP connection at once (a network failure, no AMQP close)."""
        for transport in list(self._transports):
            transport.abort()
        self._transports.clear()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        self.drop_connections()
        for task in list(self._tasks):
            task.cancel()
        self._tasks.clear()


@pytest.fixture
async def settings(amqp_url: str, amqp_prefix: str) -> AsyncIterator[Settings]:
    s = amqp_settings(amqp_url, amqp_prefix)
    yield s
    await delete_topology(s)


@pytest.fixture
async def publisher(settings: Settings) -> AsyncIterator[EventPublisher]:
    p = EventPublisher(settings)
    yield p
    await p.close()


@pytest.fixture
async def proxy(amqp_url: str) -> AsyncIterator[TcpProxy]:
    url = aio_pika.connection.make_url(amqp_url)
    p = TcpProxy(url.host or "127.0.0.1", url.port or 5672)
    await p.start()
    yield p
    await p.stop()


def via_proxy(settings: Settings, proxy: TcpProxy) -> Settings:
    url = aio_pika.connection.make_url(settings.amqp_url).with_port(proxy.port)
    return msgspec.structs.replace(settings, amqp_url=str(url))


# -- topology ------------------------------------------------------------------------------
async def test_topology_names_and_tiers(settings: Settings) -> None:
    topology = Topology(settings)
    p = settings.amqp_prefix
    assert topology.intake_exchange == f"{p}.intake"
    assert topology.retry_exchange == f"{p}.retry"
    assert topology.dlx_exchange == f"{p}.dlx"
    assert topology.events_exchange == f"{p}.events"
    assert topology.dead_queue == f"{p}.dead"
    assert topology.shard_queue(3) == f"{p}.contacts.3-of-4"
    assert topology.shard_key(3) == "shard.3-of-4"
    assert topology.retry_queue(1) == f"{p}.retry.400ms"
    assert topology.notification_queue == f"{p}.notifications"
    assert [topology.tier_for_attempt(a) for a in (0, 1, 2, 3, 9)] == [0, 0, 1, 1, 1]
    assert topology.retry_headers(2) == {H_RETRY_DELAY: "400"}
    assert topology.retry_arguments(1)["x-message-ttl"] == 400
    assert topology.webhook_deliveries_queue == f"{p}.webhooks.deliveries"
    assert topology.webhook_retry_queue(0) == f"{p}.webhooks.retry.5000ms"
    # shards + retry tiers + dead, notifications, bridge + webhook events, deliveries, tiers
    assert len(topology.all_queues()) == 4 + 2 + 3 + 2 + len(topology.webhook_retry_delays)


async def test_topology_declares_contract_arguments(settings: Settings) -> None:
    """Declaring twice works; a queue re-declared with any other argument is refused by
    the broker, which proves each argument is set as the contract says."""
    topology = Topology(settings)
    connection = await aio_pika.connect(settings.amqp_url)
    try:
        channel = await connection.channel()
        await topology.declare(channel)
        await topology.declare(channel)  # idempotent
        expected = topology.shard_arguments()
        assert expected["x-delivery-limit"] == DELIVERY_LIMIT == 20
        assert expected["x-queue-type"] == "quorum"
        await channel.declare_queue(topology.shard_queue(0), durable=True, arguments=expected)
        changes: dict[str, Any] = {
            "x-delivery-limit": 5,
            "x-single-active-consumer": False,
            "x-dead-letter-exchange": "elsewhere",
            "x-dead-letter-strategy": "at-most-once",
            "x-overflow": "drop-head",
            "x-queue-leader-locator": "client-local",
        }
        for name, value in changes.items():
            channel = await connection.channel()
            with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed):
                await channel.declare_queue(
                    topology.shard_queue(1), durable=True, arguments={**expected, name: value}
                )
        # Retry queues are replicated (quorum), dead-letter at least once, spread leaders.
        retry = topology.retry_arguments(0)
        assert retry["x-queue-type"] == "quorum"
        retry_changes: dict[str, Any] = {
            "x-message-ttl": 999,
            "x-queue-type": "classic",
            "x-dead-letter-strategy": "at-most-once",
            "x-overflow": "drop-head",
            "x-queue-leader-locator": "client-local",
        }
        for name, value in retry_changes.items():
            channel = await connection.channel()
            with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed):
                await channel.declare_queue(
                    topology.retry_queue(0), durable=True, arguments={**retry, name: value}
                )
    finally:
        await connection.close()


async def test_retry_tier_returns_message_to_its_shard(settings: Settings) -> None:
    topology = Topology(settings)
    connection = await aio_pika.connect(settings.amqp_url)
    try:
        channel = await connection.channel()
        await topology.declare(channel)
        retry = await channel.get_exchange(topology.retry_exchange)
        started = time.monotonic()
        await retry.publish(
            aio_pika.Message(b'{"v":1,"events":[]}', headers=topology.retry_headers(2)),
            routing_key=topology.shard_key(2),
        )
        while time.monotonic() - started < 5:
            if await queued_count(settings, topology.shard_queue(2)):
                break
            await asyncio.sleep(0.05)
        assert time.monotonic() - started >= 0.35  # held for tier 1's 0.4 s
        await asyncio.sleep(0.3)  # a copy through tier 0 as well would be back by now
        messages = await take_all(channel, topology.shard_queue(2))
        assert len(messages) == 1, f"{len(messages)} copies came back to shard 2"
        assert messages[0].routing_key == topology.shard_key(2)
        for other in (0, 1, 3):
            assert await queued_count(settings, topology.shard_queue(other)) == 0
    finally:
        await connection.close()


async def test_rejected_shard_message_is_dead_lettered(settings: Settings) -> None:
    topology = Topology(settings)
    connection = await aio_pika.connect(settings.amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        await topology.declare(channel)
        intake = await channel.get_exchange(topology.intake_exchange)
        await intake.publish(aio_pika.Message(b"poison"), routing_key=topology.shard_key(0))
        received: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        shard0 = await channel.get_queue(topology.shard_queue(0))
        await shard0.consume(received.put, no_ack=False)
        message = await asyncio.wait_for(received.get(), 5)
        await message.reject(requeue=False)
        dead = await channel.get_queue(topology.dead_queue)
        got = None
        for _ in range(50):
            got = await dead.get(no_ack=True, fail=False)
            if got is not None:
                break
            await asyncio.sleep(0.05)
        assert got is not None and got.body == b"poison"
    finally:
        await connection.close()


# -- publishing ------------------------------------------------------------------------------
async def test_publish_is_persistent_with_idempotency_headers(
    settings: Settings, publisher: EventPublisher
) -> None:
    events = [make_event(1), make_event(2), make_event(3, phone="77010000001")]
    await publisher.publish(events)
    got = drain_sorted = sorted(await drain(settings), key=lambda m: m[1].body)
    assert sorted(e.message_id for e in events_of(got)) == sorted(e.message_id for e in events)
    for shard, message in drain_sorted:
        batch = decode_batch(message.body)
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert message.content_type == "application/json"
        headers = message.headers or {}
        keys = [e.idempotency_key for e in batch.events]
        assert list(headers[H_IDEMPOTENCY_KEYS]) == keys  # type: ignore[arg-type]
        assert headers[H_ATTEMPT] == 0
        for event in batch.events:
            assert shard_for(event.instance, event.contact_key, settings.queue_shards) == shard
        if len(batch.events) == 1:
            assert message.message_id == batch.events[0].idempotency_key


async def test_concurrent_publishes_are_group_committed(
    settings: Settings, publisher: EventPublisher
) -> None:
    await publisher.publish([make_event(0)])  # connect first: the rest overlap a flush
    await asyncio.gather(*(publisher.publish([make_event(n)]) for n in range(1, 500)))
    got = await drain(settings)
    ids = [e.message_id for e in events_of(got)]
    assert len(ids) == 500 and len(set(ids)) == 500
    assert len(got) < 100, f"{len(got)} AMQP messages for 500 events: no batching"
    assert publisher.stats.requests == 500
    assert publisher.stats.messages == len(got)


async def test_batches_respect_size_caps_and_drop_duplicates(settings: Settings) -> None:
    publisher = EventPublisher(settings, max_batch_events=7, max_batch_bytes=2_000)
    try:
        # One contact: all 40 events share a shard; a retried delivery repeats 5 of them.
        events = [make_event(n, phone="77019990000") for n in range(40)]
        await asyncio.gather(publisher.publish(events[:20]), publisher.publish(events[15:]))
        got = await drain(settings)
    finally:
        await publisher.close()
    assert sorted(e.message_id for e in events_of(got)) == sorted(e.message_id for e in events)
    for _, message in got:
        assert len(decode_batch(message.body).events) <= 7
        assert len(message.body) <= 2_000
    assert len(got) >= 6


async def test_unroutable_message_is_an_error(publisher: EventPublisher) -> None:
    await publisher.publish([make_event(1)])  # declares the topology
    topology = Topology(publisher._settings)
    with pytest.raises(BrokerUnavailableError, match="unroutable"):
        await publisher.publish_raw(topology.events_exchange, "nobody.listens", b"{}")
    # The channel stays usable afterwards.
    await publisher.publish([make_event(2)])


async def test_nacked_message_is_an_error(settings: Settings, publisher: EventPublisher) -> None:
    topology = Topology(settings)
    await publisher.publish([make_event(1)])
    connection = await aio_pika.connect(settings.amqp_url)
    try:
        channel = await connection.channel()
        # A full queue that refuses new messages: the broker nacks the publish.
        full = await channel.declare_queue(
            "", exclusive=True, arguments={"x-max-length": 0, "x-overflow": "reject-publish"}
        )
        await full.bind(topology.events_exchange, routing_key="full.queue")
        with pytest.raises(BrokerUnavailableError, match="nack"):
            await publisher.publish_raw(topology.events_exchange, "full.queue", b"{}")
    finally:
        await connection.close()


async def test_batch_publish_reports_each_message(
    settings: Settings, publisher: EventPublisher
) -> None:
    """One write for several messages, one outcome each: routed and confirmed, returned
    unroutable, refused (nack); the channel keeps working afterwards."""
    topology = Topology(settings)
    await publisher.publish([make_event(1)])  # declares the topology
    connection = await aio_pika.connect(settings.amqp_url)
    try:
        channel = await connection.channel()
        full = await channel.declare_queue(
            "", exclusive=True, arguments={"x-max-length": 0, "x-overflow": "reject-publish"}
        )
        await full.bind(topology.events_exchange, routing_key="full.queue")
        good = await channel.declare_queue("", exclusive=True)
        await good.bind(topology.events_exchange, routing_key="good.queue")
        confirming = await connection.channel(publisher_confirms=True, on_return_raises=True)
        batch = [
            Outgoing("good.queue", b'{"n":1}', {H_ATTEMPT: 0}, "batch-id-1"),
            Outgoing("nobody.listens", b"{}", {}),
            Outgoing("full.queue", b"{}", {}),
            Outgoing("good.queue", b'{"n":2}', {}),
        ]
        results = await publish_confirmed_many(confirming, topology.events_exchange, batch)
        assert results[0] is None and results[3] is None
        assert isinstance(results[1], UnroutableError)
        assert isinstance(results[2], NackedError)
        first = await good.get(timeout=5)
        second = await good.get(timeout=5)
        assert (first.body, second.body) == (b'{"n":1}', b'{"n":2}')
        assert first.message_id == "batch-id-1" and second.message_id
        assert first.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert first.headers == {H_ATTEMPT: 0}
        assert await publish_confirmed_many(
            confirming, topology.events_exchange, [Outgoing("good.queue", b"{}", {})]
        ) == [None]
    finally:
        await connection.close()


async def test_publish_raw_reaches_a_bound_queue(
    settings: Settings, publisher: EventPublisher
) -> None:
    topology = Topology(settings)
    await publisher.publish([make_event(1)])
    connection = await aio_pika.connect(settings.amqp_url)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue("", exclusive=True)
        await queue.bind(topology.events_exchange, routing_key="lead.#")
        await publisher.publish_raw(
            topology.events_exchange, "lead.hot", b'{"score":80}', {"x-test": "1"}
        )
        message = await queue.get(no_ack=True)
        assert message is not None and message.body == b'{"score":80}'
        assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert (message.headers or {})["x-test"] == "1"
    finally:
        await connection.close()


# -- broker unavailable and recovery -----------------------------------------------------------
async def test_broker_down_fails_fast_then_recovers(settings: Settings, proxy: TcpProxy) -> None:
    await proxy.stop()  # nothing listens on the proxy's port yet
    publisher = EventPublisher(via_proxy(settings, proxy), retry_interval=0.3)
    try:
        started = time.monotonic()
        with pytest.raises(BrokerUnavailableError):
            await publisher.publish([make_event(1)])
        with pytest.raises(BrokerUnavailableError):  # inside the retry window: no new try
            await publisher.publish([make_event(1)])
        assert time.monotonic() - started < 2
        assert await publisher.ping() is False

        await proxy.start()  # the broker is reachable again: the next publish connects
        await asyncio.sleep(0.35)
        await publisher.publish([make_event(1)])
        assert await publisher.ping() is True
    finally:
        await publisher.close()
    assert [e.message_id for e in events_of(await drain(settings))] == [make_event(1).message_id]


async def test_closed_port_is_unavailable(settings: Settings) -> None:
    dead = msgspec.structs.replace(
        settings, amqp_url=f"amqp://guest:guest@127.0.0.1:{closed_port()}/"
    )
    publisher = EventPublisher(dead)
    try:
        with pytest.raises(BrokerUnavailableError, match="unavailable"):
            await publisher.publish([make_event(1)])
        assert await publisher.ping() is False
    finally:
        await publisher.close()


async def test_silent_broker_times_out(settings: Settings) -> None:
    """A host that accepts TCP but never speaks AMQP: bounded wait, then an error."""

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    publisher = EventPublisher(
        msgspec.structs.replace(settings, amqp_url=f"amqp://guest:guest@127.0.0.1:{port}/"),
        timeout=0.5,
    )
    try:
        started = time.monotonic()
        with pytest.raises(BrokerUnavailableError):
            await publisher.publish([make_event(1)])
        assert time.monotonic() - started < 3
    finally:
        await publisher.close()
        server.close()
        await server.wait_closed()


async def test_connection_closed_under_publisher_recovers(
    settings: Settings, publisher: EventPublisher
) -> None:
    await publisher.publish([make_event(1)])
    connection = publisher._connection
    assert connection is not None and connection.transport is not None
    # Close the underlying AMQP connection behind the robust wrapper's back.
    await connection.transport.connection.close()
    await publisher.publish([make_event(2)])
    ids = sorted(e.message_id for e in events_of(await drain(settings)))
    assert ids == [make_event(1).message_id, make_event(2).message_id]


async def test_network_drop_recovers(settings: Settings, proxy: TcpProxy) -> None:
    publisher = EventPublisher(via_proxy(settings, proxy), retry_interval=0.3)
    try:
        await publisher.publish([make_event(1)])
        proxy.drop_connections()
        delivered = 0
        # The first publish after the drop may fail (503: Evolution retries); within a few
        # seconds publishing works again without a restart.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                await publisher.publish([make_event(2)])
                delivered += 1
                break
            except BrokerUnavailableError:
                await asyncio.sleep(0.2)
        assert delivered == 1
        await publisher.publish([make_event(3)])
    finally:
        await publisher.close()
    ids = {e.message_id for e in events_of(await drain(settings))}
    assert {make_event(n).message_id for n in (1, 2, 3)} <= ids


async def test_publish_after_close_is_refused(publisher: EventPublisher) -> None:
    await publisher.publish([make_event(1)])
    await publisher.close()
    with pytest.raises(BrokerUnavailableError, match="closed"):
        await publisher.publish([make_event(2)])
    assert await publisher.ping() is False


async def test_close_fails_waiting_publishes_promptly(settings: Settings) -> None:
    """A publisher shut down while the broker does not answer leaves nobody waiting."""

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    publisher = EventPublisher(
        msgspec.structs.replace(settings, amqp_url=f"amqp://guest:guest@127.0.0.1:{port}/"),
        timeout=1.0,
        max_in_flight=1,
    )
    try:
        first = asyncio.create_task(publisher.publish([make_event(1)]))
        await asyncio.sleep(0.05)
        second = asyncio.create_task(publisher.publish([make_event(2)]))  # queued behind
        await asyncio.sleep(0.05)
        started = time.monotonic()
        await publisher.close()
        for task in (first, second):
            with pytest.raises(BrokerUnavailableError):
                await asyncio.wait_for(task, 5)
        assert time.monotonic() - started < 4
    finally:
        server.close()
        await server.wait_closed()
