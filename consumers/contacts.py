"""Per-contact re-analysis consumer.

Events arrive in shard queues (one single-active-consumer quorum queue per shard, a contact
always in the same shard), so across any number of processes one contact is handled by one
consumer at a time. Here events are grouped per contact and held, unacknowledged, until the
contact has been quiet for DEBOUNCE_SECONDS; then one pipeline run covers the whole burst.
A delivery is acknowledged only when every contact it carried is stored, re-queued for a
delayed retry, or dead-lettered — so a crash at any point loses nothing: the broker
redelivers and the pipeline skips what is already stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import msgspec
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from loguru import logger

from service.broker.envelope import (
    H_ATTEMPT,
    H_ERROR,
    H_IDEMPOTENCY_KEYS,
    H_ORIGINAL_ROUTING_KEY,
    QueuedEvent,
    decode_batch,
    encode_batch,
    header_int,
    shard_for,
    shard_routing_key,
)
from service.broker.topology import H_RETRY_TIER, Topology
from service.config import Settings
from service.context import AppContext
from service.domain.dialog import DialogMessage, from_unix
from service.evolution.resolver import ContactResolver
from service.logs import contact_hash
from service.pipeline import HotLead

_ACCOUNT_TTL = 30.0  # seconds an instance -> account lookup is reused
# Events whose contact is not known yet (a LID-only message, an edit or delete of a
# message not seen) wait in the longest retry tier and are tried again, this long at most;
# then they go to the dead-letter queue (replayable), never silently away.
_HOLD_SECONDS = 7 * 24 * 3600.0
H_HELD = "x-held"  # times an event was held for its contact
H_HELD_SINCE = "x-held-since"  # Unix time it was first held
_SHUTDOWN_GRACE = 25.0  # seconds in-flight analyses get to finish on SIGTERM
_PUBLISH_TIMEOUT = 10.0


@dataclass(eq=False)
class _Delivery:
    """One AMQP message; settled once every contact it carries is handled."""

    message: AbstractIncomingMessage
    parts: int
    attempt: int
    failed: bool = False
    settled: bool = False


@dataclass(eq=False)
class _Contact:
    instance: str
    phone_jid: str
    events: dict[str, QueuedEvent] = field(default_factory=dict)
    deliveries: list[_Delivery] = field(default_factory=list)
    first_at: float = 0.0
    timer: asyncio.TimerHandle | None = None
    running: bool = False
    due: bool = False  # the quiet period ended while an analysis was running


class ContactConsumer:
    def __init__(self, ctx: AppContext, topology: Topology | None = None) -> None:
        self._ctx = ctx
        self._settings: Settings = ctx.settings
        self._topology = topology or Topology(ctx.settings)
        self._pipeline = ctx.require_pipeline()
        self._store = ctx.require_store()
        self._metrics = ctx.metrics
        self._contacts: dict[tuple[str, str], _Contact] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._semaphore = asyncio.Semaphore(ctx.settings.analysis_concurrency)
        self._accounts: dict[str, tuple[float, uuid.UUID | None]] = {}
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._publish_channel: AbstractChannel | None = None
        self._queues: list[tuple[AbstractQueue, str]] = []
        self._stopping = False
        self._resolver = ContactResolver(ctx.reader)
        self.analyses_started = 0  # for tests and metrics: pipeline runs begun
        if self._pipeline.on_hot is None:
            self._pipeline.on_hot = self.publish_hot

    # -- lifecycle -------------------------------------------------------------------
    async def start(self, stop: asyncio.Event | None = None) -> None:
        """Connect (retrying while the broker is down) and start consuming."""
        delay = 0.5
        while True:
            try:
                self._connection = await aio_pika.connect_robust(
                    self._settings.amqp_url, client_properties={"connection_name": "crm-consume"}
                )
                break
            except (OSError, aio_pika.exceptions.AMQPError) as exc:
                # The first connect_robust raises when the broker is down; later drops
                # are recovered by the robust connection itself.
                logger.warning("broker unreachable, retrying in {:.1f}s: {}", delay, exc)
                if stop is not None and stop.is_set():
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 15.0)
        self._channel = await self._connection.channel()
        await self._channel.set_qos(prefetch_count=self._settings.consumer_prefetch)
        self._publish_channel = await self._connection.channel(publisher_confirms=True)
        await self._topology.declare(self._publish_channel)
        shards = self._settings.consumer_shard_list()
        # Start at a random shard: processes starting together then tend to become the
        # active consumer of different shards.
        offset = random.randrange(len(shards))
        for shard in shards[offset:] + shards[:offset]:
            queue = await self._channel.get_queue(self._topology.shard_queue(shard), ensure=True)
            tag = await queue.consume(self._on_message, no_ack=False)
            self._queues.append((queue, tag))
        logger.info(
            "consuming {} shard queue(s), debounce {}s, concurrency {}",
            len(shards),
            self._settings.debounce_seconds,
            self._settings.analysis_concurrency,
        )

    async def stop(self) -> None:
        """Stop consuming, let in-flight analyses finish, hand the rest back to the broker."""
        self._stopping = True
        for queue, tag in self._queues:
            with contextlib.suppress(Exception):
                await queue.cancel(tag)
        self._queues.clear()
        for contact in self._contacts.values():
            if contact.timer is not None:
                contact.timer.cancel()
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=_SHUTDOWN_GRACE)
            for task in pending:
                task.cancel()
            with contextlib.suppress(Exception):
                await asyncio.gather(*pending, return_exceptions=True)
        # Deliveries still held are returned unacknowledged when the channel closes: the
        # broker hands them to the next consumer.
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()
        self._contacts.clear()

    async def idle(self) -> bool:
        """True when nothing is buffered or running (used by tests and the demo)."""
        return not self._contacts and not self._tasks

    # -- intake of deliveries ----------------------------------------------------------
    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        if self._stopping:
            return  # not acked: returned to the queue when the channel closes
        headers = dict(message.headers or {})
        attempt = header_int(headers.get(H_ATTEMPT))
        try:
            batch = decode_batch(message.body)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            await self._poison(message, f"undecodable: {exc}")
            return
        try:
            known = await self._place_unknown(batch.events, headers, attempt)
        except Exception as exc:  # broker trouble: the whole delivery comes back later
            logger.warning("could not re-route events of unknown contacts ({})", exc)
            await asyncio.sleep(1.0)
            await _nack(message)
            return
        groups: dict[tuple[str, str], list[QueuedEvent]] = {}
        for event in known:
            assert event.phone_jid is not None
            groups.setdefault((event.instance, event.phone_jid), []).append(event)
        if not groups:
            await _ack(message)
            return
        delivery = _Delivery(message=message, parts=len(groups), attempt=attempt)
        now = time.monotonic()
        for key, events in groups.items():
            contact = self._contacts.get(key)
            if contact is None:
                contact = self._contacts[key] = _Contact(key[0], key[1], first_at=now)
            if not contact.events:
                contact.first_at = now
            for event in events:
                # A message and its edit or delete are different events.
                contact.events[event.idempotency_key] = event
            contact.deliveries.append(delivery)
            self._schedule(key, contact, now)

    # -- contacts not known from the event itself -------------------------------------------
    async def _place_unknown(
        self, events: list[QueuedEvent], headers: dict[str, Any], attempt: int
    ) -> list[QueuedEvent]:
        """The events whose contact is known; the others are resolved and sent to their
        contact's shard, or held until it can be."""
        known: list[QueuedEvent] = []
        resolved: list[QueuedEvent] = []
        held: list[QueuedEvent] = []
        for event in events:
            self._resolver.remember(event)
            if event.phone_jid is not None:
                known.append(event)
                continue
            if not self._resolver.resolvable(event):
                self._metrics.consumer_skips.labels("no_contact").inc()
                continue
            phone = await self._resolver.resolve(event)
            if phone is None:
                held.append(event)
            else:
                resolved.append(msgspec.structs.replace(event, phone_jid=phone))
        was_held = header_int(headers.get(H_HELD))
        for event in resolved:
            await self._publish_events(self._topology.intake_exchange, [event], {H_ATTEMPT: 0})
            if was_held:
                self._metrics.held_events.labels(_held_kind(event), "resolved").inc()
        if held:
            await self._hold(held, headers, attempt, was_held)
        return known

    async def _hold(
        self, events: list[QueuedEvent], headers: dict[str, Any], attempt: int, was_held: int
    ) -> None:
        now = time.time()
        since = float(headers.get(H_HELD_SINCE) or now)
        if now - since > _HOLD_SECONDS:
            out = {
                H_ERROR: "contact never became known (LID without phone, or unknown message)",
                H_ATTEMPT: attempt,
            }
            await self._publish_events(self._topology.dlx_exchange, events, out)
            for event in events:
                self._metrics.held_events.labels(_held_kind(event), "dead_lettered").inc()
            return
        tier = len(self._topology.retry_delays) - 1
        out = {
            H_ATTEMPT: attempt,
            H_RETRY_TIER: str(tier),
            H_HELD: was_held + 1,
            H_HELD_SINCE: since,
        }
        await self._publish_events(self._topology.retry_exchange, events, out)
        if not was_held:
            for event in events:
                self._metrics.held_events.labels(_held_kind(event), "held").inc()

    async def _publish_events(
        self, exchange: str, events: list[QueuedEvent], headers: dict[str, Any]
    ) -> None:
        """One message per contact shard, confirmed; raises when the broker fails."""
        by_shard: dict[str, list[QueuedEvent]] = {}
        for event in events:
            shard = shard_for(event.instance, event.contact_key, self._settings.queue_shards)
            by_shard.setdefault(shard_routing_key(shard), []).append(event)
        for routing_key, part in by_shard.items():
            out = {
                **headers,
                H_IDEMPOTENCY_KEYS: [e.idempotency_key for e in part],
                H_ORIGINAL_ROUTING_KEY: routing_key,
            }
            await self._publish(exchange, routing_key, encode_batch(part), out)

    def _schedule(self, key: tuple[str, str], contact: _Contact, now: float) -> None:
        if contact.timer is not None:
            contact.timer.cancel()
        waited = now - contact.first_at
        delay = max(
            0.0, min(self._settings.debounce_seconds, self._settings.debounce_max_seconds - waited)
        )
        contact.timer = asyncio.get_running_loop().call_later(delay, self._due, key)

    def _due(self, key: tuple[str, str]) -> None:
        contact = self._contacts.get(key)
        if contact is None or self._stopping:
            return
        contact.timer = None
        if contact.running:
            contact.due = True
            return
        self._launch(key, contact)

    def _launch(self, key: tuple[str, str], contact: _Contact) -> None:
        contact.running = True
        contact.due = False
        events = list(contact.events.values())
        deliveries = contact.deliveries
        contact.events = {}
        contact.deliveries = []
        task = asyncio.create_task(self._process(key, contact, events, deliveries))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- processing ----------------------------------------------------------------------
    async def _process(
        self,
        key: tuple[str, str],
        contact: _Contact,
        events: list[QueuedEvent],
        deliveries: list[_Delivery],
    ) -> None:
        instance, phone_jid = key
        phone = phone_jid.split("@", 1)[0]
        ok = True
        try:
            async with self._semaphore:
                self.analyses_started += 1
                ok = await self._analyze(instance, phone, events, deliveries)
        finally:
            for delivery in deliveries:
                self._settle(delivery, ok)
            contact.running = False
            if contact.events and contact.due and not self._stopping:
                self._launch(key, contact)
            elif not contact.events and contact.timer is None:
                self._contacts.pop(key, None)

    async def _analyze(
        self, instance: str, phone: str, events: list[QueuedEvent], deliveries: list[_Delivery]
    ) -> bool:
        """Run the pipeline; on failure hand the events to the retry path. True = settled."""
        log = logger.bind(instance=instance, contact_hash=contact_hash(phone))
        try:
            account = await self._account_for(instance)
            if account is None:
                self._metrics.consumer_skips.labels("unmapped_instance").inc()
                log.warning(
                    "instance is not mapped to an account; events skipped "
                    "(map it with `crm-backend instances add`, then backfill)"
                )
                return True
            edits, deleted = _changes(events)
            outcome = await self._pipeline.analyze_contact(
                instance,
                phone,
                account,
                extra_messages=_dialog_messages(events),
                contact_name=_push_name(events),
                edits=edits,
                deleted=deleted,
            )
            log.info("contact processed: {}", outcome.outcome, score=outcome.score)
            return True
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            attempt = max(d.attempt for d in deliveries) + 1
            log.warning(
                "analysis failed (attempt {}/{}): {}: {}",
                attempt,
                self._settings.max_attempts,
                type(exc).__name__,
                exc,
            )
            return await self._retry_later(
                instance, events, attempt, f"{type(exc).__name__}: {exc}"
            )

    async def _retry_later(
        self, instance: str, events: list[QueuedEvent], attempt: int, error: str
    ) -> bool:
        """Re-publish a contact's events to a delay queue, or to the DLQ when exhausted."""
        if self._publish_channel is None:
            return False
        routing_key = shard_routing_key(
            shard_for(instance, events[0].contact_key, self._settings.queue_shards)
        )
        headers: dict[str, Any] = {
            H_ATTEMPT: attempt,
            H_ERROR: error[:500],
            H_IDEMPOTENCY_KEYS: [e.idempotency_key for e in events],
            H_ORIGINAL_ROUTING_KEY: routing_key,
        }
        try:
            if attempt >= self._settings.max_attempts:
                await self._publish(
                    self._topology.dlx_exchange, routing_key, encode_batch(events), headers
                )
                self._metrics.dead_lettered.labels("attempts_exhausted").inc(len(events))
                logger.error("events dead-lettered after {} attempts", attempt, instance=instance)
            else:
                tier = self._topology.tier_for_attempt(attempt)
                headers["x-retry-tier"] = str(tier)
                await self._publish(
                    self._topology.retry_exchange, routing_key, encode_batch(events), headers
                )
                self._metrics.retries.inc(len(events))
            return True
        except Exception as exc:  # broker trouble: the deliveries go back to the queue
            logger.warning("could not schedule retry ({}); returning events to the queue", exc)
            return False

    async def _poison(self, message: AbstractIncomingMessage, reason: str) -> None:
        headers = dict(message.headers or {})
        headers[H_ERROR] = reason[:500]
        headers[H_ORIGINAL_ROUTING_KEY] = message.routing_key or ""
        try:
            await self._publish(
                self._topology.dlx_exchange, message.routing_key or "", message.body, headers
            )
        except Exception as exc:
            logger.warning("could not dead-letter a poison message ({}); requeued", exc)
            with contextlib.suppress(Exception):
                await message.nack(requeue=True)
            return
        self._metrics.dead_lettered.labels("undecodable").inc()
        logger.error("undecodable message sent to the dead-letter queue")
        await _ack(message)

    async def _publish(
        self, exchange_name: str, routing_key: str, body: bytes, headers: dict[str, Any]
    ) -> None:
        assert self._publish_channel is not None
        exchange = await self._publish_channel.get_exchange(exchange_name, ensure=False)
        await exchange.publish(
            aio_pika.Message(
                body,
                headers=headers,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=routing_key,
            mandatory=True,
            timeout=_PUBLISH_TIMEOUT,
        )

    async def publish_hot(self, lead: HotLead) -> None:
        """`lead.hot` on the events exchange; a few quick tries, never fails the analysis."""
        body = msgspec.json.encode(lead)
        for attempt in range(3):
            try:
                await self._publish(self._topology.events_exchange, "lead.hot", body, {})
                self._metrics.hot_leads.inc()
                return
            except Exception as exc:
                logger.warning("lead.hot publish failed (try {}): {}", attempt + 1, exc)
                await asyncio.sleep(0.5 * (attempt + 1))

    def _settle(self, delivery: _Delivery, ok: bool) -> None:
        if delivery.settled:
            return
        delivery.failed = delivery.failed or not ok
        delivery.parts -= 1
        if delivery.parts > 0:
            return
        delivery.settled = True
        message = delivery.message
        if delivery.failed:
            task = asyncio.create_task(_nack(message))
        else:
            task = asyncio.create_task(_ack(message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _account_for(self, instance: str) -> uuid.UUID | None:
        now = time.monotonic()
        cached = self._accounts.get(instance)
        if cached is not None and now - cached[0] < _ACCOUNT_TTL:
            return cached[1]
        account = await self._store.instance_account(instance)
        self._accounts[instance] = (now, account)
        return account


def _held_kind(event: QueuedEvent) -> str:
    return "lid" if event.lid is not None else "unknown_message"


def _changes(events: Iterable[QueuedEvent]) -> tuple[dict[str, str], set[str]]:
    """Edits (message id -> newest text) and deleted message ids among the events."""
    edits: dict[str, tuple[int, str]] = {}
    deleted: set[str] = set()
    for event in events:
        if event.change == "delete":
            deleted.add(event.message_id)
        elif event.change == "edit" and event.text is not None:
            current = edits.get(event.message_id)
            if current is None or event.timestamp >= current[0]:
                edits[event.message_id] = (event.timestamp, event.text)
    return {k: text for k, (_, text) in edits.items()}, deleted


def _dialog_messages(events: Iterable[QueuedEvent]) -> list[DialogMessage]:
    return [
        DialogMessage(
            id=e.message_id,
            from_me=e.from_me,
            timestamp=from_unix(e.timestamp),
            text=e.text,
            type=e.message_type,
        )
        for e in events
        if e.text is not None and e.change is None
    ]


def _push_name(events: list[QueuedEvent]) -> str | None:
    for event in sorted(events, key=lambda e: e.timestamp, reverse=True):
        if not event.from_me and event.push_name and event.change is None:
            return event.push_name
    return None


async def _ack(message: AbstractIncomingMessage) -> None:
    try:
        await message.ack()
    except Exception as exc:
        # The channel closed (broker restart): the broker redelivers this message and the
        # pipeline finds the contact already stored.
        logger.debug("ack failed, message will be redelivered: {}", exc)


async def _nack(message: AbstractIncomingMessage) -> None:
    try:
        await message.nack(requeue=True)
    except Exception as exc:
        logger.debug("nack failed, message will be redelivered: {}", exc)
