"""Manual lead rules (pure): phone normalisation, new leads, what a PATCH recomputes."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import msgspec
import pytest

from handlers.rest_models import LeadCreateBody, LeadPatchBody
from service.domain.evidence import EVIDENCE_FACTS
from service.domain.lead import LEAD_OUT_FIELDS, LeadRow, lead_out
from service.domain.scoring import ScoreInputs, breakdown_json, score
from service.usecases.lead_edits import new_manual_lead, normalized_phone, patch_update

NOW = datetime(2026, 9, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("+7 (701) 234-56-01", "77012345601"),
        ("8 701 234 56 01", "87012345601"),
        ("1234567", "1234567"),
        ("123456", None),
        ("1234567890123456", None),
        ("٧٧٠١٢٣٤٥٦٠١", None),  # non-ASCII digits are not a phone number here
    ],
)
def test_phone_normalisation(raw: str, expected: str | None) -> None:
    assert normalized_phone(raw) == expected


def create_body(**fields: object) -> LeadCreateBody:
    base: dict[str, object] = {
        "phone": "+7 701 234 56 01",
        "userAccountId": str(uuid.uuid4()),
        "instanceName": "sales",
        "funnelStage": "qualified",
    }
    base.update(fields)
    return msgspec.convert(base, LeadCreateBody)


def test_new_lead_is_scored_like_an_analysis_and_marks_given_fields_manual() -> None:
    body = create_body(
        contactName="Айгерим", niche="medicine", isOwner=True, adBudget="500 тыс", notes="VIP"
    )
    lead = new_manual_lead(body.new_lead("77012345601"), NOW)
    expected = score(
        ScoreInputs(funnel_stage="qualified", niche="medicine", is_owner=True, budget_stated=True),
        manual=set(EVIDENCE_FACTS),
    )
    assert lead.score == expected.total == 65
    assert lead.interest_level == "warm"
    assert lead.score_breakdown == breakdown_json(expected.breakdown)
    # Every fact is the person's word: marked so, with no message behind it.
    assert all(line["manual"] and line["evidence"] == [] for line in lead.score_breakdown)
    assert lead.source == "manual"
    assert lead.contact_phone == "77012345601"
    assert lead.remote_jid == "77012345601@s.whatsapp.net"
    assert lead.is_medical is True
    assert lead.budget_stated is True
    assert lead.qualification_complete is False  # sales dept and ads not answered
    assert lead.next_message == ""  # NOT NULL column in the original's table
    assert set(lead.manual_fields) == {
        "contact_name",
        "niche",
        "is_owner",
        "ad_budget",
        "notes",
        "funnel_stage",
    }


def test_is_medical_alone_means_the_medicine_niche() -> None:
    lead = new_manual_lead(create_body(isMedical=True).new_lead("77012345601"), NOW)
    assert lead.niche == "medicine"
    assert lead.score == 45  # qualified 30 + medicine 15
    assert "is_medical" in lead.manual_fields
    assert "niche" not in lead.manual_fields


def stored(**values: object) -> LeadRow:
    base: dict[str, object] = {
        "id": uuid.uuid4(),
        "instance_name": "sales",
        "user_account_id": uuid.uuid4(),
        "contact_phone": "77012345601",
        "funnel_stage": "qualified",
        "niche": "other",
        "score": 30,
        "interest_level": "cold",
        "next_message": "",
    }
    base.update(values)
    return LeadRow(**base)  # type: ignore[arg-type]


def changes(**fields: object) -> dict[str, object]:
    body = msgspec.convert({"userAccountId": str(uuid.uuid4()), **fields}, LeadPatchBody)
    return body.changes()


def test_patch_of_a_score_input_rescores() -> None:
    derived = patch_update(stored(), changes(funnelStage="deal_closed"))
    assert derived["score"] == 75
    assert derived["interest_level"] == "hot"
    assert derived["has_booking"] is True
    assert "is_medical" not in derived  # niche did not change


def test_patch_of_notes_recomputes_nothing() -> None:
    assert patch_update(stored(score=55), changes(notes="call back")) == {}


def test_manual_score_wins_and_sets_interest() -> None:
    derived = patch_update(stored(), changes(score=90, funnelStage="qualified"))
    assert "score" not in derived  # given by hand: it is a change, not a derived value
    assert derived["interest_level"] == "hot"


def test_score_set_by_hand_before_is_kept_when_facts_change() -> None:
    row = stored(score=12, interest_level="cold", manual_fields=["score"])
    derived = patch_update(row, changes(niche="medicine"))
    assert "score" not in derived
    assert derived["interest_level"] == "cold"
    assert derived["is_medical"] is True


def test_manual_interest_is_not_recomputed() -> None:
    row = stored(manual_fields=["interest_level"])
    derived = patch_update(row, changes(funnelStage="deal_closed"))
    assert derived["score"] == 75
    assert "interest_level" not in derived


def test_patch_null_clears_and_requalifies() -> None:
    row = stored(is_owner=True, has_sales_dept=True, uses_ads_now=True, ad_budget="$2000")
    derived = patch_update(row, changes(adBudget=None))
    assert derived["budget_stated"] is False
    assert derived["qualification_complete"] is False
    assert derived["score"] == 40  # qualified 30 + owner 10; the budget points are gone
    assert changes(adBudget=None) == {"ad_budget": None}


def test_rows_of_older_versions_with_nulls_still_score() -> None:
    row = stored(funnel_stage=None, niche=None, main_intent="legacy", action=None)
    derived = patch_update(row, changes(isOwner=True))
    assert derived["score"] == 15  # new_lead 5 + owner 10


def test_lead_out_is_every_column_but_messages() -> None:
    assert set(LEAD_OUT_FIELDS) == set(LeadRow.__struct_fields__) - {"messages"}
    row = stored(messages=[{"text": "secret"}])
    assert "messages" not in msgspec.to_builtins(lead_out(row))
