"""A consumer of one queue: connect (retrying while the broker is down), consume with a
prefetch, handle each delivery in its own task, and on stop let running ones finish.

Deliveries not settled when the connection closes go back to their queue.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from loguru import logger

from service.adapters.broker.confirm import BrokerUnavailableError
from service.adapters.broker.connection import connect_until_up
from service.adapters.broker.publisher import EventPublisher
from service.adapters.broker.topology import Topology
from service.config import Settings

PAUSE = 1.0  # seconds before a delivery that could not be forwarded is returned


class QueueWorker:
    role = "worker"

    def __init__(
        self, settings: Settings, topology: Topology, queue: str, *, prefetch: int, grace: float
    ) -> None:
        self._settings = settings
        self._topology = topology
        self._queue_name = queue
        self._prefetch = prefetch
        self._grace = grace
        self._connection: AbstractRobustConnection | None = None
        # Held so aio-pika restores the channel (and its consumer) after a reconnect.
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._tag: str | None = None
        self._running: set[asyncio.Task[object]] = set()
        self._stopping = False

    async def start(self, stop: asyncio.Event | None = None) -> None:
        """Connect (retrying while the broker is down), declare, start consuming."""
        self._connection = await connect_until_up(self._settings, self.role, stop)
        channel = self._channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=self._prefetch)
        await self._topology.declare(channel)
        self._queue = await channel.get_queue(await self.queue_on(channel), ensure=True)
        self._tag = await self._queue.consume(self._on_message, no_ack=False)

    async def queue_on(self, channel: AbstractChannel) -> str:
        """The queue to consume (declared by the topology unless a subclass adds one)."""
        return self._queue_name

    async def stop(self) -> None:
        self._stopping = True
        if self._queue is not None and self._tag is not None:
            with contextlib.suppress(Exception):
                await self._queue.cancel(self._tag)
        if self._running:
            _, pending = await asyncio.wait(set(self._running), timeout=self._grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()

    def busy(self) -> int:
        """Deliveries being handled now (for tests)."""
        return len(self._running)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        if self._stopping:
            return  # unacknowledged: returned to the queue when the channel closes
        task = asyncio.current_task()
        assert task is not None  # aiormq runs each delivery in a task of its own
        self._running.add(task)
        try:
            await self.handle(message)
        except Exception as exc:
            # Unexpected: the delivery goes back and is tried again (the queue's delivery
            # limit dead-letters one that keeps failing).
            logger.warning("{} failed on a delivery ({}): returned to the queue", self.role, exc)
            await settle(message, ack=False)
        finally:
            self._running.discard(task)

    async def handle(self, message: AbstractIncomingMessage) -> None:
        raise NotImplementedError


async def settle(message: AbstractIncomingMessage, *, ack: bool) -> None:
    try:
        if ack:
            await message.ack()
        else:
            await message.nack(requeue=True)
    except Exception as exc:
        # Channel gone (broker restart): the broker redelivers it.
        logger.debug("settling a delivery failed: {}", exc)


async def forward(
    publisher: EventPublisher,
    message: AbstractIncomingMessage,
    exchange: str,
    routing_key: str,
    headers: dict[str, Any],
    *,
    message_id: str | None,
    what: str,
) -> bool:
    """Publish `message.body` elsewhere (retry tier, dead letters), then ack the delivery.
    When the broker does not take it, the delivery goes back to its queue after a pause
    (no busy loop) and False is returned: nothing is lost either way."""
    try:
        await publisher.publish_raw(
            exchange, routing_key, message.body, headers, message_id=message_id
        )
    except BrokerUnavailableError as exc:
        logger.warning("{} not published ({}); the delivery comes back", what, exc)
        await asyncio.sleep(PAUSE)
        await settle(message, ack=False)
        return False
    await settle(message, ack=True)
    return True
