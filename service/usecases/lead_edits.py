"""Leads changed by hand (POST/PATCH): pure rules, no I/O.

Scores come from the same `score()` as automatic analyses, over the facts as they stand
after the edit. Fields a person gives are listed in `manual_fields` (kept by every later
analysis); values derived from them (score, interest, flags) are recomputed, not frozen,
unless the person set them too.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

import msgspec

from handlers.rest_models import LeadCreateBody
from service.adapters.evolution.identity import PHONE_SUFFIX, normalize_phone
from service.adapters.stores.base import MANUAL_COLUMNS, LeadRow
from service.domain.facts import (
    ACTIONS,
    FUNNEL_STAGES,
    MAIN_INTENTS,
    NICHES,
    LeadFacts,
    Niche,
)
from service.domain.scoring import derive, interest_for, score

# E.164 allows at most 15 digits; fewer than 7 is no phone number at all.
PHONE_MIN_DIGITS = 7
PHONE_MAX_DIGITS = 15

# Derived column -> the columns it is computed from. A PATCH recomputes a derived column
# only when one of its inputs changed, so editing `notes` never rescores a lead.
_SCORE_INPUTS = frozenset({"funnel_stage", "niche", "is_owner", "ad_budget"})
DEPENDS_ON: dict[str, frozenset[str]] = {
    "score": _SCORE_INPUTS,
    "score_breakdown": _SCORE_INPUTS,
    "interest_level": _SCORE_INPUTS | {"score"},
    "budget_stated": frozenset({"ad_budget"}),
    "qualification_complete": frozenset(
        {"is_owner", "has_sales_dept", "uses_ads_now", "ad_budget"}
    ),
    "is_medical": frozenset({"niche"}),
    "has_booking": frozenset({"funnel_stage"}),
    "sent_instagram": frozenset({"instagram_url"}),
}
_FACT_FIELDS = LeadFacts.__struct_fields__
_CREATE_IDENTITY = frozenset({"phone", "user_account_id", "instance_name"})


def normalized_phone(raw: str) -> str | None:
    """Digits only, or None when that leaves no plausible phone number."""
    digits = normalize_phone(raw)
    if not digits.isascii() or not PHONE_MIN_DIGITS <= len(digits) <= PHONE_MAX_DIGITS:
        return None
    return digits


def new_manual_lead(body: LeadCreateBody, phone: str, now: datetime) -> LeadRow:
    """The row of a lead created by hand (`source = "manual"`)."""
    given = {
        name: value
        for name in body.__struct_fields__
        if name not in _CREATE_IDENTITY and (value := getattr(body, name)) is not None
    }
    niche: Niche = body.niche or ("medicine" if body.is_medical else "other")
    facts = LeadFacts(
        niche=niche,
        business_type=body.business_type,
        is_owner=body.is_owner,
        has_sales_dept=body.has_sales_dept,
        uses_ads_now=body.uses_ads_now,
        ad_budget=body.ad_budget,
        instagram_url=body.instagram_url,
        funnel_stage=body.funnel_stage,
        main_intent=body.main_intent or "other",
        objection=body.objection,
        action=body.action or "none",
        next_message=body.next_message or "",
        reasoning="",
    )
    derived = derive(facts)
    lead_score = score(facts)
    return LeadRow(
        id=uuid.uuid4(),
        instance_name=body.instance_name,
        user_account_id=body.user_account_id,
        contact_phone=phone,
        remote_jid=phone + PHONE_SUFFIX,
        contact_name=body.contact_name,
        business_type=body.business_type,
        niche=niche,
        is_medical=derived.is_medical if body.is_medical is None else body.is_medical,
        is_owner=body.is_owner,
        has_sales_dept=body.has_sales_dept,
        uses_ads_now=body.uses_ads_now,
        ad_budget=body.ad_budget,
        budget_stated=derived.budget_stated,
        instagram_url=body.instagram_url,
        sent_instagram=derived.sent_instagram,
        funnel_stage=body.funnel_stage,
        has_booking=derived.has_booking,
        qualification_complete=derived.qualification_complete,
        main_intent=facts.main_intent,
        objection=body.objection,
        action=facts.action,
        next_message=facts.next_message,
        notes=body.notes,
        score=lead_score.total,
        interest_level=lead_score.interest_level,
        score_breakdown=[msgspec.to_builtins(line) for line in lead_score.breakdown],
        source="manual",
        manual_fields=[c for c in MANUAL_COLUMNS if c in given],
        created_at=now,
        updated_at=now,
    )


def patch_update(row: LeadRow, changes: dict[str, Any]) -> dict[str, Any]:
    """Derived columns to write along with `changes` (which become manual fields)."""
    touched = set(changes)
    manual = set(row.manual_fields) | touched
    merged = {name: changes.get(name, getattr(row, name)) for name in _FACT_FIELDS}
    facts = _facts(merged)
    flags = derive(facts)
    computed = score(facts)

    if "score" in changes:
        total = int(changes["score"])
    elif "score" in row.manual_fields and row.score is not None:
        total = row.score
    else:
        total = computed.total
    candidates: dict[str, Any] = {
        "score": total,
        "score_breakdown": [msgspec.to_builtins(line) for line in computed.breakdown],
        "interest_level": interest_for(total),
        "budget_stated": flags.budget_stated,
        "qualification_complete": flags.qualification_complete,
        "is_medical": flags.is_medical,
        "has_booking": flags.has_booking,
        "sent_instagram": flags.sent_instagram,
    }
    return {
        column: value
        for column, value in candidates.items()
        if column not in manual and DEPENDS_ON[column] & touched
    }


def _facts(values: dict[str, Any]) -> LeadFacts:
    """Facts from stored values; rows from older versions may hold NULLs or other labels."""
    return LeadFacts(
        niche=_pick(values["niche"], NICHES, "other"),
        business_type=values["business_type"],
        is_owner=values["is_owner"],
        has_sales_dept=values["has_sales_dept"],
        uses_ads_now=values["uses_ads_now"],
        ad_budget=values["ad_budget"],
        instagram_url=values["instagram_url"],
        funnel_stage=_pick(values["funnel_stage"], FUNNEL_STAGES, "new_lead"),
        main_intent=_pick(values["main_intent"], MAIN_INTENTS, "other"),
        objection=values["objection"],
        action=_pick(values["action"], ACTIONS, "none"),
        next_message=values["next_message"] or "",
        reasoning=values["reasoning"] or "",
    )


def _pick(value: Any, allowed: tuple[str, ...], default: str) -> Any:
    return value if value in allowed else default
