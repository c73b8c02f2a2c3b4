"""Exchange and queue names, and their idempotent declaration.

Everything is named from AMQP_PREFIX (P) and QUEUE_SHARDS (N):

- `P.intake` (direct) → quorum queues `P.contacts.<i>`, routing key `shard.<i>`; one
  single active consumer per shard, so one contact is handled by one process at a time.
- `P.retry` (headers) → classic queues `P.retry.<t>`, one per RETRY_DELAYS tier, matched on
  the `x-retry-tier` header (x-match `all-with-x`, RabbitMQ >= 3.10); each holds a message
  for its delay (TTL) and dead-letters it back to `P.intake` under its own `shard.<i>`
  routing key.
- `P.dlx` (fanout) → quorum queue `P.dead`: the dead-letter queue.
- `P.events` (topic): outgoing notifications such as `lead.hot`.
"""

from __future__ import annotations

from typing import Any

import aiormq
from aio_pika import ExchangeType
from aio_pika.abc import AbstractChannel

from service.broker.envelope import shard_routing_key
from service.config import Settings

# Header that selects a retry tier on the headers exchange.
H_RETRY_TIER = "x-retry-tier"
# A crash loop (a message that kills its consumer) ends in the DLQ after this many tries.
DELIVERY_LIMIT = 20
# Evolution's own RabbitMQ events this service consumes (dotted and upper snake forms).
BRIDGE_ROUTING_KEYS = (
    "messages.upsert",
    "send.message",
    "messages.set",
    "MESSAGES_UPSERT",
    "SEND_MESSAGE",
    "MESSAGES_SET",
    # Deletes and edits (RABBITMQ_EVENTS_MESSAGES_DELETE / _EDITED / _UPDATE).
    "messages.delete",
    "messages.edited",
    "messages.update",
    "MESSAGES_DELETE",
    "MESSAGES_EDITED",
    "MESSAGES_UPDATE",
)


class TopologyError(Exception):
    """A queue or exchange exists on the broker with other settings than declared here."""


class Topology:
    """Names derived from the settings, and `declare()` to create them on a channel."""

    def __init__(self, settings: Settings) -> None:
        prefix = settings.amqp_prefix
        self.prefix = prefix
        self.shards = settings.queue_shards
        self.retry_delays = settings.retry_delay_list()
        self.intake_exchange = f"{prefix}.intake"
        self.retry_exchange = f"{prefix}.retry"
        self.dlx_exchange = f"{prefix}.dlx"
        self.events_exchange = f"{prefix}.events"
        self.dead_queue = f"{prefix}.dead"
        self.bridge_queue = f"{prefix}.evolution-in"

    # -- names ------------------------------------------------------------------------
    def shard_queue(self, shard: int) -> str:
        return f"{self.prefix}.contacts.{shard}"

    def retry_queue(self, tier: int) -> str:
        return f"{self.prefix}.retry.{tier}"

    def tier_for_attempt(self, attempt: int) -> int:
        """Retry tier of the n-th failed attempt (1 → tier 0, …; the last tier repeats)."""
        return max(0, min(attempt - 1, len(self.retry_delays) - 1))

    def all_queues(self) -> list[str]:
        return [
            *(self.shard_queue(i) for i in range(self.shards)),
            *(self.retry_queue(t) for t in range(len(self.retry_delays))),
            self.dead_queue,
            self.bridge_queue,
        ]

    def all_exchanges(self) -> list[str]:
        return [self.intake_exchange, self.retry_exchange, self.dlx_exchange, self.events_exchange]

    # -- arguments ----------------------------------------------------------------------
    def shard_arguments(self) -> dict[str, Any]:
        return {
            "x-queue-type": "quorum",
            "x-single-active-consumer": True,
            "x-delivery-limit": DELIVERY_LIMIT,
            "x-dead-letter-exchange": self.dlx_exchange,
            # At-least-once dead-lettering (no loss between queue and DLQ) requires
            # reject-publish overflow.
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }

    def retry_arguments(self, tier: int) -> dict[str, Any]:
        # No dead-letter routing key: the message keeps its `shard.<i>` key and so
        # returns to its own shard queue when the TTL expires.
        return {
            "x-queue-type": "classic",
            "x-message-ttl": round(self.retry_delays[tier] * 1000),
            "x-dead-letter-exchange": self.intake_exchange,
        }

    # -- declaration --------------------------------------------------------------------
    async def declare(self, channel: AbstractChannel) -> None:
        """Create every exchange, queue and binding; safe to repeat."""
        try:
            await self._declare(channel)
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            raise TopologyError(
                f"RabbitMQ holds a queue or exchange under AMQP_PREFIX={self.prefix!r} "
                f"with other arguments ({exc}); e.g. RETRY_DELAYS changed: drain and "
                "delete the old queues, or use another AMQP_PREFIX"
            ) from exc

    async def _declare(self, channel: AbstractChannel) -> None:
        intake = await channel.declare_exchange(
            self.intake_exchange, ExchangeType.DIRECT, durable=True
        )
        retry = await channel.declare_exchange(
            self.retry_exchange, ExchangeType.HEADERS, durable=True
        )
        dlx = await channel.declare_exchange(self.dlx_exchange, ExchangeType.FANOUT, durable=True)
        await channel.declare_exchange(self.events_exchange, ExchangeType.TOPIC, durable=True)

        dead = await channel.declare_queue(
            self.dead_queue, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await dead.bind(dlx, routing_key="")
        for shard in range(self.shards):
            queue = await channel.declare_queue(
                self.shard_queue(shard), durable=True, arguments=self.shard_arguments()
            )
            await queue.bind(intake, routing_key=shard_routing_key(shard))
        for tier in range(len(self.retry_delays)):
            queue = await channel.declare_queue(
                self.retry_queue(tier), durable=True, arguments=self.retry_arguments(tier)
            )
            await queue.bind(
                retry,
                routing_key="",
                # "all-with-x": with plain "all", RabbitMQ ignores x- headers when
                # matching, so every tier would match every message.
                arguments={"x-match": "all-with-x", H_RETRY_TIER: str(tier)},
            )

    async def declare_bridge(self, channel: AbstractChannel, source_exchange: str) -> str:
        """Queue `P.evolution-in` bound to Evolution's own (topic) exchange; returns its name."""
        try:
            source = await channel.declare_exchange(
                source_exchange, ExchangeType.TOPIC, durable=True
            )
            queue = await channel.declare_queue(
                self.bridge_queue,
                durable=True,
                arguments={
                    "x-queue-type": "quorum",
                    "x-delivery-limit": DELIVERY_LIMIT,
                    "x-dead-letter-exchange": self.dlx_exchange,
                },
            )
            for key in BRIDGE_ROUTING_KEYS:
                await queue.bind(source, routing_key=key)
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            raise TopologyError(
                f"exchange {source_exchange!r} or queue {self.bridge_queue!r} exists with "
                f"other settings ({exc})"
            ) from exc
        return self.bridge_queue
