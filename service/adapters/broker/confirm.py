"""One confirmed AND routed publish: the only way this service puts a message on RabbitMQ.

A publish counts when the broker acked it on a confirm channel and did not return it.
With `mandatory=True` an unroutable message comes back as Basic.Return before its ack;
aiormq (channel.py, `_on_return_frame`) then fails the publish with `PublishError` when
the channel has `on_return_raises=True`, and otherwise resolves it with the returned
message instead of `Basic.Ack`. A nack raises `DeliveryError` (`_confirm_delivery`).
Every other outcome is a failure too, so callers keep the original delivery.
"""

from __future__ import annotations

from typing import Any

from aio_pika.abc import AbstractChannel
from aiormq.exceptions import DeliveryError, PublishError
from pamqp.commands import Basic

_PERSISTENT = 2  # AMQP delivery mode: written to disk by the broker


class BrokerUnavailableError(Exception):
    """The broker did not take the message: down, nacked, unroutable or too slow."""


class NackedError(BrokerUnavailableError):
    """Refused by the broker (Basic.Nack). RabbitMQ 3.10's quorum queue client, kept per
    channel, can keep refusing after a leader moved (rabbit_fifo_client.erl, `enqueue`
    on a node that went down): callers then open a new channel."""


class UnroutableError(BrokerUnavailableError):
    """Returned by the broker: no queue is bound for the routing key (Basic.Return)."""


async def publish_confirmed(
    channel: AbstractChannel,
    exchange: str,
    routing_key: str,
    body: bytes,
    headers: dict[str, Any] | None = None,
    *,
    message_id: str | None = None,
) -> None:
    """Publish a persistent, mandatory message; return only once it is confirmed and
    routed, else raise `BrokerUnavailableError`. `channel` must confirm (aio-pika's
    `publisher_confirms=True`, its default). Callers bound the time it may take."""
    try:
        # Straight to aiormq's channel (the one aio-pika wraps): aio-pika's Message and
        # Exchange layers cost more CPU per publish than the frames themselves.
        underlay = await channel.get_underlay_channel()
        result = await underlay.basic_publish(
            body,
            exchange=exchange,
            routing_key=routing_key,
            properties=Basic.Properties(
                content_type="application/json",
                delivery_mode=_PERSISTENT,
                headers=headers or {},
                message_id=message_id,
            ),
            mandatory=True,
        )
    except PublishError as exc:
        raise UnroutableError(
            f"message returned unroutable by {exchange!r} (routing key {routing_key!r}): "
            f"is the topology declared? ({exc})"
        ) from None
    except DeliveryError as exc:
        raise NackedError(f"RabbitMQ refused the message (nack): {exc}") from None
    except BrokerUnavailableError:
        raise
    except Exception as exc:
        raise BrokerUnavailableError(
            f"RabbitMQ connection lost ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(result, Basic.Ack):
        # A returned message, when the channel does not raise on returns.
        raise UnroutableError(
            f"message returned unroutable by {exchange!r} (routing key {routing_key!r})"
        )
