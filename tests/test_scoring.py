"""Scoring in code: the table of the design, the clamp, interest thresholds, derived fields.

Expected numbers are written out here from the design's table (not read back from the
implementation), so a drift in either shows up.
"""

from __future__ import annotations

import itertools
from typing import Any, get_args

import msgspec
import pytest

from service.domain.facts import FunnelStage, LeadFacts, Niche, empty_facts
from service.domain.scoring import (
    ScoreInputs,
    derive,
    has_booking,
    interest_for,
    qualification_complete,
    score,
)
from tests.dialog_samples import HOLDOUT_DIALOGS, load_items

BASES = {
    "new_lead": 5,
    "not_qualified": 15,
    "qualified": 30,
    "consultation_booked": 40,
    "consultation_completed": 55,
    "deal_closed": 75,
    "deal_lost": 0,
}


def facts(**changes: Any) -> LeadFacts:
    return msgspec.structs.replace(empty_facts(), **changes)


@pytest.mark.parametrize(("stage", "base"), sorted(BASES.items()))
def test_stage_base(stage: FunnelStage, base: int) -> None:
    result = score(ScoreInputs(funnel_stage=stage))
    assert result.total == base
    assert result.breakdown[0].reason == f"stage: {stage}"
    assert result.breakdown[0].points == base


@pytest.mark.parametrize(
    ("niche", "points"),
    [("medicine", 15), ("infobusiness", 10), ("targetologist", -30), ("other", 0)],
)
def test_niche_modifier(niche: Niche, points: int) -> None:
    # consultation_completed (55) keeps every modifier inside 0..100, so nothing is clamped.
    result = score(ScoreInputs(funnel_stage="consultation_completed", niche=niche))
    assert result.total == 55 + points
    niche_lines = [line for line in result.breakdown if line.reason.startswith("niche")]
    assert [line.points for line in niche_lines] == ([points] if points else [])


@pytest.mark.parametrize(("is_owner", "points"), [(True, 10), (False, 0), (None, 0)])
def test_owner_modifier(is_owner: bool | None, points: int) -> None:
    assert score(ScoreInputs(funnel_stage="qualified", is_owner=is_owner)).total == 30 + points


@pytest.mark.parametrize(
    ("ad_budget", "points"), [("500 тыс тенге", 10), ("$2000", 10), (None, 0), ("", 0), ("  ", 0)]
)
def test_budget_modifier_from_facts(ad_budget: str | None, points: int) -> None:
    result = score(facts(funnel_stage="qualified", ad_budget=ad_budget))
    assert result.total == 30 + points
    assert any(line.reason == "ad budget stated" for line in result.breakdown) == bool(points)


def test_full_stack_of_modifiers() -> None:
    result = score(
        ScoreInputs(
            funnel_stage="consultation_booked", niche="medicine", is_owner=True, budget_stated=True
        )
    )
    assert result.total == 40 + 15 + 10 + 10
    assert result.interest_level == "hot"


def test_clamped_at_zero() -> None:
    result = score(ScoreInputs(funnel_stage="not_qualified", niche="targetologist"))
    assert result.total == 0  # 15 - 30
    assert result.breakdown[-1].reason == "clamped to 0-100"
    assert result.breakdown[-1].points == 15
    assert score(ScoreInputs(funnel_stage="deal_lost", niche="targetologist")).total == 0


def test_clamped_at_hundred() -> None:
    result = score(
        ScoreInputs(funnel_stage="deal_closed", niche="medicine", is_owner=True, budget_stated=True)
    )
    assert result.total == 100  # 75 + 15 + 10 + 10 = 110
    assert result.breakdown[-1].reason == "clamped to 0-100"
    assert result.breakdown[-1].points == -10
    assert result.interest_level == "hot"


def test_not_clamped_inside_range() -> None:
    result = score(ScoreInputs(funnel_stage="deal_closed", niche="infobusiness", is_owner=True))
    assert result.total == 95
    assert all(line.reason != "clamped to 0-100" for line in result.breakdown)


@pytest.mark.parametrize(
    ("total", "level"),
    [(0, "cold"), (39, "cold"), (40, "warm"), (74, "warm"), (75, "hot"), (100, "hot")],
)
def test_interest_thresholds(total: int, level: str) -> None:
    assert interest_for(total) == level


