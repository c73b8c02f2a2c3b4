"""What a webhook message carries through the queues besides the event body.

The body of every message on `P.webhooks.*` is the event body exactly as published (and
as delivered); everything else travels in AMQP headers, so nothing is re-encoded on the
way to the endpoint.
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

import msgspec

from service.adapters.broker.envelope import H_ATTEMPT, H_ERROR, header_int

H_WEBHOOK_STAGE = "x-webhook-stage"  # "event" (before fan-out) or "delivery"
H_WEBHOOK_ID = "x-webhook-id"
H_WEBHOOK_ENDPOINT = "x-webhook-endpoint"
H_WEBHOOK_ACCOUNT = "x-webhook-account"
H_WEBHOOK_TYPE = "x-webhook-type"
H_EVENT_ID = "x-event-id"

Stage = Literal["event", "delivery"]


class DeliveryRef(msgspec.Struct, kw_only=True, frozen=True):
    """One event for one endpoint."""

    webhook_id: str
    endpoint_id: uuid.UUID
    account: uuid.UUID
    event_type: str
    event_id: str

    def headers(self, attempt: int, error: str | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            H_WEBHOOK_STAGE: "delivery",
            H_WEBHOOK_ID: self.webhook_id,
            H_WEBHOOK_ENDPOINT: str(self.endpoint_id),
            H_WEBHOOK_ACCOUNT: str(self.account),
            H_WEBHOOK_TYPE: self.event_type,
            H_EVENT_ID: self.event_id,
            H_ATTEMPT: attempt,
        }
        if error is not None:
            out[H_ERROR] = error[:500]
        return out


def delivery_ref(headers: dict[str, Any]) -> DeliveryRef | None:
    """The delivery a message's headers name, or None when they are incomplete."""
    try:
        return DeliveryRef(
            webhook_id=_text(headers[H_WEBHOOK_ID]),
            endpoint_id=uuid.UUID(_text(headers[H_WEBHOOK_ENDPOINT])),
            account=uuid.UUID(_text(headers[H_WEBHOOK_ACCOUNT])),
            event_type=_text(headers[H_WEBHOOK_TYPE]),
            event_id=_text(headers.get(H_EVENT_ID, "")),
        )
    except (KeyError, ValueError, TypeError):
        return None


def stage_of(headers: dict[str, Any]) -> Stage | None:
    stage = headers.get(H_WEBHOOK_STAGE)
    if isinstance(stage, bytes):
        stage = stage.decode(errors="replace")
    if stage == "event":
        return "event"
    if stage == "delivery":
        return "delivery"
    return None


def attempt_of(headers: dict[str, Any]) -> int:
    return header_int(headers.get(H_ATTEMPT))


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode()
    if not isinstance(value, str):
        raise TypeError("not text")
    return value


def carried_headers(headers: dict[str, Any]) -> dict[str, Any]:
    """A message's headers minus what the broker adds on dead-lettering (`x-death`, …)."""
    return {
        k: v
        for k, v in headers.items()
        if not k.startswith(("x-death", "x-first-death", "x-last-death"))
    }
