"""Outbound webhooks in a `consume` / `run` process: fan-out and delivery, one publisher."""

from __future__ import annotations

import asyncio

from consumers.webhook_delivery import WebhookDelivery
from consumers.webhook_fanout import WebhookFanout
from service.adapters.broker.publisher import EventPublisher
from service.adapters.broker.topology import Topology
from service.adapters.stores.webhooks import WebhookStore
from service.adapters.webhooks_out.sender import WebhookSender
from service.adapters.webhooks_out.targets import TargetPolicy
from service.config import Settings
from service.metrics import Metrics


class WebhookWorkers:
    def __init__(
        self,
        settings: Settings,
        store: WebhookStore,
        metrics: Metrics,
        *,
        topology: Topology | None = None,
        sender: WebhookSender | None = None,
    ) -> None:
        topology = topology or Topology(settings)
        self.publisher = EventPublisher(
            settings, topology=topology, timeout=10.0, connection_role="webhooks"
        )
        sender = sender or WebhookSender(settings, TargetPolicy.from_settings(settings))
        self.fanout = WebhookFanout(settings, store, self.publisher, metrics, topology)
        self.delivery = WebhookDelivery(settings, store, self.publisher, sender, metrics, topology)

    async def start(self, stop: asyncio.Event | None = None) -> None:
        await self.delivery.start(stop)
        await self.fanout.start(stop)

    async def stop(self) -> None:
        await self.fanout.stop()
        await self.delivery.stop()
        await self.publisher.close()

    def busy(self) -> int:
        return self.fanout.busy() + self.delivery.busy()
