"""The in-memory store (tests/fakes/memory.py) keeps the SQL write rules: the same cases run
against it and against PostgresStore, and must end in the same answers and the same rows.
Also: the manual and derived column lists the SQL spells out are the Python ones."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest

from service.adapters.stores.base import AnalysisWrite
from service.adapters.stores.postgres import PostgresStore
from service.domain.facts import LeadFacts, empty_facts
from service.domain.lead import DERIVED_COLUMNS, MANUAL_COLUMNS, fact_columns
from service.domain.scoring import score
from tests.fakes.memory import MemoryStore

ROOT = Path(__file__).parent.parent
ACCOUNT = uuid.UUID("00000000-0000-4000-8000-0000000000b1")
OTHER = uuid.UUID("00000000-0000-4000-8000-0000000000b2")
START = datetime(2026, 9, 1, 9, 0, tzinfo=UTC)
WARM = msgspec.structs.replace(empty_facts("qualified"), niche="medicine", is_owner=True)
HOT = msgspec.structs.replace(WARM, funnel_stage="consultation_booked", ad_budget="500 тыс")
# What is compared of a row: everything but ids and the database's clock.
COMPARED = (
    "contact_name",
    "incoming_count",
    "outgoing_count",
    "first_message",
    "last_message",
    "last_message_id",
    *(c for c in fact_columns(WARM, score(WARM)) if c != "score_breakdown"),
    "analyzer",
    "source",
    "manual_fields",
    "notes",
)


def write(
    minute: int,
    facts: LeadFacts | None = None,
    *,
    account: uuid.UUID = ACCOUNT,
    name: str | None = "Айгерим",
) -> AnalysisWrite:
    """A write of the dialog as it stood at START+minute; facts=None: a new_lead refresh."""
    analyzed = facts is not None
    facts = facts or empty_facts("new_lead")
    return AnalysisWrite(
        instance_name="sales",
        user_account_id=account,
        contact_phone="77010000001",
        contact_name=name,
        remote_jid="77010000001@s.whatsapp.net",
        incoming_count=minute + 1,
        outgoing_count=1,
        first_message=START,
        last_message=START + timedelta(minutes=minute),
        last_message_id=f"m{minute}",
        **fact_columns(facts, score(facts)),
        analyzed=analyzed,
        messages=[],
        analyzer="rules" if analyzed else None,
        llm_usage=None,
    )


Step = Callable[[Any], Any]


async def _edit(store: Any, changes: dict[str, Any]) -> Any:
    state = await store.get_state(ACCOUNT, "sales", "77010000001")
    row = await store.update_lead(ACCOUNT, state.id, changes, {"score": 1, "is_medical": False})
    return None if row is None else sorted(row.manual_fields)


CASES: dict[str, list[Step]] = {
    "newest-wins": [
        lambda s: s.upsert_analysis(write(5, WARM)),
        lambda s: s.upsert_analysis(write(2, HOT)),
        lambda s: s.upsert_analysis(write(7, HOT)),
    ],
    "new-lead-then-analysis-then-refresh": [
        lambda s: s.upsert_analysis(write(1)),
        lambda s: s.upsert_analysis(write(1)),
        lambda s: s.upsert_analysis(write(3, HOT)),
        lambda s: s.upsert_analysis(write(4)),
    ],
    "manual-fields-survive": [
        lambda s: s.upsert_analysis(write(3, WARM)),
        lambda s: _edit(
            s, {"funnel_stage": "deal_lost", "contact_name": "Айгерим К.", "notes": "x"}
        ),
        lambda s: s.upsert_analysis(write(4, HOT, name="Aigerim")),
        lambda s: s.upsert_analysis(write(5)),
    ],
    "edited-new-lead-keeps-its-facts": [
        lambda s: s.upsert_analysis(write(1)),
        lambda s: _edit(s, {"niche": "infobusiness"}),
        lambda s: s.upsert_analysis(write(2)),
    ],
    "foreign-account": [
        lambda s: s.upsert_analysis(write(3, WARM)),
        lambda s: s.upsert_analysis(write(9, HOT, account=OTHER)),
    ],
    "forgotten-time": [
        lambda s: s.upsert_analysis(write(9, HOT)),
        lambda s: s.forget_dialog_time(ACCOUNT, "sales", "77010000001"),
        lambda s: s.upsert_analysis(write(3, WARM)),
    ],
}


async def _play(store: Any, steps: list[Step]) -> tuple[list[Any], dict[str, Any]]:
    answers = []
    for step in steps:
        answer = await step(store)
        if hasattr(answer, "applied"):  # UpsertResult: its id only as "has one"
            answer = (
                answer.applied,
                answer.id is not None,
                answer.previous_interest,
                answer.interest_level,
            )
        answers.append(answer)
    state = await store.get_state(ACCOUNT, "sales", "77010000001")
    row = await store.get_lead(ACCOUNT, state.id)
    return answers, {name: getattr(row, name) for name in COMPARED}


@pytest.fixture
async def postgres(results_dsn: str) -> AsyncIterator[PostgresStore]:
    store = await PostgresStore.open(results_dsn)
    try:
        yield store
    finally:
        await store.close()


@pytest.mark.parametrize("case", sorted(CASES))
async def test_memory_store_writes_as_the_sql_does(postgres: PostgresStore, case: str) -> None:
    real = await _play(postgres, CASES[case])
    fake = await _play(MemoryStore(), CASES[case])
    assert fake == real


def _sql_array(function: str, position: int) -> set[str]:
    text = "".join(p.read_text() for p in sorted((ROOT / "service" / "sql").glob("*.sql")))
    body = text[text.rindex(f"FUNCTION {function}(") :]
    arrays = re.findall(r"<> ALL \(ARRAY\[(.*?)\]\)", body, flags=re.S)
    return set(re.findall(r"'(\w+)'", arrays[position]))


def test_sql_lists_the_manual_and_derived_columns_of_python() -> None:
    assert _sql_array("crm_update_lead", 0) == set(MANUAL_COLUMNS)
    assert _sql_array("crm_update_lead", 1) == set(DERIVED_COLUMNS)


def test_sql_keeps_every_manual_column_from_analyses() -> None:
    # The function's latest definition (a later migration file may redefine it).
    text = "".join(p.read_text() for p in sorted((ROOT / "service" / "sql").glob("*.sql")))
    start = text.rindex("FUNCTION crm_upsert_analysis(")
    body = text[start : text.index("FUNCTION crm_update_lead(", start)]
    guarded = set(re.findall(r"'(\w+)' = ANY\([do]\.manual_fields\)", body))
    # notes is never written by an analysis at all
    assert guarded == set(MANUAL_COLUMNS) - {"notes"}