def test_interest_thresholds_through_score() -> None:
    # 40 exactly: booked, nothing else -> warm; 35: lost medicine owner with budget -> cold.
    assert score(ScoreInputs(funnel_stage="consultation_booked")).interest_level == "warm"
    lost = ScoreInputs(
        funnel_stage="deal_lost", niche="medicine", is_owner=True, budget_stated=True
    )
    assert (score(lost).total, score(lost).interest_level) == (35, "cold")
    # 75 exactly: closed with nothing else -> hot; 70: booked infobusiness owner with budget.
    assert score(ScoreInputs(funnel_stage="deal_closed")).interest_level == "hot"
    booked = ScoreInputs(
        funnel_stage="consultation_booked", niche="infobusiness", is_owner=True, budget_stated=True
    )
    assert (score(booked).total, score(booked).interest_level) == (70, "warm")


def test_breakdown_sums_to_total_for_every_combination() -> None:
    stages: tuple[FunnelStage, ...] = get_args(FunnelStage)
    niches: tuple[Niche, ...] = get_args(Niche)
    seen = 0
    for stage, niche, owner, budget in itertools.product(
        stages, niches, (True, False, None), (True, False)
    ):
        result = score(
            ScoreInputs(funnel_stage=stage, niche=niche, is_owner=owner, budget_stated=budget)
        )
        assert sum(line.points for line in result.breakdown) == result.total
        assert 0 <= result.total <= 100
        assert result.interest_level == interest_for(result.total)
        seen += 1
    assert seen == 7 * 4 * 3 * 2


def test_score_of_facts_equals_score_of_its_inputs() -> None:
    f = facts(
        funnel_stage="qualified", niche="medicine", is_owner=True, ad_budget="300к тенге в месяц"
    )
    inputs = ScoreInputs(
        funnel_stage="qualified", niche="medicine", is_owner=True, budget_stated=True
    )
    assert score(f) == score(inputs)
    assert score(f).total == 65


# -- derived fields -------------------------------------------------------------------------


def test_qualification_complete_needs_all_four_answers() -> None:
    complete = facts(is_owner=False, has_sales_dept=False, uses_ads_now=False, ad_budget="100к")
    assert qualification_complete(complete)  # "no" is an answer
    assert derive(complete).qualification_complete
    for missing in ("is_owner", "has_sales_dept", "uses_ads_now"):
        assert not qualification_complete(msgspec.structs.replace(complete, **{missing: None}))
    for budget in (None, "", " "):
        assert not qualification_complete(msgspec.structs.replace(complete, ad_budget=budget))


@pytest.mark.parametrize(
    ("niche", "is_medical"),
    [("medicine", True), ("infobusiness", False), ("targetologist", False), ("other", False)],
)
def test_is_medical(niche: Niche, is_medical: bool) -> None:
    assert derive(facts(niche=niche)).is_medical is is_medical


def test_budget_stated() -> None:
    assert derive(facts(ad_budget="где-то 400 тыс тг")).budget_stated
    assert not derive(facts(ad_budget=None)).budget_stated
    assert not derive(facts(ad_budget="   ")).budget_stated


@pytest.mark.parametrize(
    ("stage", "booked"),
    [
        ("new_lead", False),
        ("not_qualified", False),
        ("qualified", False),
        ("consultation_booked", True),
        ("consultation_completed", True),
        ("deal_closed", True),
        ("deal_lost", False),  # lost after a booking is no booking any more
    ],
)
def test_has_booking(stage: FunnelStage, booked: bool) -> None:
    assert has_booking(stage) is booked
    assert derive(facts(funnel_stage=stage)).has_booking is booked


def test_sent_instagram() -> None:
    assert derive(facts(instagram_url="https://instagram.com/lotos_clinic")).sent_instagram
    assert not derive(facts(instagram_url=None)).sent_instagram
    assert not derive(facts(instagram_url="")).sent_instagram


# -- the labeled dialogs --------------------------------------------------------------------


def _labeled_inputs(labels: dict[str, Any]) -> ScoreInputs:
    return ScoreInputs(
        funnel_stage=labels["funnel_stage"],
        niche=labels["niche"],
        is_owner=labels["is_owner"],
        budget_stated=labels["budget_stated"],
    )


def test_expected_score_of_every_dev_dialog(dialogs: list[dict[str, Any]]) -> None:
    assert len(dialogs) == 40
    wrong = []
    for item in dialogs:
        labels = item["labels"]
        result = score(_labeled_inputs(labels))
        if (result.total, result.interest_level) != (
            labels["expected_score"],
            labels["expected_interest"],
        ):
            wrong.append((item["id"], result.total, labels["expected_score"]))
    assert not wrong, wrong


def test_expected_score_of_every_holdout_dialog() -> None:
    items = load_items(HOLDOUT_DIALOGS)
    assert len(items) >= 25
    for item in items:
        labels = item["labels"]
        result = score(_labeled_inputs(labels))
        assert result.total == labels["expected_score"], item["id"]
        assert result.interest_level == labels["expected_interest"], item["id"]
