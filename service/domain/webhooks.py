"""Outbound webhooks: endpoints, the part of an event delivery needs, ids and retry timing.

Pure: no I/O. Signing and HTTP live in service/adapters/webhooks_out/.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Literal
from urllib.parse import urlsplit

import msgspec

# The events an endpoint may subscribe to: the lead events (routing keys on the events
# exchange).
from service.domain.events import EVENT_TYPES

SECRET_PREFIX = "whsec_"  # noqa: S105 - the format's prefix, not a secret
# Fixed so that every process derives the same webhook id for one event and endpoint.
_WEBHOOK_ID_NAMESPACE = uuid.UUID("6f0c7b8e-3d1a-5c2b-9e4f-0a1b2c3d4e5f")

ClaimState = Literal["claimed", "busy", "done", "gone"]


class WebhookEndpoint(msgspec.Struct, kw_only=True, frozen=True):
    id: uuid.UUID
    account: uuid.UUID
    url: str
    secret: str  # `whsec_<base64>`: needed in full to sign, so stored as is
    events: list[str] | None  # None: every event, including ones added later
    created_at: datetime

    def receives(self, event_type: str) -> bool:
        return self.events is None or event_type in self.events


class Claim(msgspec.Struct, kw_only=True, frozen=True):
    """The answer to "may this process send this delivery now?" (with its endpoint)."""

    state: ClaimState
    endpoint: WebhookEndpoint | None = None


class _HeadData(msgspec.Struct):
    account: uuid.UUID


class EventHead(msgspec.Struct):
    """What fan-out reads of an event body; the body itself is delivered byte for byte."""

    type: str
    timestamp: str
    data: _HeadData


def decode_head(body: bytes) -> EventHead:
    """Raises msgspec.DecodeError / ValidationError for a body that is not an event."""
    return msgspec.json.decode(body, type=EventHead)


def parse_events(text: str | None) -> list[str] | None:
    """`lead.hot,lead.stage_changed` → the list (None: every event); ValueError names a bad one."""
    if text is None:
        return None
    chosen: list[str] = []
    for part in text.split(","):
        name = part.strip()
        if not name:
            continue
        if name not in EVENT_TYPES:
            raise ValueError(f"unknown event {name!r}: expected {', '.join(EVENT_TYPES)}")
        if name not in chosen:
            chosen.append(name)
    if not chosen:
        raise ValueError(f"--events needs at least one of {', '.join(EVENT_TYPES)}")
    return chosen


def check_url(url: str) -> str:
    """An http(s) URL with a host, without a fragment; ValueError says what is wrong."""
    url = url.strip()
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError("the URL must start with http:// or https://")
    if not parts.hostname:
        raise ValueError("the URL has no host")
    if port == 0:
        raise ValueError("the URL has port 0")
    if parts.fragment:
        raise ValueError("the URL must not have a #fragment (it is never sent)")
    if any(ch.isspace() for ch in url) or len(url) > 2048:
        raise ValueError("the URL has spaces or is longer than 2048 characters")
    return url


def redact_url(url: str) -> str:
    """The URL for display: no password, no query values (they often carry tokens)."""
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if ":" in netloc:
        netloc = f"[{netloc}]"
    if parts.port:
        netloc = f"{netloc}:{parts.port}"
    if parts.username:
        netloc = f"{parts.username}:***@{netloc}" if parts.password else f"***@{netloc}"
    query = "&".join(f"{p.partition('=')[0]}=***" for p in parts.query.split("&") if p)
    return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")


def masked_secret(secret: str) -> str:
    return secret[: len(SECRET_PREFIX) + 4] + "…"


def webhook_id(event_id: str, endpoint_id: uuid.UUID) -> str:
    """Stable per event and endpoint (every retry and replay sends the same); no dots."""
    return "msg_" + uuid.uuid5(_WEBHOOK_ID_NAMESPACE, f"{event_id}/{endpoint_id}").hex


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds a `Retry-After` header asks for (delta-seconds or an HTTP date), or None."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


def retry_tier(attempt: int, delays: Sequence[float], retry_after: float | None) -> int:
    """Delay tier after the n-th failed attempt: exponential by tier (the last repeats),
    never sooner than `retry_after` asks, which is capped at the longest tier."""
    wanted = delays[max(0, min(attempt - 1, len(delays) - 1))]
    if retry_after is not None:
        wanted = max(wanted, retry_after)
    for tier, delay in enumerate(delays):
        if delay >= wanted:
            return tier
    return len(delays) - 1
