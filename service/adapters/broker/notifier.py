"""Outgoing notifications (`lead.hot`, …): one place, delivered at least once.

A notification is published to the events exchange, confirmed and routed into the
durable quorum queue `P.notifications` (see topology.py), where its readers take it.
While the broker cannot take it (a node lost, the connection failing over) it is retried
with backoff for up to `patience` seconds; then `send()` raises, the caller's analysis
counts as failed and its events are retried — the retried run sends the notification
again (pipeline `renotify`). So a notification is never dropped, at the price of a rare
duplicate; readers de-duplicate on `lead_id`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from loguru import logger

from service.adapters.broker.confirm import BrokerUnavailableError
from service.adapters.broker.topology import Topology
from service.domain.events import HotLead
from service.metrics import Metrics

Publish = Callable[[str, str, bytes, dict[str, Any]], Awaitable[None]]


class HotLeads:
    """The `lead.hot` sink: the bootstrap wires it into the pipeline, the consumer that
    owns the confirmed channel binds its publish to it. Unbound, a hot lead raises
    `BrokerUnavailableError` (the analysis is retried), as an unconnected channel does."""

    def __init__(self, topology: Topology, metrics: Metrics) -> None:
        self._topology = topology
        self._metrics = metrics
        self._notifier: Notifier | None = None

    def bind(self, publish: Publish) -> None:
        self._notifier = Notifier(publish, self._topology)

    async def __call__(self, lead: HotLead) -> None:
        """At least once: raises when it cannot be stored (the analysis then counts as
        failed, and its retry sends the notification again)."""
        if self._notifier is None:
            raise BrokerUnavailableError("not connected")
        await self._notifier.send("lead.hot", msgspec.json.encode(lead))
        self._metrics.hot_leads.inc()


class Notifier:
    def __init__(
        self, publish: Publish, topology: Topology, *, patience: float = 30.0, pause: float = 0.5
    ) -> None:
        self._publish = publish
        self._exchange = topology.events_exchange
        self._patience = patience
        self._pause = pause

    async def send(self, routing_key: str, body: bytes) -> None:
        """Return once the notification is stored by the broker; raise after `patience`."""
        deadline = time.monotonic() + self._patience
        pause = self._pause
        tries = 0
        while True:
            tries += 1
            try:
                await self._publish(self._exchange, routing_key, body, {})
            except BrokerUnavailableError as exc:
                if time.monotonic() + pause > deadline:
                    raise BrokerUnavailableError(
                        f"{routing_key} not published after {tries} tries: {exc}"
                    ) from None
                logger.warning("{} publish failed (try {}), retrying: {}", routing_key, tries, exc)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 5.0)
                continue
            if tries > 1:
                logger.info("{} published after {} tries", routing_key, tries)
            return
