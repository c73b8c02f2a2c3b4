"""Checks on a parsed webhook that keep one hostile body from poisoning the queue.

`parse_webhook` reads Evolution's shape; this module judges what it read, before anything
is queued (pure, no I/O):

- a NUL character anywhere in a queued field (instance, JIDs, key id, text, push name) is
  a 400: PostgreSQL refuses NUL in text and jsonb, so such an event could only fail in the
  consumer and be dead-lettered together with the contact's good events;
- the idempotency key `<instance>:<key.id>` must fit AMQP's 255-byte message id;
- a timestamp later than now + MAX_CLOCK_SKEW_SECONDS is clamped to the time of receipt:
  an event from the future would otherwise pin the lead's `last_message` for good;
- JSON nested too deep for the decoder is a 400, not a 500;
- every reason echoed to the caller or logged is bounded and printable.
"""

from __future__ import annotations

import time

import msgspec

from service.adapters.broker.envelope import QueuedEvent
from service.usecases.intake import Accepted, Ignored, IntakeOutcome, Rejected, parse_webhook

MAX_MESSAGE_ID_BYTES = 255  # AMQP shortstr: the message id carries `<instance>:<key.id>`
MAX_REASON_CHARS = 200
_TEXT_FIELDS = ("instance", "message_id", "remote_jid", "phone_jid", "lid", "text", "push_name")


def bounded(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """`text` cut to `limit` characters, control characters shown as `?`."""
    cut = text[:limit]
    clean = "".join(ch if ch.isprintable() else "?" for ch in cut)
    return clean + ("…" if len(text) > limit else "")


def parse_checked(
    body: bytes,
    path_event: str | None = None,
    *,
    max_skew_seconds: int = 300,
    now: float | None = None,
) -> IntakeOutcome:
    """`parse_webhook` plus the checks above; the only intake entry point."""
    received = int(time.time() if now is None else now)
    try:
        outcome = parse_webhook(body, path_event, received_at=received)
    except RecursionError:
        return Rejected(event="", reason="JSON nested too deeply")
    if isinstance(outcome, Rejected):
        return Rejected(event=bounded(outcome.event, 100), reason=bounded(outcome.reason))
    if isinstance(outcome, Ignored):
        return Ignored(event=bounded(outcome.event, 100), reason=bounded(outcome.reason))
    return _checked(outcome, received + max_skew_seconds, received)


def _checked(accepted: Accepted, latest: int, received: int) -> IntakeOutcome:
    events: list[QueuedEvent] = []
    for index, event in enumerate(accepted.events):
        problem = event_problem(event)
        if problem is not None:
            where = "data" if len(accepted.events) == 1 else f"message {index}"
            return Rejected(event=accepted.event, reason=f"{where}: {problem}")
        if event.timestamp > latest:
            event = msgspec.structs.replace(event, timestamp=received)
        events.append(event)
    return msgspec.structs.replace(accepted, events=events)


def event_problem(event: QueuedEvent) -> str | None:
    """Why `event` can never be stored, or None."""
    for name in _TEXT_FIELDS:
        value = getattr(event, name)
        if value is not None and "\x00" in value:
            return f"{_WIRE_NAMES[name]} contains a NUL character"
    if len(event.idempotency_key.encode("utf-8", "surrogatepass")) > MAX_MESSAGE_ID_BYTES:
        return (
            f"key.id too long: instance name and key.id together must fit "
            f"{MAX_MESSAGE_ID_BYTES} bytes"
        )
    return None


_WIRE_NAMES = {
    "instance": "instance",
    "message_id": "key.id",
    "remote_jid": "key.remoteJid",
    "phone_jid": "key.remoteJidAlt/senderPn",
    "lid": "key LID",
    "text": "message text",
    "push_name": "pushName",
}
