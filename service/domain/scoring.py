"""Lead score, computed in code from facts (never taken from a model).

Score = base by funnel stage + niche modifier + owner + budget stated, clamped to 0-100.
Interest: hot >= 75, warm 40-74, cold <= 39.
"""

from __future__ import annotations

from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from typing import Annotated, Any

import msgspec

from service.domain.evidence import NO_EVIDENCE, Citations, EvidenceFact, FactEvidence
from service.domain.facts import FunnelStage, InterestLevel, LeadFacts, Niche

STAGE_BASE: dict[str, int] = {
    "new_lead": 5,
    "not_qualified": 15,
    "qualified": 30,
    "consultation_booked": 40,
    "consultation_completed": 55,
    "deal_closed": 75,
    "deal_lost": 0,
}
NICHE_POINTS: dict[str, int] = {
    "medicine": 15,
    "infobusiness": 10,
    "targetologist": -30,
    "other": 0,
}
OWNER_POINTS = 10
BUDGET_POINTS = 10
HOT_FROM = 75
WARM_FROM = 40

# Stages at or after a booked consultation (deal_lost excluded): `has_booking`.
_BOOKED_STAGES = frozenset({"consultation_booked", "consultation_completed", "deal_closed"})


class ScoreLine(msgspec.Struct, frozen=True):
    """One reason of the score: the fact it stands on and the messages behind it."""

    reason: str
    points: int
    fact: Annotated[
        EvidenceFact | None, msgspec.Meta(description="The fact the line stands on (none: clamp)")
    ] = None
    evidence: Annotated[
        Citations,
        msgspec.Meta(description="The messages behind the fact, at most three; [] when none"),
    ] = ()
    manual: Annotated[
        bool,
        msgspec.Meta(description="The fact was set by hand: no message stands behind it"),
    ] = False


class Score(msgspec.Struct, frozen=True, kw_only=True):
    total: int
    interest_level: InterestLevel
    breakdown: list[ScoreLine]


class ScoreInputs(msgspec.Struct, frozen=True, kw_only=True):
    """The facts the score depends on (a manual lead may give only these)."""

    funnel_stage: FunnelStage
    niche: Niche = "other"
    is_owner: bool | None = None
    budget_stated: bool = False


def breakdown_json(lines: Sequence[ScoreLine]) -> list[dict[str, Any]]:
    """Score lines as the `score_breakdown` column holds them (JSON objects and arrays)."""
    stored: list[dict[str, Any]] = msgspec.json.decode(msgspec.json.encode(lines))
    return stored


def stored_breakdown(lines: Sequence[Any] | None) -> list[ScoreLine] | None:
    """A stored `score_breakdown` as score lines; lines of older rows (reason and points
    only) get no fact and no evidence, and an entry that is no score line is left out."""
    if lines is None:
        return None
    kept: list[ScoreLine] = []
    for line in lines:
        try:
            kept.append(msgspec.convert(line, ScoreLine))
        except msgspec.ValidationError:
            continue
    return kept


def interest_for(total: int) -> InterestLevel:
    if total >= HOT_FROM:
        return "hot"
    if total >= WARM_FROM:
        return "warm"
    return "cold"


def score_inputs(facts: LeadFacts) -> ScoreInputs:
    return ScoreInputs(
        funnel_stage=facts.funnel_stage,
        niche=facts.niche,
        is_owner=facts.is_owner,
        budget_stated=budget_stated(facts.ad_budget),
    )


def score(
    facts: LeadFacts | ScoreInputs,
    evidence: FactEvidence = NO_EVIDENCE,
    manual: AbstractSet[str] = frozenset(),
) -> Score:
    """The score of `facts`; each line carries the evidence of its fact, none for the
    facts in `manual` (set by hand)."""
    inputs = facts if isinstance(facts, ScoreInputs) else score_inputs(facts)

    def line(reason: str, points: int, fact: EvidenceFact) -> ScoreLine:
        if fact in manual:
            return ScoreLine(reason, points, fact, (), True)
        return ScoreLine(reason, points, fact, evidence.of(fact))

    lines = [line(f"stage: {inputs.funnel_stage}", STAGE_BASE[inputs.funnel_stage], "funnel_stage")]
    niche_points = NICHE_POINTS[inputs.niche]
    if niche_points:
        lines.append(line(f"niche: {inputs.niche}", niche_points, "niche"))
    if inputs.is_owner:
        lines.append(line("decision maker: owner", OWNER_POINTS, "is_owner"))
    if inputs.budget_stated:
        lines.append(line("ad budget stated", BUDGET_POINTS, "ad_budget"))
    raw = sum(item.points for item in lines)
    total = max(0, min(100, raw))
    if total != raw:
        lines.append(ScoreLine("clamped to 0-100", total - raw))
    return Score(total=total, interest_level=interest_for(total), breakdown=lines)


def budget_stated(ad_budget: str | None) -> bool:
    return bool(ad_budget and ad_budget.strip())


def qualification_complete(facts: LeadFacts) -> bool:
    """All four qualification questions of the original answered."""
    return (
        facts.is_owner is not None
        and facts.has_sales_dept is not None
        and facts.uses_ads_now is not None
        and budget_stated(facts.ad_budget)
    )


def has_booking(stage: str) -> bool:
    return stage in _BOOKED_STAGES


class DerivedFields(msgspec.Struct, frozen=True, kw_only=True):
    qualification_complete: bool
    is_medical: bool
    budget_stated: bool
    has_booking: bool
    sent_instagram: bool


def derive(facts: LeadFacts) -> DerivedFields:
    return DerivedFields(
        qualification_complete=qualification_complete(facts),
        is_medical=facts.niche == "medicine",
        budget_stated=budget_stated(facts.ad_budget),
        has_booking=has_booking(facts.funnel_stage),
        sent_instagram=bool(facts.instagram_url),
    )
