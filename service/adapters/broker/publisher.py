"""Confirmed, batched publishing of queued events to RabbitMQ.

`publish()` returns only once the broker has confirmed every AMQP message carrying the
caller's events (persistent messages, mandatory routing, publisher confirms). Each webhook
request calls it once; awaiting one confirm per request caps intake at a few hundred
requests a second, so calls are group-committed: events that arrive while a flush is in
flight wait and leave together in the next one, grouped into one message per shard.
When nothing is in flight a flush starts at once, so an idle service adds no latency;
under load (the previous flush carried several requests) a flush waits while requests
keep arriving, up to `linger` (2 ms), which makes batches larger and AMQP messages per
request fewer: each confirmed message costs the client and the broker far more CPU than
an event inside it.

The connection goes to any live node of AMQP_URL and fails over to another on loss
(service/adapters/broker/connection.py; aio-pika restores the channel). While no node answers,
every publish fails at once with `BrokerUnavailableError` (intake answers 503) and a new
connect is tried at most once per `retry_interval`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import msgspec
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection
from loguru import logger

from service.adapters.broker.confirm import (
    BrokerUnavailableError,
    NackedError,
    Outgoing,
    publish_confirmed,
    publish_confirmed_many,
)
from service.adapters.broker.connection import MultiNodeConnection, connect_cluster
from service.adapters.broker.envelope import (
    H_ATTEMPT,
    QueuedEvent,
    batch_headers,
    encode_batch,
    shard_for,
)
from service.adapters.broker.topology import Topology
from service.config import Settings

__all__ = ["BrokerUnavailableError", "EventPublisher", "PublishStats"]

_event_encoder = msgspec.json.Encoder()
# An EventBatch is assembled from events encoded once (their sizes decide the chunks):
# `{"v":1,"events":[` + events joined by "," + `]}`, exactly what encode_batch writes.
_BATCH_HEAD = encode_batch([]).removesuffix(b"]}")
_BATCH_TAIL = b"]}"
_ENVELOPE_BYTES = len(_BATCH_HEAD) + len(_BATCH_TAIL)
# A flush that carried this many requests means the service is busy (see `linger`).
_BUSY_BATCH = 8


@dataclass
class PublishStats:
    """Counters of one publisher (for tests, the benchmark and debugging)."""

    requests: int = 0  # publish() calls confirmed
    events: int = 0  # events confirmed (after de-duplication within a flush)
    messages: int = 0  # AMQP messages confirmed
    flushes: int = 0  # group commits sent
    failures: int = 0  # AMQP messages not confirmed
    flush_seconds: float = 0.0  # time from a flush's first write to its last confirm


@dataclass(eq=False)
class _Request:
    events: list[QueuedEvent]
    future: asyncio.Future[None]


@dataclass(eq=False)
class _Chunk:
    """One AMQP message of a flush: events of one shard and the requests relying on it."""

    shard: int
    events: list[QueuedEvent] = field(default_factory=list)
    parts: list[bytes] = field(default_factory=list)  # the events, JSON-encoded
    size: int = _ENVELOPE_BYTES
    requests: set[int] = field(default_factory=set)


class EventPublisher:
    def __init__(
        self,
        settings: Settings,
        *,
        topology: Topology | None = None,
        timeout: float = 5.0,
        max_batch_events: int = 500,
        max_batch_bytes: int = 1_000_000,
        max_flush_events: int = 2_000,
        max_in_flight: int = 2,
        linger: float = 0.002,
        retry_interval: float = 1.0,
        connection_role: str = "intake",
    ) -> None:
        self._settings = settings
        self._topology = topology or Topology(settings)
        self._timeout = timeout
        self._max_batch_events = max_batch_events
        self._max_batch_bytes = max_batch_bytes
        self._max_flush_events = max_flush_events
        self._max_in_flight = max_in_flight
        self._retry_interval = retry_interval
        self._connection_role = connection_role
        # Strong references: aio-pika restores only channels somebody still holds.
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        self._connecting: asyncio.Task[AbstractRobustChannel] | None = None
        self._retry_at = 0.0
        self._renewing: asyncio.Task[None] | None = None
        self._renewed_at = -1.0
        self._last_error = "RabbitMQ not connected yet"
        self._healthy = True
        self._waiting: deque[_Request] = deque()
        self._in_flight = 0
        self._flush_starting = False
        self._tasks: set[asyncio.Task[Any]] = set()
        # Message ids of unconfirmed messages: aiormq maps a returned message back to its
        # publish by message id, so two in flight must never share one.
        self._pending_ids: set[str] = set()
        self._closed = False
        self._linger = linger
        self._last_batch = 0  # requests in the latest flush: a busy service lingers
        self.stats = PublishStats()

    # -- public API ----------------------------------------------------------------------
    async def publish(self, events: list[QueuedEvent]) -> None:
        """Return once RabbitMQ confirmed every message carrying `events`."""
        if not events:
            return
        if self._closed:
            raise BrokerUnavailableError("publisher is closed")
        request = _Request(events, asyncio.get_running_loop().create_future())
        self._waiting.append(request)
        self._start_flush()
        # No timer per call: every flush is bounded by `timeout`, and a waiting request
        # leaves with the next flush, so this wait is bounded by about twice that.
        await request.future
        self.stats.requests += 1

    async def publish_raw(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        headers: dict[str, Any] | None = None,
        *,
        message_id: str | None = None,
    ) -> None:
        """One persistent, mandatory, confirmed message to any exchange (retry, DLQ, events)."""
        if self._closed:
            raise BrokerUnavailableError("publisher is closed")
        try:
            async with asyncio.timeout(self._timeout):
                await self._confirmed(exchange, routing_key, body, headers or {}, message_id)
        except TimeoutError:
            raise self._timed_out() from None

    async def ping(self) -> bool:
        """True when a confirming channel to the broker is open (for /ready)."""
        if self._closed:
            return False
        try:
            async with asyncio.timeout(min(self._timeout, 3.0)):
                channel = await self._ready_channel()
        except (BrokerUnavailableError, TimeoutError):
            return False
        return not channel.is_closed

    async def close(self) -> None:
        """Let in-flight flushes finish (bounded), fail what still waits, disconnect."""
        self._closed = True
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=self._timeout + 1)
        while self._waiting:
            request = self._waiting.popleft()
            if not request.future.done():
                request.future.set_exception(BrokerUnavailableError("publisher is closed"))
        for task in list(self._tasks):
            task.cancel()
        if self._connecting is not None and not self._connecting.done():
            self._connecting.cancel()
            with contextlib.suppress(BaseException):
                await self._connecting
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()
        self._connection = None
        self._channel = None

    # -- group commit --------------------------------------------------------------------
    def _start_flush(self) -> None:
        """Start a flush task unless one is about to start or too many are in flight."""
        if self._flush_starting or not self._waiting or self._in_flight >= self._max_in_flight:
            return
        self._flush_starting = True
        self._in_flight += 1
        # A context of its own: the flush serves many requests, not the one that started it.
        task = asyncio.create_task(self._flush(), context=contextvars.Context())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _flush(self) -> None:
        # Started on the next loop turn: every publish() of the current turn joins it.
        try:
            if self._linger > 0 and self._last_batch >= _BUSY_BATCH:
                # Busy: a moment's wait lets the batch grow, and per-message costs
                # (client and broker) dominate intake under load. Idle: no wait at all.
                await self._gather_arrivals()
            self._flush_starting = False
            batch = self._take_batch()
            self._last_batch = len(batch)
            # More waiting than one flush carries: the next flush may start right away.
            self._start_flush()
            if batch:
                await self._send(batch)
        finally:
            self._in_flight -= 1
            if not self._closed:
                self._start_flush()

    async def _gather_arrivals(self) -> None:
        """Wait while requests keep joining, at most `linger`: loop turns until one adds
        no request (the burst that arrived together has been read and decoded), so a
        flush neither leaves part of a burst behind nor idles once it is complete."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._linger
        seen, quiet = len(self._waiting), 0
        # Two quiet turns: a request read in one turn reaches publish() in the next.
        while quiet < 2 and loop.time() < deadline:
            await asyncio.sleep(0)
            quiet = quiet + 1 if len(self._waiting) == seen else 0
            seen = len(self._waiting)

    def _take_batch(self) -> list[_Request]:
        batch: list[_Request] = []
        count = 0
        while self._waiting:
            request = self._waiting[0]
            if request.future.done():  # its caller gave up (timeout or cancellation)
                self._waiting.popleft()
                continue
            if batch and count + len(request.events) > self._max_flush_events:
                break
            self._waiting.popleft()
            batch.append(request)
            count += len(request.events)
        return batch

    def _chunks(self, batch: list[_Request]) -> list[_Chunk]:
        """Events grouped per shard (one message each, split at the size caps), each
        Evolution message once even when delivered twice."""
        shards = self._settings.queue_shards
        chunks: list[_Chunk] = []
        open_chunks: dict[int, _Chunk] = {}
        placed: dict[str, _Chunk] = {}
        for index, request in enumerate(batch):
            for event in request.events:
                key = event.idempotency_key
                chunk = placed.get(key)
                if chunk is None:
                    shard = shard_for(event.instance, event.contact_key, shards)
                    part = _event_encoder.encode(event)
                    size = len(part) + 1
                    chunk = open_chunks.get(shard)
                    if chunk is None or (
                        chunk.events
                        and (
                            len(chunk.events) >= self._max_batch_events
                            or chunk.size + size > self._max_batch_bytes
                        )
                    ):
                        chunk = open_chunks[shard] = _Chunk(shard)
                        chunks.append(chunk)
                    chunk.events.append(event)
                    chunk.parts.append(part)
                    chunk.size += size
                    placed[key] = chunk
                chunk.requests.add(index)
        return chunks

    async def _send(self, batch: list[_Request]) -> None:
        try:
            await self._send_chunks(batch)
        finally:
            # Cancelled mid-flush (shutdown): nobody may wait forever.
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(BrokerUnavailableError("publish interrupted"))

    async def _send_chunks(self, batch: list[_Request]) -> None:
        chunks = self._chunks(batch)
        results: list[BrokerUnavailableError | None]
        started = time.perf_counter()
        try:
            # One deadline for the whole flush (a timer per message costs at high rates).
            async with asyncio.timeout(self._timeout):
                results = await self._send_all(chunks)
        except TimeoutError:
            results = [self._timed_out()] * len(chunks)
        except BrokerUnavailableError as exc:
            results = [exc] * len(chunks)
        self.stats.flushes += 1
        self.stats.flush_seconds += time.perf_counter() - started
        failed: dict[int, BaseException] = {}
        for chunk, result in zip(chunks, results, strict=True):
            if result is not None:
                self.stats.failures += 1
                for index in chunk.requests:
                    failed.setdefault(index, result)
            else:
                self.stats.messages += 1
                self.stats.events += len(chunk.events)
        for index, request in enumerate(batch):
            if request.future.done():
                continue
            error = failed.get(index)
            if error is None:
                request.future.set_result(None)
            else:
                request.future.set_exception(error)

    async def _send_all(self, chunks: list[_Chunk]) -> list[BrokerUnavailableError | None]:
        """Every chunk of a flush as one confirmed publish each, written together."""
        messages: list[Outgoing] = []
        ids: list[str] = []
        for chunk in chunks:
            message_id = chunk.events[0].idempotency_key if len(chunk.events) == 1 else None
            if message_id is not None:
                if message_id in self._pending_ids:
                    message_id = None  # a random, unique one instead (see _confirmed)
                else:
                    self._pending_ids.add(message_id)
                    ids.append(message_id)
            messages.append(
                Outgoing(
                    routing_key=self._topology.shard_key(chunk.shard),
                    body=_BATCH_HEAD + b",".join(chunk.parts) + _BATCH_TAIL,
                    headers=batch_headers(chunk.events, {H_ATTEMPT: 0}),
                    message_id=message_id,
                )
            )
        try:
            channel = await self._ready_channel()
            results = await publish_confirmed_many(
                channel, self._topology.intake_exchange, messages
            )
        except BrokerUnavailableError as exc:
            self._note_failure(str(exc))
            raise
        finally:
            self._pending_ids.difference_update(ids)
        failures = [r for r in results if r is not None]
        if failures:
            self._note_failure(str(failures[0]))
            if any(isinstance(r, NackedError) for r in failures):
                self._renew_channel()
        elif not self._healthy:
            self._healthy = True
            logger.info("RabbitMQ publishing recovered")
        return results

    # -- one confirmed message (callers bound the time it may take) ---------------------
    async def _confirmed(
        self,
        exchange_name: str,
        routing_key: str,
        body: bytes,
        headers: dict[str, Any],
        message_id: str | None,
    ) -> None:
        if message_id is not None and message_id in self._pending_ids:
            message_id = None  # aiormq then assigns a random, unique one
        if message_id is not None:
            self._pending_ids.add(message_id)
        try:
            channel = await self._ready_channel()
            await publish_confirmed(
                channel, exchange_name, routing_key, body, headers, message_id=message_id
            )
        except BrokerUnavailableError as exc:
            self._note_failure(str(exc))
            if isinstance(exc, NackedError):
                self._renew_channel()
            raise
        finally:
            if message_id is not None:
                self._pending_ids.discard(message_id)
        if not self._healthy:
            self._healthy = True
            logger.info("RabbitMQ publishing recovered")

    def _renew_channel(self) -> None:
        """Replace the channel after a nack (at most once a second): the broker's state
        for it may refuse every later publish (see confirm.NackedError)."""
        loop = asyncio.get_running_loop()
        if self._renewing is not None or loop.time() < self._renewed_at + 1.0:
            return
        self._renewed_at = loop.time()
        self._renewing = asyncio.create_task(self._renew(), context=contextvars.Context())

    async def _renew(self) -> None:
        try:
            old, connection = self._channel, self._connection
            if connection is None or self._closed:
                return
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            assert isinstance(channel, AbstractRobustChannel)
            self._channel = channel
            if old is not None:
                with contextlib.suppress(Exception):
                    await old.close()
            logger.info("RabbitMQ refused publishes: publishing on a new channel")
        except Exception as exc:
            logger.debug("could not open a new channel: {}", exc)
        finally:
            self._renewing = None

    def _timed_out(self) -> BrokerUnavailableError:
        self._note_failure(f"no confirm within {self._timeout:g}s")
        return BrokerUnavailableError(f"RabbitMQ did not confirm within {self._timeout:g}s")

    def _note_failure(self, reason: str) -> None:
        if self._healthy:
            self._healthy = False
            logger.warning("RabbitMQ publish failed: {}", reason)
        else:
            logger.debug("RabbitMQ publish failed: {}", reason)

    # -- connection ----------------------------------------------------------------------
    async def _ready_channel(self) -> AbstractRobustChannel:
        channel = self._channel
        if channel is None:
            channel = await self._connect()
        elif isinstance(self._connection, MultiNodeConnection) and self._connection.unreachable:
            # Every node refused since the connection was lost: answer at once (intake
            # turns this into 503, which Evolution retries) instead of holding the
            # request for the whole publish timeout. A drop with a live node left is
            # bridged: the wait below lasts one reconnect.
            raise BrokerUnavailableError("no RabbitMQ node reachable; reconnecting")
        # After a drop the robust connection restores the channel in the background.
        await channel.ready()
        return channel

    async def _connect(self) -> AbstractRobustChannel:
        loop = asyncio.get_running_loop()
        if self._connecting is not None and self._retry_at:
            # A connect is under way after a failed one: no node answered a moment ago,
            # so this request does not wait for the attempt.
            raise BrokerUnavailableError(self._last_error)
        if self._connecting is None:
            if self._closed:
                raise BrokerUnavailableError("publisher is closed")
            if loop.time() < self._retry_at:
                raise BrokerUnavailableError(self._last_error)
            # A task of its own: a caller's timeout must not abandon a half-open connection.
            self._connecting = asyncio.create_task(self._open(), context=contextvars.Context())
            self._connecting.add_done_callback(self._connect_done)
        return await asyncio.shield(self._connecting)

    def _connect_done(self, task: asyncio.Task[AbstractRobustChannel]) -> None:
        if self._connecting is task:
            self._connecting = None
        if not task.cancelled():
            task.exception()  # retrieved here: every waiter may have timed out already

    async def _open(self) -> AbstractRobustChannel:
        connection: AbstractRobustConnection | None = None
        try:
            connection = await connect_cluster(
                self._settings,
                self._connection_role,
                timeout=self._timeout,
                reconnect_interval=self._retry_interval,
            )
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            assert isinstance(channel, AbstractRobustChannel)
            await self._topology.declare(channel)
        except Exception as exc:
            if connection is not None:
                with contextlib.suppress(Exception):
                    await connection.close()
            self._retry_at = asyncio.get_running_loop().time() + self._retry_interval
            self._last_error = f"RabbitMQ unavailable ({type(exc).__name__}: {exc})"
            self._note_failure(self._last_error)
            raise BrokerUnavailableError(self._last_error) from exc
        self._connection = connection
        self._channel = channel
        self._retry_at = 0.0
        self._healthy = True
        logger.info("connected to RabbitMQ for publishing")
        return channel
