"""Optional intake from Evolution's own RabbitMQ exchange (EVOLUTION_AMQP_EXCHANGE).

Evolution can publish the webhook bodies to a topic exchange itself (routing key = event
name). This bridge consumes them from the quorum queue `P.evolution-in`, runs the same
intake logic as the webhook handler and publishes through the same confirmed publisher;
a delivery is acknowledged only after that confirm. A malformed body goes to the
dead-letter queue at once; a broker hiccup returns the delivery to the queue.
"""

from __future__ import annotations

import asyncio

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from loguru import logger

from consumers.queue_worker import PAUSE, QueueWorker, forward, settle
from service.adapters.broker.envelope import H_ERROR, H_ORIGINAL_ROUTING_KEY
from service.adapters.broker.publisher import BrokerUnavailableError, EventPublisher
from service.adapters.broker.topology import Topology
from service.bootstrap.context import AppContext
from service.usecases.intake import Accepted, Ignored, event_label
from service.usecases.intake_guard import parse_checked


class EvolutionBridge(QueueWorker):
    role = "evolution-bridge"

    def __init__(
        self, ctx: AppContext, *, topology: Topology | None = None, prefetch: int = 256
    ) -> None:
        if not ctx.settings.evolution_amqp_exchange:
            raise RuntimeError("EVOLUTION_AMQP_EXCHANGE is not set")
        topology = topology or Topology(ctx.settings)
        super().__init__(ctx.settings, topology, "", prefetch=prefetch, grace=5.0)
        self._source = ctx.settings.evolution_amqp_exchange
        self._publisher: EventPublisher = ctx.publisher
        self._metrics = ctx.metrics

    async def queue_on(self, channel: AbstractChannel) -> str:
        name = await self._topology.declare_bridge(channel, self._source)
        logger.info("bridging Evolution's exchange {!r} into intake", self._source)
        return name

    async def handle(self, message: AbstractIncomingMessage) -> None:
        outcome = parse_checked(
            message.body, max_skew_seconds=self._settings.max_clock_skew_seconds
        )
        counter = self._metrics.webhook_events
        label = event_label(outcome.event)
        if isinstance(outcome, Ignored):
            counter.labels(label, "ignored").inc()
            await settle(message, ack=True)
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
            await asyncio.sleep(PAUSE)
            await settle(message, ack=False)
            return
        counter.labels(label, "queued").inc()
        await settle(message, ack=True)

    async def _dead_letter(self, message: AbstractIncomingMessage, reason: str) -> None:
        headers = dict(message.headers or {})
        headers[H_ERROR] = f"rejected at intake: {reason}"[:500]
        headers[H_ORIGINAL_ROUTING_KEY] = message.routing_key or ""
        if await forward(
            self._publisher,
            message,
            self._topology.dlx_exchange,
            message.routing_key or "",
            headers,
            message_id=message.message_id,
            what="malformed Evolution event (to the dead-letter queue)",
        ):
            logger.warning("malformed Evolution event sent to the dead-letter queue: {}", reason)
