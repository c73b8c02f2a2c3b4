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

from consumers.membership import Membership
from service.adapters.broker.assignment import assign
from service.adapters.broker.confirm import BrokerUnavailableError, NackedError, publish_confirmed
from service.adapters.broker.connection import connect_until_up
from service.adapters.broker.envelope import (
    H_ATTEMPT,
    H_ERROR,
    H_ORIGINAL_ROUTING_KEY,
    QueuedEvent,
    batch_headers,
    by_shard,
    decode_batch,
    encode_batch,
    header_int,
    shard_for,
)
from service.adapters.broker.topology import Topology
from service.adapters.evolution.resolver import ContactResolver
from service.bootstrap.context import AppContext
from service.config import Settings
from service.domain.dialog import DialogMessage, from_unix
from service.logs import contact_hash
from service.usecases.intake_guard import event_problem

_ACCOUNT_TTL = 30.0  # seconds an instance -> account lookup is reused
# Events whose contact is not known yet (a LID-only message, an edit or delete of a
# message not seen) wait in the longest retry tier and are tried again, this long at most;
# then they go to the dead-letter queue (replayable), never silently away.
_HOLD_SECONDS = 7 * 24 * 3600.0
H_HELD = "x-held"  # times an event was held for its contact
H_HELD_SINCE = "x-held-since"  # Unix time it was first held
_SHUTDOWN_GRACE = 25.0  # seconds in-flight analyses get to finish on SIGTERM
_PUBLISH_TIMEOUT = 10.0
_REBALANCE_EVERY = 1.0  # seconds between checks of the fair share
_HANDOVER_GRACE = 30.0  # longest a released shard waits for its running analyses


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
    shard: int
    events: dict[str, QueuedEvent] = field(default_factory=dict)
    deliveries: list[_Delivery] = field(default_factory=list)
    first_at: float = 0.0
    timer: asyncio.TimerHandle | None = None
    running: bool = False
    due: bool = False  # the quiet period ended while an analysis was running


