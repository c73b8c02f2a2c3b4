"""Optional intake from Evolution's own RabbitMQ exchange (EVOLUTION_AMQP_EXCHANGE).

Evolution can publish the webhook bodies to a topic exchange itself (routing key = event
name). This bridge consumes them from the quorum queue `P.evolution-in`, runs the same
intake logic as the webhook handler and publishes through the same confirmed publisher;
a delivery is acknowledged only after that confirm. A malformed body goes to the
dead-letter queue at once; a broker hiccup returns the delivery to the queue.
"""

from __future__ import annotations

import asyncio
import contextlib

from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from loguru import logger

from service.adapters.broker.connection import connect_until_up
from service.adapters.broker.envelope import H_ERROR, H_ORIGINAL_ROUTING_KEY
from service.adapters.broker.publisher import BrokerUnavailableError, EventPublisher
from service.adapters.broker.topology import Topology
from service.bootstrap.context import AppContext
from service.usecases.intake import Accepted, Ignored, event_label
from service.usecases.intake_guard import parse_checked

_RETRY_PAUSE = 1.0  # seconds before a delivery that could not be published is returned


class EvolutionBridge:
    def __init__(
        self, ctx: AppContext, *, topology: Topology | None = None, prefetch: int = 256
    ) -> None:
        if not ctx.settings.evolution_amqp_exchange:
            raise RuntimeError("EVOLUTION_AMQP_EXCHANGE is not set")
        self._source = ctx.settings.evolution_amqp_exchange
        self._settings = ctx.settings
        self._publisher: EventPublisher = ctx.require_publisher()
        self._metrics = ctx.metrics
        self._topology = topology or Topology(ctx.settings)
        self._prefetch = prefetch
        self._connection: AbstractRobustConnection | None = None
        # Held so aio-pika restores the channel (and its consumer) after a reconnect.
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._tag: str | None = None
        self._stopping = False

    async def start(self, stop: asyncio.Event | None = None) -> None:
        """Connect (retrying while the broker is down), declare, start consuming."""
        self._connection = await connect_until_up(self._settings, "evolution-bridge", stop)
        channel = self._channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=self._prefetch)
        await self._topology.declare(channel)
        name = await self._topology.declare_bridge(channel, self._source)
        self._queue = await channel.get_queue(name, ensure=True)
        self._tag = await self._queue.consume(self._on_message, no_ack=False)
        logger.info("bridging Evolution's exchange {!r} into intake", self._source)

    async def stop(self) -> None:
        self._stopping = True
        if self._queue is not None and self._tag is not None:
            with contextlib.suppress(Exception):
                await self._queue.cancel(self._tag)
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        if self._stopping:
            return  # unacknowledged: returned to the queue when the channel closes
        outcome = parse_checked(
            message.body, max_skew_seconds=self._settings.max_clock_skew_seconds
        )
        counter = self._metrics.webhook_events
        label = event_label(outcome.event)
        if isinstance(outcome, Ignored):
            counter.labels(label, "ignored").inc()
            await _settle(message, ack=True)
            return
        if not isinstance(outcome, Accepted):
            counter.labels(label, "rejected").inc()
            await self._dead_letter(message, outcome.reason)
            return
        try:
            await self._publisher.publish(outcome.events)
        except BrokerUnavailableError as exc:
            counter.labels(label, "unavailable").inc()
            logger.debug("bridged event not queued, returning it: {}", exc)
            await asyncio.sleep(_RETRY_PAUSE)
            await _settle(message, ack=False)
            return
        counter.labels(label, "queued").inc()
        await _settle(message, ack=True)

    async def _dead_letter(self, message: AbstractIncomingMessage, reason: str) -> None:
        headers = dict(message.headers or {})
        headers[H_ERROR] = f"rejected at intake: {reason}"[:500]
        headers[H_ORIGINAL_ROUTING_KEY] = message.routing_key or ""
        try:
            await self._publisher.publish_raw(
                self._topology.dlx_exchange, message.routing_key or "", message.body, headers
            )
        except BrokerUnavailableError as exc:
            logger.warning("could not dead-letter a malformed Evolution event ({})", exc)
            await asyncio.sleep(_RETRY_PAUSE)
            await _settle(message, ack=False)
            return
        logger.warning("malformed Evolution event sent to the dead-letter queue: {}", reason)
        await _settle(message, ack=True)


async def _settle(message: AbstractIncomingMessage, *, ack: bool) -> None:
    try:
        if ack:
            await message.ack()
        else:
            await message.nack(requeue=True)
    except Exception as exc:
        # Channel gone (broker restart): the broker redelivers; duplicates are harmless.
        logger.debug("settling a bridged delivery failed: {}", exc)
