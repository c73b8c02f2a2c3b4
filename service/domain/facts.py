"""The facts an analyzer extracts from a dialog (the contract's facts JSON)."""

from __future__ import annotations

from typing import Literal, get_args

import msgspec

Niche = Literal["medicine", "infobusiness", "other", "targetologist"]
FunnelStage = Literal[
    "new_lead",
    "not_qualified",
    "qualified",
    "consultation_booked",
    "consultation_completed",
    "deal_closed",
    "deal_lost",
]
MainIntent = Literal["clinic_lead", "ai_targetolog", "marketing_analysis", "other"]
Action = Literal["want_call", "want_work", "reserve", "none"]
InterestLevel = Literal["hot", "warm", "cold"]

NICHES: tuple[str, ...] = get_args(Niche)
FUNNEL_STAGES: tuple[str, ...] = get_args(FunnelStage)
MAIN_INTENTS: tuple[str, ...] = get_args(MainIntent)
ACTIONS: tuple[str, ...] = get_args(Action)
INTEREST_LEVELS: tuple[str, ...] = get_args(InterestLevel)


class FactFields(msgspec.Struct, kw_only=True):
    """The facts an analysis sets on a lead, stated once: the analyzers' facts JSON
    (`LeadFacts`) and the store's write (`AnalysisWrite`) both are these."""

    niche: Niche
    business_type: str | None
    is_owner: bool | None
    has_sales_dept: bool | None
    uses_ads_now: bool | None
    ad_budget: str | None
    instagram_url: str | None
    funnel_stage: FunnelStage
    main_intent: MainIntent
    objection: str | None
    action: Action
    next_message: str


class LeadFacts(FactFields, kw_only=True, forbid_unknown_fields=True):
    """Exactly the facts JSON of the contract. Field order is the order the model writes."""

    reasoning: str


def empty_facts(stage: FunnelStage = "new_lead") -> LeadFacts:
    """Facts of a contact nothing is known about yet."""
    return LeadFacts(
        niche="other",
        business_type=None,
        is_owner=None,
        has_sales_dept=None,
        uses_ads_now=None,
        ad_budget=None,
        instagram_url=None,
        funnel_stage=stage,
        main_intent="other",
        objection=None,
        action="none",
        next_message="",
        reasoning="",
    )
