"""Events the service sends out."""

from __future__ import annotations

import uuid

import msgspec


class HotLead(msgspec.Struct, kw_only=True):
    """Payload of the `lead.hot` event."""

    account: uuid.UUID
    instance: str
    contact: str
    contact_name: str | None
    score: int
    summary: str
    lead_id: uuid.UUID | None
