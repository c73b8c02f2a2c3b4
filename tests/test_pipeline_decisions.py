"""The pipeline's decisions on in-memory fakes of its store and dialog source: milliseconds.

The same decisions run against PostgreSQL and Evolution's schema in test_consumer.py,
test_backfill.py and friends; tests/test_store_rules.py keeps the fake store's write rules
equal to the SQL ones.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from service.adapters.analyzers.base import AnalysisResult
from service.config import Settings, load_settings
from service.domain.dialog import Contact, Dialog, DialogMessage
from service.domain.facts import LeadFacts, empty_facts
from service.domain.scoring import score
from service.metrics import Metrics
from service.usecases.backfill import BackfillOptions, dry_run, run_backfill
from service.usecases.pipeline import Pipeline
from tests.fakes.memory import MemoryDialogs, MemoryStore

ACCOUNT = uuid.UUID("00000000-0000-4000-8000-0000000000a1")
INSTANCE = "sales"
PHONE = "77010000001"
START = datetime(2026, 9, 1, 9, 0, tzinfo=UTC)
# consultation_booked + medicine + owner + stated budget: 75, hot
HOT = msgspec.structs.replace(
    empty_facts("consultation_booked"), niche="medicine", is_owner=True, ad_budget="500 тыс"
)
WARM = msgspec.structs.replace(HOT, funnel_stage="qualified")  # 65


class ScriptedAnalyzer:
    """Answers the facts it is given; counts its calls."""

    name = "scripted"

    def __init__(self, facts: LeadFacts) -> None:
        self.facts = facts
        self.calls = 0

    async def analyze(self, dialog: Dialog) -> AnalysisResult:
        self.calls += 1
        return AnalysisResult(facts=self.facts, analyzer=self.name)

    async def close(self) -> None:
        return None


def dialog(incoming: int, outgoing: int = 1, *, phone: str = PHONE, shift: int = 0) -> Dialog:
    """`incoming` messages from the contact, then `outgoing` replies; `shift` minutes later."""
    messages = [
        DialogMessage(
            id=f"m{shift}-{n}",
            from_me=n >= incoming,
            timestamp=START + timedelta(minutes=shift + n),
            text="Здравствуйте, хочу записаться" if n < incoming else "Добрый день!",
            type="conversation",
        )
        for n in range(incoming + outgoing)
    ]
    return Dialog(
        instance=INSTANCE,
        contact=Contact(phone=phone, remote_jid=f"{phone}@s.whatsapp.net", name="Айгерим"),
        messages=messages,
        incoming_count=incoming,
        outgoing_count=outgoing,
        first_message_at=messages[0].timestamp,
        last_message_at=messages[-1].timestamp,
    )


class Setup:
    def __init__(self, facts: LeadFacts = WARM, **env: str) -> None:
        self.settings: Settings = load_settings({"MIN_INCOMING": "3", **env}, dotenv=None)
        self.store = MemoryStore()
        self.dialogs = MemoryDialogs()
        self.analyzer = ScriptedAnalyzer(facts)
        self.pipeline = Pipeline(
            self.settings,
            self.dialogs,
            self.store,  # type: ignore[arg-type]  # the calls the pipeline makes
            self.analyzer,
            Metrics(),
        )

    def hot(self) -> list[tuple[str, str, int | None]]:
        return [e for e in self.store.events if e[0] == "lead.hot"]

    async def run(self, **kwargs: object) -> str:
        outcome = await self.pipeline.analyze_contact(INSTANCE, PHONE, ACCOUNT, **kwargs)  # type: ignore[arg-type]
        return outcome.outcome

    def row(self) -> dict[str, object]:
        return self.store.rows[(INSTANCE, PHONE)]


@pytest.fixture
def timed() -> object:
    started = time.perf_counter()
    yield
    # The point of these tests: no service to wait for.
    assert time.perf_counter() - started < 1.0


async def test_under_the_threshold_a_new_lead_without_analysis(timed: None) -> None:
    s = Setup()
    s.dialogs.put(dialog(incoming=2))
    assert await s.run() == "new_lead"
    assert s.analyzer.calls == 0
    assert s.row()["funnel_stage"] == "new_lead"
    assert s.row()["score"] == score(empty_facts("new_lead")).total
    assert s.row()["analyzer"] is None


async def test_an_unchanged_dialog_is_not_analysed_again(timed: None) -> None:
    s = Setup()
    s.dialogs.put(dialog(incoming=3))
    assert await s.run() == "analyzed"
    assert await s.run() == "unchanged"
    assert s.analyzer.calls == 1
    s.dialogs.put(dialog(incoming=4, shift=10))  # a new message
    assert await s.run() == "analyzed"
    assert s.analyzer.calls == 2


async def test_an_older_dialog_loses_to_the_stored_newer_one(timed: None) -> None:
    s = Setup()
    s.dialogs.put(dialog(incoming=4, shift=60))
    assert await s.run() == "analyzed"
    newest = s.row()["last_message_id"]
    s.dialogs.put(dialog(incoming=3))  # a lagging replica: an older dialog
    assert await s.run() == "stale"
    assert s.row()["last_message_id"] == newest


async def test_manual_fields_survive_an_analysis(timed: None) -> None:
    s = Setup(facts=WARM)
    s.dialogs.put(dialog(incoming=3))
    assert await s.run() == "analyzed"
    lead_id = s.row()["id"]
    assert isinstance(lead_id, uuid.UUID)
    await s.store.update_lead(ACCOUNT, lead_id, {"funnel_stage": "deal_closed", "notes": "VIP"})
    s.dialogs.put(dialog(incoming=4, shift=10))
    assert await s.run() == "analyzed"
    row = s.row()
    assert row["funnel_stage"] == "deal_closed"
    assert row["notes"] == "VIP"
    # The score follows the facts as the person set them.
    assert row["score"] == score(msgspec.structs.replace(WARM, funnel_stage="deal_closed")).total
    assert row["manual_fields"] == ["funnel_stage", "notes"]


async def test_lead_hot_goes_out_once_on_the_transition(timed: None) -> None:
    s = Setup(facts=WARM)
    s.dialogs.put(dialog(incoming=3))
    assert await s.run() == "analyzed"
    assert s.hot() == []
    s.analyzer.facts = HOT
    s.dialogs.put(dialog(incoming=4, shift=10))
    assert await s.run() == "analyzed"
    assert s.hot() == [("lead.hot", PHONE, 75)]
    s.dialogs.put(dialog(incoming=5, shift=20))
    assert await s.run() == "analyzed"  # still hot: no second event
    assert len(s.hot()) == 1
    # Every write carried its cause; a replay without notifications raises none.
    assert {w.cause.kind for w in s.store.writes} == {"analysis"}
    assert s.store.writes[-1].cause.analyzer == "scripted"
    quiet = Setup(facts=HOT)
    quiet.dialogs.put(dialog(incoming=3))
    assert await quiet.run(notify=False) == "analyzed"
    assert quiet.store.events == [] and quiet.row()["interest_level"] == "hot"


async def test_a_run_carrying_deletes_names_them_as_its_cause(timed: None) -> None:
    s = Setup(facts=WARM)
    s.dialogs.put(dialog(incoming=4))
    assert await s.run() == "analyzed"
    assert await s.run(deleted={"m0-3"}) == "analyzed"
    assert [w.cause.kind for w in s.store.writes] == ["analysis", "delete"]
    assert s.store.writes[-1].cause.analyzer == "scripted"


async def test_a_lowered_min_incoming_analyses_a_stored_new_lead(timed: None) -> None:
    s = Setup()
    s.dialogs.put(dialog(incoming=2))
    assert await s.run() == "new_lead"
    assert await s.run() == "unchanged"
    assert await s.run(min_incoming=2) == "analyzed"
    assert s.analyzer.calls == 1
    assert await s.run(min_incoming=2) == "unchanged"


@pytest.mark.parametrize("min_incoming", [1, 2, 3])
async def test_dry_run_and_a_real_backfill_agree(timed: None, min_incoming: int) -> None:
    # Stored as new leads under MIN_INCOMING=3, then a backfill with --min-incoming N: the
    # dry run must announce exactly what the real run then analyses.
    s = Setup()
    for n, phone in enumerate(("77010000001", "77010000002", "77010000003")):
        s.dialogs.put(dialog(incoming=n + 1, phone=phone))
    options = BackfillOptions(instance=INSTANCE, account=ACCOUNT, min_incoming=3)
    await run_backfill(s.pipeline, s.dialogs, options)
    lowered = msgspec.structs.replace(options, min_incoming=min_incoming)
    estimate = await dry_run(s.dialogs, lowered, lambda d: 1, s.store, 200, None, lambda line: None)
    calls = s.analyzer.calls
    stats = await run_backfill(s.pipeline, s.dialogs, lowered)
    assert estimate.would_analyze == stats.analyzed == s.analyzer.calls - calls
    assert estimate.unchanged == stats.skipped - estimate.would_store_new_leads
    again = await dry_run(s.dialogs, lowered, lambda d: 1, s.store, 200, None, lambda line: None)
    assert again.would_analyze == 0
