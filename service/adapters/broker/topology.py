"""Exchange and queue names, and their idempotent declaration.

Everything is named from AMQP_PREFIX (P), QUEUE_SHARDS (N) and RETRY_DELAYS. Every queue
that holds an event is a quorum queue (replicated over the cluster's nodes), declared with
`x-queue-leader-locator: balanced` so the leaders spread over the nodes (RabbitMQ 3.10,
rabbit_queue_location.erl):

- `P.intake` (direct) → `P.contacts.<i>-of-<N>`, routing key `shard.<i>-of-<N>`; one
  single active consumer per shard, so one contact is handled by one process at a time.
- `P.retry` (headers) → `P.retry.<ms>ms`, one per RETRY_DELAYS value, matched on the
  `x-retry-delay-ms` header (x-match `all-with-x`, RabbitMQ >= 3.10); each holds a message
  for its delay (message TTL) and dead-letters it, at least once, back to `P.intake` under
  its own `shard.<i>-of-<N>` key.
- `P.dlx` (fanout) → `P.dead`: the dead-letter queue.
- `P.events` (topic): notifications such as `lead.hot`, held for their readers in
  `P.notifications` (bound to `lead.#`), so a notification is stored once confirmed.
- `P.members` (fanout): heartbeats of the consume processes (see consumers/membership.py).
- Outbound webhooks: `P.webhooks.events` takes each notification type endpoints may
  subscribe to from `P.events`; fan-out turns an event into one delivery per endpoint in
  `P.webhooks.deliveries` (via the direct `P.webhooks`, key `delivery`). A failed attempt
  waits in `P.webhooks.retry.<ms>ms` (one per NOTIFY_RETRY_DELAYS value, selected on the
  headers exchange `P.webhooks.retry` as above), which dead-letters it back to
  `P.webhooks` under its own key (`delivery`, or `event` for a fan-out retried).

Queue arguments cannot change in place, so a new layout has new names; the queues of an
older layout (classic retry queues `P.retry.<tier>`, shard queues `P.contacts.<i>` or
another shard count) are emptied into these by `crm-backend topology migrate`.
"""

from __future__ import annotations

from typing import Any

import aiormq
from aio_pika import ExchangeType
from aio_pika.abc import AbstractChannel

from service.adapters.broker.envelope import shard_routing_key
from service.config import Settings
from service.domain.events import EVENT_TYPES

# Header that selects a retry queue (its delay in milliseconds) on the headers exchange.
H_RETRY_DELAY = "x-retry-delay-ms"
# Header of the first layout's classic retry queues (still read by `topology migrate`).
H_LEGACY_RETRY_TIER = "x-retry-tier"
# A crash loop (a message that kills its consumer) ends in the DLQ after this many tries.
DELIVERY_LIMIT = 20
LEADER_LOCATOR = "balanced"
NOTIFICATION_KEYS = "lead.#"
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
# Routing keys on `P.webhooks`.
WEBHOOK_EVENT_KEY = "event"
WEBHOOK_DELIVERY_KEY = "delivery"


class TopologyError(Exception):
    """A queue or exchange exists on the broker with other settings than declared here."""


