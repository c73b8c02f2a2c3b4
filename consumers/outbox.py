"""Publishes the lead events the store's write rules put in the outbox.

The write that changes a lead also stores its events (`lead.hot`, `lead.stage_changed`)
in `crm_outbox`, in the same transaction (service/sql/0006_lead_history.sql). Every
`consume` and `run` process runs one drainer: it claims a batch (`crm_outbox_claim`: rows
locked with SKIP LOCKED and leased, so several processes never take the same row), then
publishes each event to the events exchange with confirms and mandatory routing (routing
key = the event type, AMQP `message_id` = the outbox row's id, the body as stored), and
only then marks the batch published. A process killed anywhere in between loses nothing:
an unmarked row is claimed again once its lease ends, and published again under the same
`message_id` (readers de-duplicate on it). `serve` and `backfill` processes only write
rows; they wait for the next drain of a consume process.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid

import msgspec
from loguru import logger

from service.adapters.broker.confirm import BrokerUnavailableError
from service.adapters.broker.publisher import EventPublisher
from service.adapters.broker.topology import Topology
from service.adapters.stores.base import OutboxEvent, StoreUnavailableError
from service.bootstrap.context import AppContext

_PUBLISH_TIMEOUT = 10.0
_DEPTH_EVERY = 5.0  # seconds between readings of the outbox depth (a metric)


class OutboxDrainer:
    """Claims, publishes and marks outbox rows until stopped."""

    def __init__(
        self,
        ctx: AppContext,
        topology: Topology | None = None,
        *,
        batch: int = 100,
    ) -> None:
        self._store = ctx.store
        self._metrics = ctx.metrics
        self._topology = topology or Topology(ctx.settings)
        # A publisher of its own (connection named "outbox"): the same confirmed, routed
        # publish, reconnect and channel renewal after a nack as every other publisher.
        self._publisher = EventPublisher(
            ctx.settings,
            topology=self._topology,
            timeout=_PUBLISH_TIMEOUT,
            connection_role="outbox",
        )
        self._batch = batch
        # Longer than a batch takes to publish (each publish is bounded by _PUBLISH_TIMEOUT).
        self._lease = ctx.settings.outbox_lease_seconds
        self._poll = ctx.settings.outbox_poll_seconds  # pause when empty or after a failure
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._depth_at = 0.0
        self.published = 0  # events published by this process (tests, logs)

    async def start(self, stop: asyncio.Event | None = None) -> None:
        """Wait (with backoff) until the broker takes a channel, then start draining."""
        delay = 0.5
        while not await self._publisher.ping():
            if stop is not None and stop.is_set():
                raise BrokerUnavailableError("RabbitMQ unreachable; stopped while waiting")
            logger.warning("broker unreachable, retrying in {:.1f}s", delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 15.0)
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Finish the batch in flight (its rows are marked or left for the next claim)."""
        self._stopping.set()
        if self._task is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._task), _PUBLISH_TIMEOUT + 5)
            if not self._task.done():
                self._task.cancel()
                with contextlib.suppress(BaseException):
                    await self._task
        await self._publisher.close()

    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                sent = await self.drain_once()
            except (StoreUnavailableError, BrokerUnavailableError) as exc:
                logger.warning("outbox drain failed, retrying: {}", exc)
                sent = 0
            except Exception as exc:  # a bug must not stop the events for good
                logger.exception("outbox drain failed: {}: {}", type(exc).__name__, exc)
                sent = 0
            await self._note_depth()
            if sent < self._batch:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), self._poll)

    async def drain_once(self) -> int:
        """Claim one batch, publish it, mark what was published; returns how many."""
        events = await self._store.claim_outbox(self._batch, self._lease)
        done: list[uuid.UUID] = []
        try:
            for event in events:
                await self._publish(event)
                done.append(event.id)
                self._metrics.lead_events.labels(event.type).inc()
        finally:
            if done:
                await self._store.outbox_published(done)
                self.published += len(done)
            rest = [e.id for e in events[len(done) :]]
            if rest:
                # Not published: back to the outbox now rather than at the lease's end.
                with contextlib.suppress(StoreUnavailableError):
                    await self._store.release_outbox(rest)
        return len(done)

    async def _publish(self, event: OutboxEvent) -> None:
        await self._publisher.publish_raw(
            self._topology.events_exchange,
            event.type,
            msgspec.json.encode(event.body),
            message_id=str(event.id),
        )

    async def _note_depth(self) -> None:
        now = time.monotonic()
        if now - self._depth_at < _DEPTH_EVERY:
            return
        self._depth_at = now
        with contextlib.suppress(StoreUnavailableError):
            self._metrics.outbox_depth.set(await self._store.outbox_depth())
