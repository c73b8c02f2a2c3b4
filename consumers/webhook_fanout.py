"""Events → deliveries: one per endpoint of the event's account subscribed to its type.

Reads `P.webhooks.events`. Each delivery is published, confirmed and routed, to
`P.webhooks.deliveries` before the event is acknowledged; a crash in between publishes
them again under the same webhook ids, which the delivery worker sends once. While the
results store is unreachable the event waits in a retry tier; a body that is not an
event goes to the dead-letter queue.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

import msgspec
from aio_pika.abc import AbstractIncomingMessage
from loguru import logger

from consumers.queue_worker import PAUSE, QueueWorker, forward, settle
from service.adapters.broker.confirm import BrokerUnavailableError
from service.adapters.broker.envelope import H_ATTEMPT, H_ERROR
from service.adapters.broker.publisher import EventPublisher
from service.adapters.broker.topology import WEBHOOK_DELIVERY_KEY, WEBHOOK_EVENT_KEY, Topology
from service.adapters.stores.base import StoreUnavailableError
from service.adapters.stores.webhooks import WebhookStore
from service.adapters.webhooks_out.envelope import (
    H_WEBHOOK_STAGE,
    DeliveryRef,
    attempt_of,
    carried_headers,
)
from service.config import Settings
from service.domain.events import EVENT_TYPES
from service.domain.webhooks import decode_head, retry_tier, webhook_id
from service.metrics import Metrics


class WebhookFanout(QueueWorker):
    role = "webhook-fanout"

    def __init__(
        self,
        settings: Settings,
        store: WebhookStore,
        publisher: EventPublisher,
        metrics: Metrics,
        topology: Topology | None = None,
    ) -> None:
        topology = topology or Topology(settings)
        super().__init__(settings, topology, topology.webhook_events_queue, prefetch=64, grace=10.0)
        self._store = store
        self._publisher = publisher
        self._metrics = metrics

    async def handle(self, message: AbstractIncomingMessage) -> None:
        headers: dict[str, Any] = carried_headers(dict(message.headers or {}))
        body = message.body
        try:
            head = decode_head(body)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            await self._dead_letter(message, headers, f"not an event body: {exc}"[:300])
            return
        if head.type not in EVENT_TYPES:
            self._metrics.notify_fanout.labels("unknown_type").inc()
            await settle(message, ack=True)
            return
        # The outbox publishes each event under a stable message id; a body without one
        # is named by its content, so a redelivery still maps to the same webhook ids.
        event_id = message.message_id or hashlib.sha256(body).hexdigest()[:32]
        try:
            endpoints = await self._store.webhook_endpoints_for(head.data.account, head.type)
        except StoreUnavailableError as exc:
            await self._retry(message, headers, f"results store: {exc}")
            return
        try:
            for endpoint in endpoints:
                ref = DeliveryRef(
                    webhook_id=webhook_id(event_id, endpoint.id),
                    endpoint_id=endpoint.id,
                    account=head.data.account,
                    event_type=head.type,
                    event_id=event_id,
                )
                await self._publisher.publish_raw(
                    self._topology.webhooks_exchange,
                    WEBHOOK_DELIVERY_KEY,
                    body,
                    ref.headers(0),
                    message_id=ref.webhook_id,
                )
        except BrokerUnavailableError as exc:
            logger.warning("webhook deliveries not queued ({}); the event comes back", exc)
            await asyncio.sleep(PAUSE)
            await settle(message, ack=False)
            return
        self._metrics.notify_fanout.labels("queued" if endpoints else "no_endpoint").inc()
        if endpoints:
            self._metrics.notify_deliveries.labels("queued").inc(len(endpoints))
        await settle(message, ack=True)

    async def _retry(
        self, message: AbstractIncomingMessage, headers: dict[str, Any], error: str
    ) -> None:
        attempt = attempt_of(headers) + 1
        if attempt >= self._settings.notify_max_attempts:
            await self._dead_letter(message, headers, error)
            return
        tier = retry_tier(attempt, self._topology.webhook_retry_delays, None)
        out = {
            **headers,
            H_WEBHOOK_STAGE: "event",
            H_ATTEMPT: attempt,
            H_ERROR: error[:500],
            **self._topology.webhook_retry_headers(tier),
        }
        if await forward(
            self._publisher,
            message,
            self._topology.webhooks_retry_exchange,
            WEBHOOK_EVENT_KEY,
            out,
            message_id=message.message_id,
            what="webhook fan-out retry",
        ):
            logger.warning("webhook fan-out postponed (attempt {}): {}", attempt, error)

    async def _dead_letter(
        self, message: AbstractIncomingMessage, headers: dict[str, Any], error: str
    ) -> None:
        out = {**headers, H_WEBHOOK_STAGE: "event", H_ERROR: error[:500]}
        if await forward(
            self._publisher,
            message,
            self._topology.dlx_exchange,
            WEBHOOK_EVENT_KEY,
            out,
            message_id=message.message_id,
            what="dead-lettered webhook event",
        ):
            self._metrics.notify_fanout.labels("dead").inc()
            logger.error("webhook event sent to the dead-letter queue: {}", error.split(":", 1)[0])
