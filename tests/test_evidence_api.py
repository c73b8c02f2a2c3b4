"""Evidence end to end on the real services: every labeled dialog loaded into an Evolution
database and analysed through `POST /dialogs/analyze`; the lead rows, the CSV and a
manual edit show it; with the OpenAI analyzer (fake server over HTTP) a number outside
the dialog sent is dropped and counted on /metrics."""

from __future__ import annotations

import contextlib
import csv
import io
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.adapters.analyzers.base import Analyzer
from service.adapters.analyzers.openai_analyzer import OpenAIAnalyzer, RetryPolicy
from service.adapters.analyzers.rules import RulesAnalyzer
from service.adapters.evolution import seed
from service.adapters.evolution.reader import EvolutionReader
from service.domain.dialog import Dialog
from service.usecases.csv_export import BOM, COLUMNS
from tests.dialog_samples import DEV_DIALOGS, HOLDOUT_DIALOGS, load_items, to_dialog
from tests.fakes.openai_server import FakeOpenAI, FakeReply
from tests.parts import parts_around
from tests.rest_support import API_TOKEN, INSTANCE, Api, open_store, rest_settings, serve

LABELED = [*load_items(DEV_DIALOGS), *load_items(HOLDOUT_DIALOGS)]


@contextlib.asynccontextmanager
async def app_with(
    results_dsn: str, evolution_dsn: str, account: uuid.UUID, analyzer: Analyzer, **settings: Any
) -> AsyncIterator[Api]:
    config = rest_settings(results_dsn, evolution_dsn, **settings)
    async with open_store("postgres", results_dsn) as store:
        await store.add_instance(INSTANCE, account)
        reader = await EvolutionReader.connect(evolution_dsn)
        try:
            async with (
                parts_around(config, store, reader=reader, analyzer=analyzer) as ctx,
                serve(ctx) as client,
            ):
                yield Api(client=client, ctx=ctx, results_dsn=results_dsn, account=account)
        finally:
            await reader.close()
            await analyzer.close()


async def analyze(api: Api) -> dict[str, Any]:
    body = {"instanceName": INSTANCE, "userAccountId": str(api.account)}
    status, answer = await api.call("POST", "/dialogs/analyze", json=body)
    assert status == 200, answer
    stats: dict[str, Any] = answer["stats"]
    return stats


async def rows_by_phone(api: Api) -> dict[str, dict[str, Any]]:
    status, listed = await api.leads(limit=1000)
    assert status == 200
    return {row["contact_phone"]: row for row in listed["results"]}


async def evolution_dialog(api: Api, phone: str) -> Dialog:
    reader = api.ctx.reader
    dialog = await reader.dialog(INSTANCE, phone, limit=api.ctx.settings.max_dialog_messages)
    assert dialog is not None
    return dialog


def assert_cites(dialog: Dialog, lines: list[dict[str, Any]]) -> int:
    """Every evidence of the stored lines names a message of Evolution's dialog and quotes
    its text; the number of citations."""
    texts = {m.id: m.text for m in dialog.messages}
    cited = 0
    for line in lines:
        for item in line["evidence"]:
            assert item["message_id"] in texts, (line["reason"], item)
            assert item["quote"] and item["quote"] in texts[item["message_id"]], item
            cited += 1
    return cited


async def export_rows(api: Api) -> dict[str, dict[str, str]]:
    response = await api.client.get(
        "/dialogs/export-csv",
        params={"userAccountId": str(api.account)},
        headers={"Authorization": f"Bearer {API_TOKEN}"},
    )
    assert response.status == 200, await response.text()
    text = (await response.read()).decode("utf-8")
    assert text.startswith(BOM)
    header, *rows = list(csv.reader(io.StringIO(text[len(BOM) :], newline="")))
    assert header == list(COLUMNS)
    return {row[0]: dict(zip(header, row, strict=True)) for row in rows}


