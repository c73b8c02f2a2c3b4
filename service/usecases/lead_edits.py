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

from service.adapters.evolution.identity import PHONE_SUFFIX, normalize_phone
from service.domain.evidence import from_breakdown
from service.domain.facts import (
    ACTIONS,
    FUNNEL_STAGES,
    MAIN_INTENTS,
    NICHES,
    LeadFacts,
    Niche,
)
from service.domain.lead import MANUAL_COLUMNS, LeadRow, NewLead, fact_columns
from service.domain.scoring import interest_for, score

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


def normalized_phone(raw: str) -> str | None:
    """Digits only, or None when that leaves no plausible phone number."""
    digits = normalize_phone(raw)
    if not digits.isascii() or not PHONE_MIN_DIGITS <= len(digits) <= PHONE_MAX_DIGITS:
        return None
    return digits


def new_manual_lead(lead: NewLead, now: datetime) -> LeadRow:
    """The row of a lead created by hand (`source = "manual"`)."""
    given = {name: value for name, value in lead.given.items() if value is not None}
    is_medical = given.get("is_medical")
    niche: Niche = given.get("niche") or ("medicine" if is_medical else "other")
    facts = LeadFacts(
        niche=niche,
        business_type=given.get("business_type"),
        is_owner=given.get("is_owner"),
        has_sales_dept=given.get("has_sales_dept"),
        uses_ads_now=given.get("uses_ads_now"),
        ad_budget=given.get("ad_budget"),
        instagram_url=given.get("instagram_url"),
        funnel_stage=given["funnel_stage"],
        main_intent=given.get("main_intent") or "other",
        objection=given.get("objection"),
        action=given.get("action") or "none",
        next_message=given.get("next_message") or "",
        reasoning="",
    )
    # Every fact of a lead made by hand is the person's word: no message stands behind it
    # (a niche taken from isMedical included).
    by_hand = set(given) | ({"niche"} if is_medical is not None else set())
    columns = fact_columns(facts, score(facts, manual=by_hand))
    if is_medical is not None:
        columns["is_medical"] = is_medical
    return LeadRow(
        id=uuid.uuid4(),
        instance_name=lead.instance_name,
        user_account_id=lead.user_account_id,
        contact_phone=lead.contact_phone,
        remote_jid=lead.contact_phone + PHONE_SUFFIX,
        contact_name=given.get("contact_name"),
        notes=given.get("notes"),
        **columns,
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
    # The analysis' evidence stays with the facts nobody changed by hand.
    computed = score(facts, from_breakdown(row.score_breakdown), manual)

    if "score" in changes:
        total = int(changes["score"])
    elif "score" in row.manual_fields and row.score is not None:
        total = row.score
    else:
        total = computed.total
    columns = fact_columns(facts, computed)
    candidates = {column: columns[column] for column in DEPENDS_ON}
    candidates["score"] = total
    candidates["interest_level"] = interest_for(total)
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
