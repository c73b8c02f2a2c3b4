"""`crm-backend eval` as a user runs it: labeled dialogs or hand-edited leads as the truth,
the rules analyzer or a model over real HTTP, a cost cap checked before any call, and
nothing written."""

from __future__ import annotations

import json
import uuid
from typing import Any

import asyncpg
import msgspec

from service.adapters.evolution.seed import load_dialogs
from service.domain.facts import empty_facts
from tests.fakes.openai_server import FakeOpenAI
from tests.test_backfill import ROOT, _env, backfill, run_cli

LABELS = ROOT / "service" / "demo_data" / "dialogs.json"
QUALIFIED = msgspec.structs.replace(
    empty_facts("qualified"), niche="medicine", is_owner=True, main_intent="clinic_lead"
)


async def run_eval(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    return await run_cli(env, "eval", *args)


def labeled() -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = json.loads(LABELS.read_text(encoding="utf-8"))
    return items


async def test_rules_on_labels_prints_agreement_and_the_confusion_table(
    evolution_dsn: str, results_dsn: str
) -> None:
    env = _env(evolution_dsn, results_dsn, "http://127.0.0.1:9/v1")
    code, out, err = await run_eval(env, "--labels", str(LABELS), "--analyzer", "rules")
    assert code == 0, err
    assert "eval: 40 dialogs, analyzer rules" in out
    for field in ("funnel_stage", "niche", "is_owner", "budget_stated", "interest"):
        assert f"  {field}" in out
    assert "stage confusion (rows: truth, columns: analyzer):" in out

    code, out, _ = await run_eval(env, "--labels", str(LABELS), "--analyzer", "rules", "--json")
    report = json.loads(out)
    assert report["dialogs"] == 40 and report["analyzers_used"] == {"rules": 40}
    assert sum(sum(row.values()) for row in report["stage_confusion"].values()) == 40
    assert report["agreement"]["funnel_stage"]["total"] == 40
    assert report["tokens"]["calls"] == 0


async def test_a_model_on_labels_counts_tokens_cost_and_agreement(
    evolution_dsn: str, results_dsn: str
) -> None:
    items = labeled()
    async with FakeOpenAI(facts=lambda _: QUALIFIED) as fake:
        env = _env(evolution_dsn, results_dsn, fake.base_url)
        code, out, err = await run_eval(env, "--labels", str(LABELS), "--json")
        assert code == 0, err
        assert "estimated cost: $" in err
    report = json.loads(out)
    assert fake.calls == 40 and report["model"] == "gpt-6.1-terra"
    qualified = sum(1 for d in items if d["labels"]["funnel_stage"] == "qualified")
    assert report["agreement"]["funnel_stage"] == {
        "agree": qualified,
        "total": 40,
        "share": qualified / 40,
    }
    medicine = sum(1 for d in items if d["labels"]["niche"] == "medicine")
    assert report["agreement"]["niche"]["agree"] == medicine
    # Every true stage row lands in the `qualified` column.
    assert all(set(row) == {"qualified"} for row in report["stage_confusion"].values())
    assert report["tokens"]["calls"] == 40 and report["tokens"]["prompt_tokens"] > 40_000
    assert report["cost_usd"] > 0 and report["estimated"]["cost_usd"] > 0
    assert report["latency_seconds"]["max"] >= report["latency_seconds"]["p50"] > 0


async def test_the_cost_cap_stops_the_run_before_any_call(
    evolution_dsn: str, results_dsn: str
) -> None:
    async with FakeOpenAI() as fake:
        env = _env(evolution_dsn, results_dsn, fake.base_url)
        code, out, err = await run_eval(
            env, "--labels", str(LABELS), "--model", "gpt-6.1-terra", "--max-cost", "0.001"
        )
    assert code == 2 and out == ""
    assert "over --max-cost $0.00" in err and "estimated cost $" in err
    assert fake.calls == 0


async def test_from_edits_takes_hand_set_fields_as_truth_and_writes_nothing(
    evolution_dsn: str, results_dsn: str, dialogs: list[dict[str, Any]]
) -> None:
    await load_dialogs(evolution_dsn, "dev", dialogs)
    account = uuid.uuid4()
    env = _env(evolution_dsn, results_dsn, "http://127.0.0.1:9/v1")
    env["ANALYZER"] = "rules"
    await backfill(env, "--instance", "dev", "--account", str(account))
    conn = await asyncpg.connect(results_dsn)
    try:
        # A salesperson corrects two leads' stage by hand and one lead's niche.
        rows = await conn.fetch(
            "SELECT id, funnel_stage FROM dialog_analysis WHERE funnel_stage = 'qualified' "
            "ORDER BY contact_phone LIMIT 2"
        )
        await conn.execute(
            "UPDATE dialog_analysis SET funnel_stage = 'deal_closed', "
            "manual_fields = '{funnel_stage}' WHERE id = $1",
            rows[0]["id"],
        )
        await conn.execute(
            "UPDATE dialog_analysis SET manual_fields = '{funnel_stage}' WHERE id = $1",
            rows[1]["id"],
        )
        before = [dict(r) for r in await conn.fetch("SELECT * FROM dialog_analysis ORDER BY id")]
        code, out, err = await run_eval(
            env, "--from-edits", "--instance", "dev", "--account", str(account), "--json"
        )
        after = [dict(r) for r in await conn.fetch("SELECT * FROM dialog_analysis ORDER BY id")]
    finally:
        await conn.close()
    assert code == 0, err
    report = json.loads(out)
    assert report["dialogs"] == 2
    assert report["agreement"]["funnel_stage"] == {"agree": 1, "total": 2, "share": 0.5}
    assert report["agreement"]["niche"]["total"] == 0
    assert report["stage_confusion"] == {
        "deal_closed": {"qualified": 1},
        "qualified": {"qualified": 1},
    }
    assert after == before  # nothing written


async def test_from_edits_needs_an_instance(evolution_dsn: str, results_dsn: str) -> None:
    env = _env(evolution_dsn, results_dsn, "http://127.0.0.1:9/v1")
    code, _, err = await run_eval(env, "--from-edits", "--analyzer", "rules")
    assert code == 2 and "--from-edits needs --instance NAME" in err