async def test_every_labeled_dialog_gets_evidence_from_its_own_messages(
    results_dsn: str, evolution_dsn: str, account: uuid.UUID
) -> None:
    await seed.load_dialogs(evolution_dsn, INSTANCE, LABELED)
    async with app_with(results_dsn, evolution_dsn, account, RulesAnalyzer()) as api:
        stats = await analyze(api)
        assert stats["errors"] == 0 and stats["total"] == len(LABELED)
        rows = await rows_by_phone(api)
        assert len(rows) == len(LABELED)
        cited = 0
        for phone, row in rows.items():
            dialog = await evolution_dialog(api, phone)
            cited += assert_cites(dialog, row["score_breakdown"])
            if row["analyzer"] is None:
                continue  # under the threshold: stored without analysis, nothing cited
            for line in row["score_breakdown"]:
                if line["fact"] is not None and line["reason"] != "stage: new_lead":
                    assert line["evidence"], (phone, line)
                assert line["manual"] is False
        assert cited >= 2 * stats["analyzed"]

        # dev-01: the budget was named in its fifth message, the call agreed in its ninth.
        first = {line["fact"]: line for line in rows["77012345601"]["score_breakdown"]}
        assert first["ad_budget"]["evidence"] == [
            {
                "message_id": seed.dialog_key_id("dev-01", 4),
                "quote": "Готовы вкладывать около 500 тыс тенге в месяц",
            }
        ]
        assert first["funnel_stage"]["reason"] == "stage: consultation_booked"
        assert [e["message_id"] for e in first["funnel_stage"]["evidence"]] == [
            seed.dialog_key_id("dev-01", 8)
        ]

        # The CSV shows a short quote per line.
        exported = await export_rows(api)
        evidence = exported["77012345601"]["score_evidence"].split("\n")
        assert "ad budget stated: «Готовы вкладывать около 500 тыс тенге в месяц»" in evidence
        assert evidence[0].startswith("stage: consultation_booked: «")

        # A budget set by hand has no message behind it; the stage keeps its own.
        status, body = await api.call(
            "PATCH",
            f"/dialogs/leads/{rows['77012345601']['id']}",
            json={"userAccountId": str(account), "adBudget": "1 млн тенге"},
        )
        assert status == 200, body
        lines = {line["fact"]: line for line in body["lead"]["score_breakdown"]}
        assert lines["ad_budget"]["manual"] is True and lines["ad_budget"]["evidence"] == []
        assert lines["funnel_stage"]["evidence"] == first["funnel_stage"]["evidence"]
        exported = await export_rows(api)
        assert "ad budget stated: set by hand" in exported["77012345601"]["score_evidence"]


FAST = RetryPolicy(base=0.01, cap=0.02, max_wait=5.0)


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI(api_key="sk-test") as server:
        yield server


async def test_openai_evidence_is_checked_before_it_is_stored(
    results_dsn: str,
    evolution_dsn: str,
    account: uuid.UUID,
    dialogs: list[dict[str, Any]],
    fake: FakeOpenAI,
) -> None:
    await seed.load_dialogs(evolution_dsn, INSTANCE, dialogs[:1])  # dev-01, 10 messages
    facts, _ = RulesAnalyzer().explain(to_dialog(dialogs[0]))
    # The model cites messages #5 and #9 of the prompt, and numbers no line carries.
    fake.script(
        [
            FakeReply.facts(
                facts,
                evidence={
                    "funnel_stage": [9, 11, 0],
                    "niche": [1],
                    "is_owner": [-2],
                    "ad_budget": [5, 1000],
                },
            )
        ]
    )
    settings: dict[str, Any] = {
        "openai_api_key": "sk-test",
        "openai_base_url": fake.base_url,
        "openai_timeout": 5.0,
    }
    analyzer = OpenAIAnalyzer(
        rest_settings(results_dsn, evolution_dsn, **settings), RulesAnalyzer(), retry=FAST
    )
    async with app_with(results_dsn, evolution_dsn, account, analyzer, **settings) as api:
        stats = await analyze(api)
        assert stats["analyzed"] == 1 and stats["errors"] == 0
        row = (await rows_by_phone(api))["77012345601"]
        assert row["analyzer"] == "openai"
        dialog = await evolution_dialog(api, "77012345601")
        assert_cites(dialog, row["score_breakdown"])
        lines = {line["fact"]: line for line in row["score_breakdown"]}
        ids = [m.id for m in dialog.messages]
        assert [e["message_id"] for e in lines["funnel_stage"]["evidence"]] == [ids[8]]
        assert [e["message_id"] for e in lines["ad_budget"]["evidence"]] == [ids[4]]
        assert "500 тыс тенге" in lines["ad_budget"]["evidence"][0]["quote"]
        assert lines["is_owner"]["evidence"] == []

        response = await api.client.get(
            "/metrics", headers={"Authorization": f"Bearer {API_TOKEN}"}
        )
        families = {f.name: f for f in text_string_to_metric_families(await response.text())}
        dropped = {
            s.labels["analyzer"]: s.value
            for s in families["crm_evidence_dropped"].samples
            if s.name == "crm_evidence_dropped_total"
        }
        assert dropped == {"openai": 4}