def _at_least_once(dead_letter_exchange: str) -> dict[str, Any]:
    # Quorum queues dead-letter at least once only with reject-publish overflow
    # (rabbit_quorum_queue.erl, dlh/5); otherwise they fall back to at-most-once.
    return {
        "x-dead-letter-exchange": dead_letter_exchange,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


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
        self.members_exchange = f"{prefix}.members"
        self.dead_queue = f"{prefix}.dead"
        self.notification_queue = f"{prefix}.notifications"
        self.bridge_queue = f"{prefix}.evolution-in"
        self.webhooks_exchange = f"{prefix}.webhooks"
        self.webhooks_retry_exchange = f"{prefix}.webhooks.retry"
        self.webhook_events_queue = f"{prefix}.webhooks.events"
        self.webhook_deliveries_queue = f"{prefix}.webhooks.deliveries"
        self.webhook_retry_delays = settings.notify_retry_delay_list()

    # -- names ------------------------------------------------------------------------
    def shard_queue(self, shard: int, shards: int | None = None) -> str:
        return f"{self.prefix}.contacts.{shard}-of-{shards or self.shards}"

    def shard_key(self, shard: int) -> str:
        return shard_routing_key(shard, self.shards)

    def retry_delay_ms(self, tier: int) -> int:
        return round(self.retry_delays[tier] * 1000)

    def retry_queue(self, tier: int) -> str:
        return f"{self.prefix}.retry.{self.retry_delay_ms(tier)}ms"

    def tier_for_attempt(self, attempt: int) -> int:
        """Retry tier of the n-th failed attempt (1 → tier 0, …; the last tier repeats)."""
        return max(0, min(attempt - 1, len(self.retry_delays) - 1))

    def retry_headers(self, attempt: int) -> dict[str, Any]:
        """Headers that route a message of the n-th failed attempt to its delay queue."""
        return {H_RETRY_DELAY: str(self.retry_delay_ms(self.tier_for_attempt(attempt)))}

    def webhook_retry_delay_ms(self, tier: int) -> int:
        return round(self.webhook_retry_delays[tier] * 1000)

    def webhook_retry_queue(self, tier: int) -> str:
        return f"{self.prefix}.webhooks.retry.{self.webhook_retry_delay_ms(tier)}ms"

    def webhook_retry_headers(self, tier: int) -> dict[str, Any]:
        """Headers that route a webhook message to the delay queue of `tier`."""
        return {H_RETRY_DELAY: str(self.webhook_retry_delay_ms(tier))}

    def legacy_shard_queue(self, shard: int) -> str:
        """Shard queue of the first layout (no shard count in the name)."""
        return f"{self.prefix}.contacts.{shard}"

    def legacy_retry_queue(self, tier: int) -> str:
        """Classic retry queue of the first layout."""
        return f"{self.prefix}.retry.{tier}"

    def all_queues(self) -> list[str]:
        return [
            *(self.shard_queue(i) for i in range(self.shards)),
            *(self.retry_queue(t) for t in range(len(self.retry_delays))),
            self.dead_queue,
            self.notification_queue,
            self.bridge_queue,
            self.webhook_events_queue,
            self.webhook_deliveries_queue,
            *(self.webhook_retry_queue(t) for t in range(len(self.webhook_retry_delays))),
        ]

    def all_exchanges(self) -> list[str]:
        return [
            self.intake_exchange,
            self.retry_exchange,
            self.dlx_exchange,
            self.events_exchange,
            self.members_exchange,
            self.webhooks_exchange,
            self.webhooks_retry_exchange,
        ]

    # -- arguments ----------------------------------------------------------------------
    def shard_arguments(self) -> dict[str, Any]:
        return {
            "x-queue-type": "quorum",
            "x-queue-leader-locator": LEADER_LOCATOR,
            "x-single-active-consumer": True,
            "x-delivery-limit": DELIVERY_LIMIT,
            **_at_least_once(self.dlx_exchange),
        }

    def retry_arguments(self, tier: int) -> dict[str, Any]:
        # No dead-letter routing key: the message keeps its `shard.<i>-of-<n>` key and
        # so returns to its own shard queue when the TTL expires (quorum queues support
        # message TTL since 3.10).
        return {
            "x-queue-type": "quorum",
            "x-queue-leader-locator": LEADER_LOCATOR,
            "x-message-ttl": self.retry_delay_ms(tier),
            **_at_least_once(self.intake_exchange),
        }

    def webhook_queue_arguments(self) -> dict[str, Any]:
        return {
            "x-queue-type": "quorum",
            "x-queue-leader-locator": LEADER_LOCATOR,
            "x-delivery-limit": DELIVERY_LIMIT,
            **_at_least_once(self.dlx_exchange),
        }

    def webhook_retry_arguments(self, tier: int) -> dict[str, Any]:
        return {
            "x-queue-type": "quorum",
            "x-queue-leader-locator": LEADER_LOCATOR,
            "x-message-ttl": self.webhook_retry_delay_ms(tier),
            **_at_least_once(self.webhooks_exchange),
        }

    def notification_arguments(self) -> dict[str, Any]:
        return {
            "x-queue-type": "quorum",
            "x-queue-leader-locator": LEADER_LOCATOR,
            # A full queue refuses (nack → the sender retries) instead of dropping.
            "x-overflow": "reject-publish",
        }

    # -- declaration --------------------------------------------------------------------
    async def declare(self, channel: AbstractChannel) -> None:
        """Create every exchange, queue and binding; safe to repeat."""
        try:
            await self._declare(channel)
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            raise TopologyError(
                f"RabbitMQ holds a queue or exchange under AMQP_PREFIX={self.prefix!r} "
                f"with other arguments ({exc}); declare it with these arguments, "
                "or use another AMQP_PREFIX"
            ) from exc

    async def _declare(self, channel: AbstractChannel) -> None:
        intake = await channel.declare_exchange(
            self.intake_exchange, ExchangeType.DIRECT, durable=True
        )
        retry = await channel.declare_exchange(
            self.retry_exchange, ExchangeType.HEADERS, durable=True
        )
        dlx = await channel.declare_exchange(self.dlx_exchange, ExchangeType.FANOUT, durable=True)
        events = await channel.declare_exchange(
            self.events_exchange, ExchangeType.TOPIC, durable=True
        )
        await channel.declare_exchange(self.members_exchange, ExchangeType.FANOUT, durable=True)

        # The first layout's arguments: a queue's arguments cannot change in place.
        dead = await channel.declare_queue(
            self.dead_queue, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await dead.bind(dlx, routing_key="")
        notifications = await channel.declare_queue(
            self.notification_queue, durable=True, arguments=self.notification_arguments()
        )
        await notifications.bind(events, routing_key=NOTIFICATION_KEYS)
        for shard in range(self.shards):
            queue = await channel.declare_queue(
                self.shard_queue(shard), durable=True, arguments=self.shard_arguments()
            )
            await queue.bind(intake, routing_key=self.shard_key(shard))
        for tier in range(len(self.retry_delays)):
            queue = await channel.declare_queue(
                self.retry_queue(tier), durable=True, arguments=self.retry_arguments(tier)
            )
            await queue.bind(
                retry,
                routing_key="",
                # "all-with-x": with plain "all", RabbitMQ ignores x- headers when
                # matching, so every queue would match every message.
                arguments={"x-match": "all-with-x", H_RETRY_DELAY: str(self.retry_delay_ms(tier))},
            )
        await self._declare_webhooks(channel, events)

    async def _declare_webhooks(self, channel: AbstractChannel, events: Any) -> None:
        webhooks = await channel.declare_exchange(
            self.webhooks_exchange, ExchangeType.DIRECT, durable=True
        )
        retry = await channel.declare_exchange(
            self.webhooks_retry_exchange, ExchangeType.HEADERS, durable=True
        )
        incoming = await channel.declare_queue(
            self.webhook_events_queue, durable=True, arguments=self.webhook_queue_arguments()
        )
        for event_type in EVENT_TYPES:
            await incoming.bind(events, routing_key=event_type)
        await incoming.bind(webhooks, routing_key=WEBHOOK_EVENT_KEY)
        deliveries = await channel.declare_queue(
            self.webhook_deliveries_queue, durable=True, arguments=self.webhook_queue_arguments()
        )
        await deliveries.bind(webhooks, routing_key=WEBHOOK_DELIVERY_KEY)
        for tier in range(len(self.webhook_retry_delays)):
            queue = await channel.declare_queue(
                self.webhook_retry_queue(tier),
                durable=True,
                arguments=self.webhook_retry_arguments(tier),
            )
            await queue.bind(
                retry,
                routing_key="",
                arguments={
                    "x-match": "all-with-x",
                    H_RETRY_DELAY: str(self.webhook_retry_delay_ms(tier)),
                },
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
