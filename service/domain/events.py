"""Lead events (`lead.hot`, `lead.stage_changed`): their names and delivered body.

The events are decided by the store's write rules, in the same transaction as the change
(an outbox row each), and published from there by the consume processes. These types
describe the body exactly as published and delivered.
"""

from __future__ import annotations

import uuid
from typing import Literal

import msgspec

from service.domain.history import Cause

EventType = Literal["lead.hot", "lead.stage_changed"]
EVENT_TYPES: tuple[EventType, ...] = ("lead.hot", "lead.stage_changed")


class LeadEventData(msgspec.Struct, kw_only=True, omit_defaults=False):
    lead_id: uuid.UUID
    account: uuid.UUID
    instance: str
    contact: str
    contact_name: str | None
    score: int | None
    interest_level: str | None
    from_stage: str | None  # the stage before the change (null: a new lead)
    to_stage: str | None  # the stage after it (unchanged for a lead.hot without a move)
    cause: Cause


class LeadEvent(msgspec.Struct, kw_only=True):
    """The body: `{"type", "timestamp", "data": {...}}` (timestamp ISO-8601, UTC)."""

    type: EventType
    timestamp: str
    data: LeadEventData
