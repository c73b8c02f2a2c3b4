"""The lead: one `dialog_analysis` row, its columns, and the columns that follow from facts.

Every other place (stores, CSV export, REST answers, OpenAPI) takes the columns from here.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Generic, TypeVar

import msgspec

from service.domain.facts import LeadFacts
from service.domain.scoring import Score, ScoreLine, breakdown_json, derive, stored_breakdown

# Columns a person may set by hand (PATCH / POST /dialogs/leads). Listed in
# `manual_fields` once set, and then never overwritten by automatic analysis.
MANUAL_COLUMNS: tuple[str, ...] = (
    "contact_name",
    "business_type",
    "niche",
    "is_medical",
    "is_owner",
    "has_sales_dept",
    "uses_ads_now",
    "ad_budget",
    "sent_instagram",
    "instagram_url",
    "has_booking",
    "funnel_stage",
    "interest_level",
    "main_intent",
    "objection",
    "next_message",
    "action",
    "notes",
    "score",
)

# Columns recomputed from the facts after a change by hand (`update_lead(derived=...)`).
DERIVED_COLUMNS: tuple[str, ...] = (
    "score",
    "interest_level",
    "score_breakdown",
    "is_medical",
    "budget_stated",
    "has_booking",
    "sent_instagram",
    "qualification_complete",
)


# What `score_breakdown` holds: JSON lines as stored (LeadRow), score lines as answered.
Breakdown = TypeVar("Breakdown")


class Lead(msgspec.Struct, Generic[Breakdown], kw_only=True, omit_defaults=False):
    """The lead's columns, once: every `dialog_analysis` column but `messages` (the
    original's columns first). The store's row and the API's answer are this, typed by
    what their `score_breakdown` holds."""

    id: uuid.UUID
    instance_name: str
    user_account_id: uuid.UUID
    contact_phone: str
    contact_name: str | None = None
    incoming_count: int = 0
    outgoing_count: int = 0
    first_message: datetime | None = None
    last_message: datetime | None = None
    business_type: str | None = None
    is_medical: bool | None = None
    is_owner: bool | None = None
    uses_ads_now: bool | None = None
    has_sales_dept: bool | None = None
    ad_budget: str | None = None
    has_booking: bool | None = None
    sent_instagram: bool | None = None
    instagram_url: str | None = None
    funnel_stage: str | None = None
    qualification_complete: bool | None = None
    interest_level: str | None = None
    main_intent: str | None = None
    objection: str | None = None
    next_message: str | None = None
    action: str | None = None
    score: int | None = None
    reasoning: str | None = None
    notes: str | None = None
    analyzed_at: datetime | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None
    # Added by this service.
    niche: str | None = None
    budget_stated: bool | None = None
    score_breakdown: (
        Annotated[
            Breakdown,
            msgspec.Meta(
                description="Why the score: one line per reason, each with the messages "
                "behind it (`evidence`: Evolution's key.id and a verbatim quote)"
            ),
        ]
        | None
    ) = None
    remote_jid: str | None = None
    last_message_id: str | None = None
    analyzer: str | None = None
    llm_usage: dict[str, Any] | None = None
    source: str = "auto"
    manual_fields: list[str] = msgspec.field(default_factory=list)
    stage_changed_at: Annotated[
        datetime | None,
        msgspec.Meta(
            description="When funnel_stage last changed (null: not since history is kept)"
        ),
    ] = None


class LeadRow(Lead[list[dict[str, Any]]], kw_only=True, omit_defaults=False):
    """One `dialog_analysis` row, column for column, as the stores read and write it."""

    messages: list[dict[str, Any]] | None = None


class LeadOut(Lead[list[ScoreLine]], kw_only=True, omit_defaults=False):
    """A lead as the API answers: every column but `messages`, its breakdown as score lines."""


LEAD_OUT_FIELDS: tuple[str, ...] = LeadOut.__struct_fields__


def lead_out(row: LeadRow) -> LeadOut:
    """The API's view of a stored row (without its `messages`)."""
    fields = {name: getattr(row, name) for name in LEAD_OUT_FIELDS}
    fields["score_breakdown"] = stored_breakdown(row.score_breakdown)
    return LeadOut(**fields)


LEAD_COLUMNS: tuple[str, ...] = LeadRow.__struct_fields__


class NewLead(msgspec.Struct, kw_only=True):
    """A lead created by hand: who it is, and the columns the person gave (None = not given)."""

    instance_name: str
    user_account_id: uuid.UUID
    contact_phone: str
    given: dict[str, Any]


def fact_columns(facts: LeadFacts, lead_score: Score) -> dict[str, Any]:
    """The lead's columns that follow from its facts and its score."""
    derived = derive(facts)
    return {
        "niche": facts.niche,
        "business_type": facts.business_type,
        "is_owner": facts.is_owner,
        "has_sales_dept": facts.has_sales_dept,
        "uses_ads_now": facts.uses_ads_now,
        "ad_budget": facts.ad_budget,
        "instagram_url": facts.instagram_url,
        "funnel_stage": facts.funnel_stage,
        "main_intent": facts.main_intent,
        "objection": facts.objection,
        "action": facts.action,
        "next_message": facts.next_message,
        "reasoning": facts.reasoning or None,
        "is_medical": derived.is_medical,
        "budget_stated": derived.budget_stated,
        "has_booking": derived.has_booking,
        "sent_instagram": derived.sent_instagram,
        "qualification_complete": derived.qualification_complete,
        "score": lead_score.total,
        "interest_level": lead_score.interest_level,
        "score_breakdown": breakdown_json(lead_score.breakdown),
    }
