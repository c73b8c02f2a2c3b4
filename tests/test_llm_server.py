"""The analyzer, the pipeline and `backfill` against a real model server nobody here
wrote: llama.cpp's own server (tools/server, through the prebuilt `xllamacpp` wheel)
with Gemma 3 270M on the CPU, installed by `scripts/ensure_llm_server.sh`.

This proves the protocol, never quality (a 270M model gives poor facts): answers are
bounded, unusable ones fall back to the rules facts, the stored score is always the
rule table's on the stored facts, and every call's usage is counted. A handful of
dialogs keeps it to about a minute on two cores.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest

from service.adapters.analyzers.openai_analyzer import OpenAIAnalyzer
from service.adapters.analyzers.rules import RulesAnalyzer
from service.adapters.evolution.seed import load_dialogs
from service.config import Settings
from service.domain.evidence import EVIDENCE_FACTS
from service.domain.facts import LeadFacts
from service.domain.scoring import ScoreInputs, score
from tests.harness import free_port_in
from tests.test_backfill import _env, backfill
from tests.test_openai_analyzer import demo_dialog

ROOT = Path(__file__).parent.parent
LLM_HOME = Path(
    os.environ.get("CRM_LLM_HOME")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "crm-backend" / "llm"
)
PORTS = range(19600, 19700)
MAX_TOKENS = 256  # per answer: ~10 s of generation here
ANALYSIS_TIMEOUT = 150.0
# A few short dialogs of the development set: the per-dialog cost is prompt processing
# (~2,500 tokens of instructions and schema) plus at most MAX_TOKENS of answer, twice.
DIALOGS = 2
# Through backfill the facts' quality is not the point: short answers (cut, so the rules
# facts are stored) keep it quick; the score check holds for either.
BACKFILL_MAX_TOKENS = 64
# Two cores shared with other work can make one answer take minutes.
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
async def llama_url() -> AsyncIterator[str]:
    python = LLM_HOME / "venv" / "bin" / "python"
    model = LLM_HOME / "gemma-3-270m-q4_k_m.gguf"
    assert python.exists() and model.exists(), (
        f"the local model server is not installed in {LLM_HOME}: run scripts/ensure_llm_server.sh"
    )
    port = free_port_in(PORTS)
    proc = await asyncio.create_subprocess_exec(
        str(python),
        str(ROOT / "scripts" / "llama_server.py"),
        "--model",
        str(model),
        "--port",
        str(port),
        "--ctx",
        "6144",
        "--threads",
        "2",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=120)
        assert line.startswith(b"listening"), line
        print(f"\nllama.cpp server: {line.decode().strip()}", file=sys.stderr)
        url = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient() as client:
            for _ in range(100):
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"{url}/health")).status_code == 200:
                        break
                await asyncio.sleep(0.2)
        yield f"{url}/v1"
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), timeout=20)
        except TimeoutError:
            proc.kill()
            await proc.wait()


def llm_settings(base_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "openai_api_key": "local",
        "openai_base_url": base_url,
        "openai_model": "local",
        "openai_max_completion_tokens": MAX_TOKENS,
        "openai_timeout": 120.0,
        "openai_analysis_timeout": ANALYSIS_TIMEOUT,
        "openai_max_retries": 1,
        **overrides,
    }
    return Settings(**values)


def short_dialogs(dialogs: list[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    over = [d for d in dialogs if sum(not m["from_me"] for m in d["messages"]) >= 3]
    return sorted(over, key=lambda d: sum(len(m["text"]) for m in d["messages"]))[:count]


async def test_analyzer_answers_are_bounded_and_fall_back_as_designed(
    llama_url: str, dialogs: list[dict[str, Any]]
) -> None:
    analyzer = OpenAIAnalyzer(llm_settings(llama_url), fallback=RulesAnalyzer())
    rules = RulesAnalyzer()
    try:
        for raw in short_dialogs(dialogs, DIALOGS):
            dialog = demo_dialog(raw)
            started = time.monotonic()
            result = await analyzer.analyze(dialog)
            elapsed = time.monotonic() - started
            print(
                f"dialog {raw['id']}: {result.analyzer} in {elapsed:.1f} s, {result.usage}",
                file=sys.stderr,
            )
            assert elapsed < ANALYSIS_TIMEOUT
            usage = result.usage
            assert usage is not None and 1 <= usage.calls <= 2
            # Every call's usage counts; no answer ran past the limit.
            assert usage.calls_without_usage == 0
            assert usage.prompt_tokens > 1000 * usage.calls
            assert 0 < usage.completion_tokens <= MAX_TOKENS * usage.calls
            assert isinstance(result.facts, LeadFacts)
            if result.analyzer == "rules-fallback":
                assert usage.calls == 2 and result.facts == rules.extract(dialog)
            else:
                assert result.analyzer == "openai"
            # Whatever numbers the model gave, only messages of this dialog are cited.
            texts = {m.id: m.text for m in dialog.messages}
            for fact in EVIDENCE_FACTS:
                for item in result.evidence.of(fact):
                    assert item.quote and item.quote in texts[item.message_id]
    finally:
        await analyzer.close()
    # llama.cpp's server takes the strict json_schema format (server-common.cpp:
    # oaicompat_chat_params_parse reads response_format.json_schema.schema), so the
    # shape never had to narrow.
    assert analyzer.shape.format == "json_schema" and not analyzer.shape.refused


async def test_the_token_limit_is_honoured_and_a_cut_answer_falls_back(
    llama_url: str, dialogs: list[dict[str, Any]]
) -> None:
    analyzer = OpenAIAnalyzer(
        llm_settings(llama_url, openai_max_completion_tokens=16), fallback=RulesAnalyzer()
    )
    dialog = demo_dialog(short_dialogs(dialogs, 1)[0])
    try:
        result = await analyzer.analyze(dialog)
    finally:
        await analyzer.close()
    assert result.analyzer == "rules-fallback"
    assert result.facts == RulesAnalyzer().extract(dialog)
    assert result.usage is not None and result.usage.calls == 2
    assert result.usage.completion_tokens == 2 * 16


async def test_json_object_with_a_schema_works_on_the_real_server(
    llama_url: str, dialogs: list[dict[str, Any]]
) -> None:
    # The format the analyzer narrows to when strict json_schema is refused.
    analyzer = OpenAIAnalyzer(llm_settings(llama_url), fallback=RulesAnalyzer())
    analyzer.shape.format = "json_object"
    try:
        result = await analyzer.analyze(demo_dialog(short_dialogs(dialogs, 1)[0]))
    finally:
        await analyzer.close()
    assert result.usage is not None and result.usage.calls_without_usage == 0
    assert result.analyzer in ("openai", "rules-fallback")
    assert analyzer.shape.format == "json_object" and not analyzer.shape.refused


async def test_backfill_against_the_real_server_stores_rule_table_scores(
    llama_url: str, evolution_dsn: str, results_dsn: str, dialogs: list[dict[str, Any]]
) -> None:
    chosen = short_dialogs(dialogs, DIALOGS)
    await load_dialogs(evolution_dsn, "llm", chosen)
    env = _env(evolution_dsn, results_dsn, llama_url)
    env.update(
        {
            "OPENAI_MODEL": "local",
            "OPENAI_MAX_COMPLETION_TOKENS": str(BACKFILL_MAX_TOKENS),
            "OPENAI_TIMEOUT": "120",
            "OPENAI_ANALYSIS_TIMEOUT": str(ANALYSIS_TIMEOUT),
            "OPENAI_MAX_RETRIES": "1",
        }
    )
    account = uuid.uuid4()
    stats, _ = await backfill(
        env, "--instance", "llm", "--account", str(account), "--concurrency", "1", timeout=600
    )
    assert stats["errors"] == 0 and stats["analyzed"] == len(chosen)

    conn = await asyncpg.connect(results_dsn)
    try:
        rows = await conn.fetch("SELECT * FROM dialog_analysis WHERE instance_name = 'llm'")
    finally:
        await conn.close()
    assert len(rows) == len(chosen)
    for row in rows:
        assert row["analyzer"] in ("openai", "rules-fallback")
        stored = ScoreInputs(
            funnel_stage=row["funnel_stage"],
            niche=row["niche"],
            is_owner=row["is_owner"],
            budget_stated=row["budget_stated"],
        )
        # The stored score is always the rule table's on the stored facts.
        assert row["score"] == score(stored).total
        assert row["interest_level"] == score(stored).interest_level
        # Evidence names messages of the analysed dialog, stored with the lead.
        messages = row["messages"]
        messages = msgspec.json.decode(messages) if isinstance(messages, str) else messages
        texts = {m["id"]: m["text"] for m in messages}
        breakdown = row["score_breakdown"]
        breakdown = msgspec.json.decode(breakdown) if isinstance(breakdown, str) else breakdown
        for line in breakdown:
            for item in line["evidence"]:
                assert item["quote"] in texts[item["message_id"]]
        usage = row["llm_usage"]
        usage = msgspec.json.decode(usage) if isinstance(usage, str) else usage
        assert usage["calls"] >= 1 and usage["completion_tokens"] > 0
        assert usage["model"]
