"""One confirmed AND routed publish: the only way this service puts a message on RabbitMQ.

A publish counts when the broker acked it on a confirm channel and did not return it.
With `mandatory=True` an unroutable message comes back as Basic.Return before its ack;
aiormq (channel.py, `_on_return_frame`) then fails the publish with `PublishError` when
the channel has `on_return_raises=True`, and otherwise resolves it with the returned
message instead of `Basic.Ack`. A nack raises `DeliveryError` (`_confirm_delivery`).
Every other outcome is a failure too, so callers keep the original delivery.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from random import getrandbits
from typing import Any

from aio_pika.abc import AbstractChannel
from aiormq.abc import ChannelFrame
from aiormq.exceptions import DeliveryError, PublishError
from pamqp.commands import Basic
from pamqp.header import ContentHeader

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


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message of `publish_confirmed_many`."""

    routing_key: str
    body: bytes
    headers: dict[str, Any]
    message_id: str | None = None


# What a batch publish needs of aiormq's channel (7.x); without it, one publish each.
_BATCH_ATTRIBUTES = (
    "lock",
    "delivery_tag",
    "confirmations",
    "message_id_delivery_tag",
    "write_queue",
    "number",
    "create_future",
    "_split_body",
)


async def publish_confirmed_many(
    channel: AbstractChannel, exchange: str, messages: Sequence[Outgoing]
) -> list[BrokerUnavailableError | None]:
    """Publish several persistent, mandatory messages as one socket write; for each,
    None once it is confirmed and routed, else the `BrokerUnavailableError` saying why.

    The same frames and confirm bookkeeping as aiormq's `basic_publish` (delivery tags,
    confirmation futures, the message-id map a Basic.Return is matched by), but one
    `ChannelFrame` for all: a write (a loopback send and a broker read) per message cost
    more CPU than the frames themselves. Callers bound the time it may take.
    """
    try:
        underlay: Any = await channel.get_underlay_channel()
    except Exception as exc:
        raise BrokerUnavailableError(
            f"RabbitMQ connection lost ({type(exc).__name__}: {exc})"
        ) from None
    if not all(hasattr(underlay, name) for name in _BATCH_ATTRIBUTES) or not getattr(
        underlay, "publisher_confirms", False
    ):
        results = await asyncio.gather(
            *(
                publish_confirmed(
                    channel, exchange, m.routing_key, m.body, m.headers, message_id=m.message_id
                )
                for m in messages
            ),
            return_exceptions=True,
        )
        return [_failure(r) for r in results]
    confirmations: list[asyncio.Future[Any]] = []
    async with underlay.lock:
        if underlay.is_closed:
            raise BrokerUnavailableError("RabbitMQ channel closed")
        first_tag = underlay.delivery_tag
        frames: list[Any] = []
        registered: list[tuple[int, str]] = []
        try:
            for message in messages:
                underlay.delivery_tag += 1
                tag = underlay.delivery_tag
                message_id = message.message_id or f"{getrandbits(128):032x}"
                confirmation = underlay.create_future()
                underlay.confirmations[tag] = confirmation
                underlay.message_id_delivery_tag[message_id] = tag
                registered.append((tag, message_id))
                confirmations.append(confirmation)
                frames.append(
                    Basic.Publish(
                        exchange=exchange, routing_key=message.routing_key, mandatory=True
                    )
                )
                frames.append(
                    ContentHeader(
                        properties=Basic.Properties(
                            content_type="application/json",
                            delivery_mode=_PERSISTENT,
                            headers=message.headers,
                            message_id=message_id,
                        ),
                        body_size=len(message.body),
                    )
                )
                frames.extend(underlay._split_body(message.body))
            payload = ChannelFrame.marshall(frames=frames, channel_number=underlay.number)
            await underlay.write_queue.put(payload)
        except BaseException:
            # Nothing reached the broker: give the delivery tags back, as aiormq does.
            underlay.delivery_tag = first_tag
            for (tag, message_id), confirmation in zip(registered, confirmations, strict=True):
                underlay.confirmations.pop(tag, None)
                if underlay.message_id_delivery_tag.get(message_id) == tag:
                    underlay.message_id_delivery_tag.pop(message_id)
                confirmation.cancel()
            raise
        for (tag, message_id), confirmation in zip(registered, confirmations, strict=True):
            confirmation.add_done_callback(
                _forget(underlay.message_id_delivery_tag, message_id, tag)
            )
    results = await asyncio.gather(*confirmations, return_exceptions=True)
    return [
        _outcome(result, exchange, m.routing_key)
        for result, m in zip(results, messages, strict=True)
    ]


def _forget(ids: dict[str, int], message_id: str, tag: int) -> Any:
    def forget(_: asyncio.Future[Any]) -> None:
        if ids.get(message_id) == tag:
            ids.pop(message_id)

    return forget


def _outcome(result: object, exchange: str, routing_key: str) -> BrokerUnavailableError | None:
    """A confirmation's result in publish_confirmed's terms."""
    if isinstance(result, Basic.Ack):
        return None
    if isinstance(result, PublishError):
        return UnroutableError(
            f"message returned unroutable by {exchange!r} (routing key {routing_key!r}): "
            f"is the topology declared? ({result})"
        )
    if isinstance(result, DeliveryError):
        return NackedError(f"RabbitMQ refused the message (nack): {result}")
    if isinstance(result, BaseException):
        return _failure(result)
    return UnroutableError(
        f"message returned unroutable by {exchange!r} (routing key {routing_key!r})"
    )


def _failure(result: object) -> BrokerUnavailableError | None:
    if result is None:
        return None
    if isinstance(result, BrokerUnavailableError):
        return result
    if isinstance(result, asyncio.CancelledError):
        return BrokerUnavailableError("RabbitMQ channel closed")
    return BrokerUnavailableError(f"RabbitMQ connection lost ({type(result).__name__}: {result})")