class ContactConsumer:
    """Consumes its fair share of the shard queues (see `_rebalance`) and analyses
    contacts; any number of these, in any processes, share the shards."""

    def __init__(
        self,
        ctx: AppContext,
        topology: Topology | None = None,
        *,
        member: str | None = None,
        heartbeat: float = 2.0,
    ) -> None:
        self._ctx = ctx
        self._settings: Settings = ctx.settings
        self._topology = topology or Topology(ctx.settings)
        self._pipeline = ctx.pipeline
        self._store = ctx.store
        self._metrics = ctx.metrics
        self._contacts: dict[tuple[str, str], _Contact] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._semaphore = asyncio.Semaphore(ctx.settings.analysis_concurrency)
        self._accounts: dict[str, tuple[float, uuid.UUID | None]] = {}
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._publish_channel: AbstractChannel | None = None
        # shard -> (queue, consumer tag) of the shards this process subscribed to
        self._subscribed: dict[int, tuple[AbstractQueue, str]] = {}
        self._tags: dict[str, int] = {}  # consumer tag -> shard
        self._releasing: set[int] = set()
        # CONSUMER_SHARDS pins a process to a fixed set (then no rebalancing).
        self._pinned = bool(ctx.settings.consumer_shards.strip())
        self._membership = (
            None
            if self._pinned
            else Membership(self._topology, member, interval=heartbeat, expiry=3.5 * heartbeat)
        )
        self._rebalancer: asyncio.Task[None] | None = None
        self._renewed_at = -1.0
        self._stopping = False
        self._resolver = ContactResolver(ctx.reader, pairs=self._store)
        self.analyses_started = 0  # for tests and metrics: pipeline runs begun

    @property
    def shards(self) -> list[int]:
        """Shards this process consumes now (for tests and logs)."""
        return sorted(set(self._subscribed) - self._releasing)

    # -- lifecycle -------------------------------------------------------------------
    async def start(self, stop: asyncio.Event | None = None) -> None:
        """Connect (retrying while no node is reachable) and start consuming."""
        self._connection = await connect_until_up(self._settings, "consume", stop)
        self._channel = await self._connection.channel()
        await self._channel.set_qos(prefetch_count=self._settings.consumer_prefetch)
        self._publish_channel = await self._connection.channel(
            publisher_confirms=True, on_return_raises=True
        )
        await self._topology.declare(self._publish_channel)
        await self._warn_old_layout()
        if self._membership is None:
            for shard in self._settings.consumer_shard_list():
                await self._subscribe(shard)
            self._log_share(1)
        else:
            await self._membership.start(self._connection)
            self._rebalancer = asyncio.create_task(self._rebalance())
        logger.info(
            "consumer started: {} shards, debounce {}s, concurrency {}",
            self._settings.queue_shards,
            self._settings.debounce_seconds,
            self._settings.analysis_concurrency,
        )

    async def stop(self) -> None:
        """Stop consuming, let in-flight analyses finish, hand the rest back to the broker."""
        self._stopping = True
        if self._rebalancer is not None:
            self._rebalancer.cancel()
            with contextlib.suppress(BaseException):
                await self._rebalancer
        for queue, tag in self._subscribed.values():
            with contextlib.suppress(Exception):
                await queue.cancel(tag)
        self._subscribed.clear()
        if self._membership is not None:
            # After the cancels: the others take these shards as soon as they hear it.
            await self._membership.leave()
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

    # -- sharing the shards -----------------------------------------------------------
    async def _rebalance(self) -> None:
        """Keep this process on its fair share of the shards as processes come and go.

        Single-active-consumer keeps a shard exclusive at every moment: a process
        subscribing to a shard that another still consumes waits as a standby until the
        other cancels. A process only ever cancels voluntarily, after its analyses of
        that shard are done (`_release`)."""
        assert self._membership is not None
        # A newcomer's hello is answered at once: wait for the answers before the first
        # split, so it does not take every shard for a moment.
        await asyncio.sleep(1.0)
        members = 0
        while not self._stopping:
            current = self._membership.members()
            mine = set(assign(current, range(self._settings.queue_shards))[self._membership.me])
            for shard in sorted(mine - set(self._subscribed)):
                try:
                    await self._subscribe(shard)
                except Exception as exc:  # reconnecting: the next round retries
                    logger.debug("could not subscribe to shard {}: {}", shard, exc)
            for shard in sorted(set(self._subscribed) - mine - self._releasing):
                self._releasing.add(shard)
                task = asyncio.create_task(self._release(shard))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            if len(current) != members:
                members = len(current)
                self._log_share(members)
            self._membership.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._membership.changed.wait(), _REBALANCE_EVERY)

    def _log_share(self, members: int) -> None:
        logger.info(
            "consuming {} of {} shard queues ({} consume processes)",
            len(self._subscribed) - len(self._releasing),
            self._settings.queue_shards,
            members,
        )

    async def _subscribe(self, shard: int) -> None:
        assert self._channel is not None
        # ensure=True (a passive declare): aio-pika restores after a reconnect only the
        # consumers of queues its robust channel declared (robust_channel.py, `_queues`).
        queue = await self._channel.get_queue(self._topology.shard_queue(shard), ensure=True)
        tag = await queue.consume(self._on_message, no_ack=False)
        self._subscribed[shard] = (queue, tag)
        self._tags[tag] = shard

    async def _release(self, shard: int) -> None:
        """Hand a shard to its new owner: finish its running analyses, cancel, return
        what is held unanalysed (the new owner is a standby until the cancel)."""
        try:
            deadline = time.monotonic() + _HANDOVER_GRACE
            # A short poll: analyses run in tasks shared with the other shards.
            while time.monotonic() < deadline and any(  # noqa: ASYNC110
                c.running for c in self._contacts.values() if c.shard == shard
            ):
                await asyncio.sleep(0.05)
            entry = self._subscribed.pop(shard, None)
            if entry is not None:
                queue, tag = entry
                self._tags.pop(tag, None)
                with contextlib.suppress(Exception):
                    await queue.cancel(tag)
            for key, contact in list(self._contacts.items()):
                if contact.shard != shard or contact.running:
                    continue
                if contact.timer is not None:
                    contact.timer.cancel()
                for delivery in contact.deliveries:
                    self._hand_back(delivery)
                self._contacts.pop(key, None)
        finally:
            self._releasing.discard(shard)
        self._log_share(len(self._membership.members()) if self._membership else 1)

    def _hand_back(self, delivery: _Delivery) -> None:
        if delivery.settled:
            return
        delivery.settled = True
        task = asyncio.create_task(_nack(delivery.message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _warn_old_layout(self) -> None:
        """Say so when queues of the first layout still exist (their events wait there)."""
        assert self._connection is not None
        channel = await self._connection.channel()
        try:
            queue = await channel.declare_queue(self._topology.legacy_shard_queue(0), passive=True)
        except aio_pika.exceptions.ChannelClosed:
            return
        except Exception:
            return
        finally:
            with contextlib.suppress(Exception):
                await channel.close()
        logger.warning(
            "queues of an older layout exist ({} holds {} messages): run "
            "`crm-backend topology migrate` to move their events",
            queue.name,
            queue.declaration_result.message_count or 0,
        )

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
        # Events that can never be stored (queued before intake refused them, or bridged)
        # go to the dead-letter queue alone: the contact's good events are processed.
        for event in batch.events:
            problem = event_problem(event)
            if problem is None:
                continue
            dead = await self._retry_later(
                event.instance, [event], self._settings.max_attempts, f"poison event: {problem}"
            )
            if not dead:
                await _nack(message)
                return
        good = [event for event in batch.events if event_problem(event) is None]
        try:
            known = await self._place_unknown(good, headers, attempt)
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
                shard = shard_for(key[0], events[0].contact_key, self._settings.queue_shards)
                contact = self._contacts[key] = _Contact(key[0], key[1], shard, first_at=now)
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
            await self._resolver.remember(event)
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
        longest = len(self._topology.retry_delays)  # the n-th attempt uses the last tier
        out = {
            H_ATTEMPT: attempt,
            **self._topology.retry_headers(longest),
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
        for shard, part in by_shard(events, self._settings.queue_shards).items():
            routing_key = self._topology.shard_key(shard)
            out = batch_headers(part, {**headers, H_ORIGINAL_ROUTING_KEY: routing_key})
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
        if contact.running or contact.shard in self._releasing:
            contact.due = True  # a released shard's events go back unanalysed
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
            if (
                contact.events
                and contact.due
                and not self._stopping
                and contact.shard not in self._releasing
            ):
                self._launch(key, contact)
            elif not contact.events and contact.timer is None:
                self._contacts.pop(key, None)

    async def _analyze(
        self,
        instance: str,
        phone: str,
        events: list[QueuedEvent],
        deliveries: list[_Delivery],
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
        routing_key = self._topology.shard_key(
            shard_for(instance, events[0].contact_key, self._settings.queue_shards)
        )
        headers = batch_headers(
            events, {H_ATTEMPT: attempt, H_ERROR: error[:500], H_ORIGINAL_ROUTING_KEY: routing_key}
        )
        try:
            if attempt >= self._settings.max_attempts:
                await self._publish(
                    self._topology.dlx_exchange, routing_key, encode_batch(events), headers
                )
                self._metrics.dead_lettered.labels("attempts_exhausted").inc(len(events))
                logger.error("events dead-lettered after {} attempts", attempt, instance=instance)
            else:
                headers.update(self._topology.retry_headers(attempt))
                await self._publish(
                    self._topology.retry_exchange, routing_key, encode_batch(events), headers
                )
                self._metrics.retries.inc(len(events))
            return True
        except BrokerUnavailableError as exc:
            # Not confirmed, or returned unroutable: the deliveries go back to the queue.
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
        """Confirmed and routed, or `BrokerUnavailableError` (then nothing is acked)."""
        if self._publish_channel is None:
            raise BrokerUnavailableError("not connected")
        try:
            async with asyncio.timeout(_PUBLISH_TIMEOUT):
                await publish_confirmed(
                    self._publish_channel, exchange_name, routing_key, body, headers
                )
        except NackedError:
            await self._renew_publish_channel()
            raise
        except TimeoutError:
            raise BrokerUnavailableError(
                f"RabbitMQ did not confirm within {_PUBLISH_TIMEOUT:g}s"
            ) from None

    async def _renew_publish_channel(self) -> None:
        """A new channel after a nack: the broker's state for the old one may refuse every
        later publish (see confirm.NackedError)."""
        now = time.monotonic()
        if self._connection is None or now < self._renewed_at + 1.0:
            return
        self._renewed_at = now
        old = self._publish_channel
        try:
            self._publish_channel = await self._connection.channel(
                publisher_confirms=True, on_return_raises=True
            )
        except Exception as exc:
            logger.debug("could not open a new channel: {}", exc)
            return
        if old is not None:
            with contextlib.suppress(Exception):
                await old.close()

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
