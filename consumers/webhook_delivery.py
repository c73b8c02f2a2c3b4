"""Sends webhook deliveries: a signed POST per attempt, retries off the main queue.

Reads `P.webhooks.deliveries` with NOTIFY_CONCURRENCY deliveries held, each attempt bounded
by NOTIFY_TIMEOUT, at most NOTIFY_ENDPOINT_CONCURRENCY of them sending to one endpoint at
once; one endpoint holds at most half the deliveries (the rest of its deliveries wait in
the shortest retry tier), so a slow or dead endpoint leaves the other half to the others.

Per delivery: a claim in the results store (crm_webhook_claim) lets one sender at a time
send it and none after a 2xx; then the POST. A 2xx ends it. Any other answer, a timeout or
a refused connection sends it to the retry tier the attempt number and `Retry-After` pick;
after NOTIFY_MAX_ATTEMPTS (or a 410 Gone) it goes to the dead-letter queue, from where
`crm-backend dlq replay` sends it again under the same webhook id. Each step is published,
confirmed and routed, before the delivery is acknowledged.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from typing import Any

from aio_pika.abc import AbstractIncomingMessage
from loguru import logger

from consumers.queue_worker import QueueWorker, forward, settle
from service.adapters.broker.envelope import H_ERROR
from service.adapters.broker.publisher import EventPublisher
from service.adapters.broker.topology import WEBHOOK_DELIVERY_KEY, Topology
from service.adapters.stores.base import StoreUnavailableError
from service.adapters.stores.webhooks import WebhookStore
from service.adapters.webhooks_out.envelope import DeliveryRef, attempt_of, delivery_ref
from service.adapters.webhooks_out.sender import AttemptResult, WebhookSender
from service.config import Settings
from service.domain.webhooks import WebhookEndpoint, retry_tier
from service.metrics import Metrics

_LEASE_MARGIN = 30.0  # a claim outlives the attempt's timeout by this much


class WebhookDelivery(QueueWorker):
    role = "webhook-delivery"

    def __init__(
        self,
        settings: Settings,
        store: WebhookStore,
        publisher: EventPublisher,
        sender: WebhookSender,
        metrics: Metrics,
        topology: Topology | None = None,
    ) -> None:
        topology = topology or Topology(settings)
        super().__init__(
            settings,
            topology,
            topology.webhook_deliveries_queue,
            prefetch=settings.notify_concurrency,
            grace=settings.notify_timeout + 5.0,
        )
        self._store = store
        self._publisher = publisher
        self._sender = sender
        self._metrics = metrics
        # Per endpoint: deliveries held (sending or waiting for a sending slot), and the
        # gate of its NOTIFY_ENDPOINT_CONCURRENCY sending slots.
        self._held: Counter[uuid.UUID] = Counter()
        self._gates: dict[uuid.UUID, asyncio.Semaphore] = {}
        # The most deliveries one endpoint holds: half the process's slots (at least its
        # sending slots), so a slow endpoint leaves the other half to the rest.
        self._share = max(settings.notify_endpoint_concurrency, settings.notify_concurrency // 2)

    async def start(self, stop: asyncio.Event | None = None) -> None:
        await self._sender.start()
        await super().start(stop)
        logger.info(
            "webhook delivery started: {} in flight, {}s per attempt, {} attempts",
            self._settings.notify_concurrency,
            self._settings.notify_timeout,
            self._settings.notify_max_attempts,
        )

    async def stop(self) -> None:
        await super().stop()
        await self._sender.close()

    async def handle(self, message: AbstractIncomingMessage) -> None:
        headers: dict[str, Any] = dict(message.headers or {})
        ref = delivery_ref(headers)
        if ref is None:
            await self._dead(message, None, 0, "delivery without its webhook headers")
            return
        attempt = attempt_of(headers)
        endpoint = ref.endpoint_id
        if self._held[endpoint] >= self._share:
            # This endpoint already holds its share of the slots: the rest of its
            # deliveries wait in the shortest retry tier, the slots stay free for others.
            await self._later(message, ref, attempt, None, "deferred")
            return
        self._held[endpoint] += 1
        gate = self._gates.get(endpoint)
        if gate is None:
            gate = self._gates[endpoint] = asyncio.Semaphore(
                self._settings.notify_endpoint_concurrency
            )
        try:
            async with gate:
                await self._deliver(message, ref, attempt)
        finally:
            self._held[endpoint] -= 1
            if self._held[endpoint] <= 0:
                del self._held[endpoint]
                del self._gates[endpoint]

    async def _deliver(
        self, message: AbstractIncomingMessage, ref: DeliveryRef, attempt: int
    ) -> None:
        token = uuid.uuid4()
        lease = self._settings.notify_timeout + _LEASE_MARGIN
        try:
            claim = await self._store.claim_webhook_delivery(
                ref.webhook_id, ref.account, ref.endpoint_id, token, lease
            )
        except StoreUnavailableError as exc:
            logger.warning("webhook delivery postponed: results store unavailable ({})", exc)
            await self._later(message, ref, attempt, None, "deferred")
            return
        if claim.state == "gone":
            self._metrics.notify_deliveries.labels("dropped").inc()
            logger.info("webhook delivery dropped: endpoint removed", endpoint=str(ref.endpoint_id))
            await settle(message, ack=True)
            return
        if claim.state == "done":
            self._metrics.notify_deliveries.labels("duplicate").inc()
            await settle(message, ack=True)
            return
        if claim.state == "busy" or claim.endpoint is None:
            await self._later(message, ref, attempt, None, "deferred")
            return
        result = await self._sender.send(claim.endpoint, ref.webhook_id, message.body)
        self._metrics.notify_attempt_seconds.observe(result.seconds)
        await self._finish(ref, token, result)
        if result.accepted:
            self._metrics.notify_deliveries.labels("sent").inc()
            logger.info(
                "webhook delivered",
                endpoint=str(ref.endpoint_id),
                webhook_id=ref.webhook_id,
                status=result.status,
                attempt=attempt + 1,
            )
            await settle(message, ack=True)
            return
        await self._failed(message, ref, attempt + 1, result, claim.endpoint)

    async def _finish(self, ref: DeliveryRef, token: uuid.UUID, result: AttemptResult) -> None:
        try:
            await self._store.finish_webhook_delivery(
                ref.webhook_id, ref.account, token, result.accepted, result.status
            )
        except StoreUnavailableError as exc:
            # Sent either way; the lease runs out by itself.
            logger.warning("webhook delivery outcome not recorded ({})", exc)

    async def _failed(
        self,
        message: AbstractIncomingMessage,
        ref: DeliveryRef,
        attempt: int,
        result: AttemptResult,
        endpoint: WebhookEndpoint,
    ) -> None:
        error = result.error or "failed"
        if result.permanent or attempt >= self._settings.notify_max_attempts:
            await self._dead(message, ref, attempt, error)
            return
        tier = retry_tier(attempt, self._topology.webhook_retry_delays, result.retry_after)
        logger.warning(
            "webhook attempt {} failed, retry in {:g}s: {}",
            attempt,
            self._topology.webhook_retry_delays[tier],
            error,
            endpoint=str(endpoint.id),
            webhook_id=ref.webhook_id,
        )
        await self._later(message, ref, attempt, error, "failed", tier=tier)

    async def _later(
        self,
        message: AbstractIncomingMessage,
        ref: DeliveryRef,
        attempt: int,
        error: str | None,
        outcome: str,
        *,
        tier: int = 0,
    ) -> None:
        """Into a retry tier (back to the deliveries queue when it expires), then ack."""
        headers = {**ref.headers(attempt, error), **self._topology.webhook_retry_headers(tier)}
        if await forward(
            self._publisher,
            message,
            self._topology.webhooks_retry_exchange,
            WEBHOOK_DELIVERY_KEY,
            headers,
            message_id=ref.webhook_id,
            what="webhook retry",
        ):
            self._metrics.notify_deliveries.labels(outcome).inc()

    async def _dead(
        self, message: AbstractIncomingMessage, ref: DeliveryRef | None, attempt: int, error: str
    ) -> None:
        headers = (
            ref.headers(attempt, error)
            if ref is not None
            else {**dict(message.headers or {}), H_ERROR: error[:500]}
        )
        if not await forward(
            self._publisher,
            message,
            self._topology.dlx_exchange,
            WEBHOOK_DELIVERY_KEY,
            headers,
            message_id=ref.webhook_id if ref is not None else message.message_id,
            what="dead-lettered webhook delivery",
        ):
            return
        self._metrics.notify_deliveries.labels("dead").inc()
        logger.error(
            "webhook delivery dead-lettered after {} attempts: {}",
            attempt,
            error,
            endpoint=str(ref.endpoint_id) if ref is not None else None,
            webhook_id=ref.webhook_id if ref is not None else None,
        )
