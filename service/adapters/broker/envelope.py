"""What travels through the queues: compact, typed message events.

Intake reduces each Evolution webhook to a `QueuedEvent` (identity, direction, time and the
message's readable text; base64 media and other bulk are dropped) and publishes events in
batches: one AMQP message carries the events of one contact shard that arrived together
(one confirm covers many webhooks). The consumer decodes the same types.
"""

from __future__ import annotations

import zlib
from typing import Any

import msgspec

ENVELOPE_VERSION = 1

# AMQP header names.
H_IDEMPOTENCY_KEYS = "x-idempotency-keys"  # list of "<instance>:<whatsapp message id>"
H_ATTEMPT = "x-attempt"  # delivery attempts already made (0 on first publish)
H_ERROR = "x-error"  # last failure, on retried and dead-lettered messages
H_ORIGINAL_ROUTING_KEY = "x-original-routing-key"
H_DEATH = "x-death"  # set by the broker on what it dead-lettered itself (delivery limit)


class QueuedEvent(msgspec.Struct, kw_only=True, frozen=True):
    """One message event (messages.upsert / send.message / messages.set item)."""

    event: str  # Evolution's event name, e.g. "messages.upsert"
    instance: str
    message_id: str  # data.key.id
    remote_jid: str  # data.key.remoteJid as sent
    phone_jid: str | None  # the contact's phone JID (see identity.phone_jid), if any
    from_me: bool
    timestamp: int  # data.messageTimestamp, Unix seconds
    message_type: str
    text: str | None  # readable text (None: not a dialog turn, e.g. a reaction)
    push_name: str | None = None
    # Set on events that change an earlier message (`message_id` is that message's id):
    # "delete" (deleted for everyone) or "edit" (`text` is the new text).
    change: str | None = None
    lid: str | None = None  # the privacy-addressed id (`<digits>@lid`) the key carried

    @property
    def idempotency_key(self) -> str:
        if self.change is not None:
            return f"{self.instance}:{self.message_id}:{self.change}:{self.timestamp}"
        return f"{self.instance}:{self.message_id}"

    @property
    def contact_key(self) -> str:
        """Routing identity: the phone JID, or the raw chat JID when the phone is unknown."""
        return self.phone_jid or self.remote_jid


class EventBatch(msgspec.Struct, kw_only=True):
    v: int = ENVELOPE_VERSION
    events: list[QueuedEvent] = msgspec.field(default_factory=list)


def shard_for(instance: str, contact_key: str, shards: int) -> int:
    """Stable shard of a contact: every event of one contact goes to one queue."""
    return zlib.crc32(f"{instance}\x00{contact_key}".encode()) % shards


def shard_routing_key(shard: int, shards: int) -> str:
    """`shard.<i>-of-<n>`: the shard count is part of the key, so messages routed under
    another QUEUE_SHARDS (e.g. waiting in a retry queue) return to the queues of that
    layout instead of a shard that is not their contact's."""
    return f"shard.{shard}-of-{shards}"


def header_int(value: object) -> int:
    """An integer AMQP header (attempt counts); 0 when absent or malformed."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return value
    if isinstance(value, str | bytes):
        try:
            return int(value)
        except ValueError:
            return 0
    return 0


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(EventBatch)


def encode_batch(events: list[QueuedEvent]) -> bytes:
    return _encoder.encode(EventBatch(events=events))


def batch_headers(events: list[QueuedEvent], headers: dict[str, Any]) -> dict[str, Any]:
    """The headers of a batch message: the caller's, with the events' idempotency keys."""
    return {**headers, H_IDEMPOTENCY_KEYS: [e.idempotency_key for e in events]}


def by_shard(events: list[QueuedEvent], shards: int) -> dict[int, list[QueuedEvent]]:
    """The events grouped by their contact's shard, in order."""
    groups: dict[int, list[QueuedEvent]] = {}
    for event in events:
        groups.setdefault(shard_for(event.instance, event.contact_key, shards), []).append(event)
    return groups


def decode_batch(body: bytes) -> EventBatch:
    """Raises msgspec.DecodeError/ValidationError on a poison message."""
    return _decoder.decode(body)
