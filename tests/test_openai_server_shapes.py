"""How the analyzer copes with what OpenAI-compatible servers refuse or ignore, over real
HTTP through the openai client: parameters dropped once and remembered, a response
format the server lacks, a chat template without a system role, bounded answers and
analyses, and usage counted on every call."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from service.adapters.analyzers.base import AnalyzerUnavailableError
from service.adapters.analyzers.openai_analyzer import OpenAIAnalyzer, RetryPolicy
from service.adapters.analyzers.prompt import SCHEMA_INTRO, SYSTEM_PROMPT
from service.adapters.analyzers.rules import RulesAnalyzer
from service.adapters.analyzers.schema import lead_facts_schema
from service.config import Settings
from tests.fakes.openai_server import FakeOpenAI, FakeReply
from tests.test_openai_analyzer import CLINIC, SCHOOL

FAST = RetryPolicy(base=0.01, cap=0.02, max_wait=5.0)
Make = Callable[..., OpenAIAnalyzer]


@pytest.fixture
async def analyzers() -> AsyncIterator[Callable[[FakeOpenAI], Make]]:
    made: list[OpenAIAnalyzer] = []

    def against(fake: FakeOpenAI) -> Make:
        def make(**overrides: Any) -> OpenAIAnalyzer:
            values: dict[str, Any] = {
                "openai_api_key": "sk-test",
                "openai_base_url": fake.base_url,
                "openai_max_retries": 2,
                "openai_timeout": 5.0,
                **overrides,
            }
            analyzer = OpenAIAnalyzer(Settings(**values), fallback=RulesAnalyzer(), retry=FAST)
            made.append(analyzer)
            return analyzer

        return make

    yield against
    for analyzer in made:
        await analyzer.close()


async def test_default_request_bounds_the_answer_and_asks_for_low_effort(
    analyzers: Callable[[FakeOpenAI], Make],
) -> None:
    async with FakeOpenAI() as fake:
        await analyzers(fake)().analyze(CLINIC)
    body = fake.requests[0].body
    assert body["model"] == "gpt-6.1-terra"
    assert body["reasoning_effort"] == "low"
    # OpenAI's reasoning models refuse max_tokens: only max_completion_tokens goes.
    assert body["max_completion_tokens"] == 4000 and "max_tokens" not in body
    assert body["prompt_cache_key"].startswith("crm-")


async def test_other_servers_get_both_token_limits(
    analyzers: Callable[[FakeOpenAI], Make],
) -> None:
    # llama-cpp-python honours only max_tokens; llama.cpp's server reads both.
    async with FakeOpenAI() as fake:
        await analyzers(fake)(
            openai_model="gemma-3-270m", openai_max_completion_tokens=300
        ).analyze(CLINIC)
    body = fake.requests[0].body
    assert body["max_tokens"] == 300 and body["max_completion_tokens"] == 300


async def test_a_refused_parameter_is_dropped_once_and_remembered(
    analyzers: Callable[[FakeOpenAI], Make],
) -> None:
    async with FakeOpenAI(reject_params={"reasoning_effort"}) as fake:
        analyzer = analyzers(fake)()
        first = await analyzer.analyze(CLINIC)
        second = await analyzer.analyze(SCHOOL)
    assert first.analyzer == second.analyzer == "openai"
    # One refusal, answered at once (no backoff, not an outage), then never sent again.
    assert fake.calls == 3
    assert "reasoning_effort" in fake.requests[0].body
    assert all("reasoning_effort" not in r.body for r in fake.requests[1:])
    assert first.usage is not None and first.usage.calls == 2
    assert first.usage.calls_without_usage == 1


async def test_max_tokens_refused_switches_to_the_other_name(
    analyzers: Callable[[FakeOpenAI], Make],
) -> None:
    async with FakeOpenAI() as fake:  # a gpt-5 name: the fake refuses max_tokens like OpenAI
        analyzer = analyzers(fake)(openai_model="gpt-5.9-local-alias")
        await analyzer.analyze(CLINIC)
        await analyzer.analyze(SCHOOL)
    assert all("max_tokens" not in r.body for r in fake.requests)
    assert fake.calls == 2


async def test_two_refused_limits_do_not_loop(analyzers: Callable[[FakeOpenAI], Make]) -> None:
    async with FakeOpenAI(reject_params={"max_tokens", "max_completion_tokens"}) as fake:
        result = await analyzers(fake)(openai_model="local").analyze(CLINIC)
    assert result.analyzer == "openai"
    assert fake.calls == 3  # both names refused once each, then neither is sent
    last = fake.requests[-1].body
    assert "max_tokens" not in last and "max_completion_tokens" not in last


async def test_missing_strict_json_schema_is_detected_once_not_retried_as_an_outage(
    analyzers: Callable[[FakeOpenAI], Make],
) -> None:
    # llama-cpp-python's server: response_format type text or json_object (with a schema).
    async with FakeOpenAI(response_formats={"text", "json_object"}) as fake:
        analyzer = analyzers(fake)(openai_model="local", openai_max_retries=5)
        started = time.monotonic()
        first = await analyzer.analyze(CLINIC)
        second = await analyzer.analyze(SCHOOL)
        elapsed = time.monotonic() - started
    assert first.analyzer == second.analyzer == "openai"
    assert fake.calls == 3  # one 500, then json_object for this and every later call
    assert fake.requests[0].body["response_format"]["type"] == "json_schema"
    for request in fake.requests[1:]:
        assert request.body["response_format"] == {
            "type": "json_object",
            "schema": lead_facts_schema(),
        }
        # Without a strict schema the model reads the schema in the instructions.
        assert SCHEMA_INTRO in request.system_prompt
        assert request.system_prompt.startswith(SYSTEM_PROMPT)
    assert elapsed < 3.0


async def test_a_server_with_no_json_format_at_all_gets_the_schema_in_the_prompt(
    analyzers: Callable[[FakeOpenAI], Make],
) -> None:
    async with FakeOpenAI(response_formats={"text"}) as fake:
        analyzer = analyzers(fake)(openai_model="local")
        result = await analyzer.analyze(CLINIC)
    assert result.analyzer == "openai"
    assert fake.calls == 3
    assert "response_format" not in fake.requests[-1].body
    assert SCHEMA_INTRO in fake.requests[-1].system_prompt


@pytest.mark.parametrize("how", ["configured", "detected"])
async def test_instructions_reach_a_model_whose_template_drops_system_messages(
    analyzers: Callable[[FakeOpenAI], Make], how: str
) -> None:
    # llama.cpp's /props tells (chat_template_caps.supports_system_role); for
    # llama-cpp-python (no /props) it is configured.
    props = {"chat_template_caps": {"supports_system_role": False}} if how == "detected" else None
    async with FakeOpenAI(drops_system=True, props=props) as fake:
        overrides = {"openai_system_message": "user"} if how == "configured" else {}
        analyzer = analyzers(fake)(openai_model="local", **overrides)
        await analyzer.analyze(CLINIC)
        await analyzer.analyze(SCHOOL)
    for request in fake.requests:
        assert [m["role"] for m in request.messages] == ["user"]
        # The instructions come first (a stable prefix) and the model sees them.
        assert request.seen_prompt.startswith(SYSTEM_PROMPT)
        assert "<dialog>" in request.seen_prompt


async def test_system_role_kept_where_the_server_supports_it(
    analyzers: Callable[[FakeOpenAI], Make],
) -> None:
    props = {"chat_template_caps": {"supports_system_role": True}}
    async with FakeOpenAI(props=props) as fake:
        await analyzers(fake)(openai_model="local").analyze(CLINIC)
    assert [m["role"] for m in fake.requests[0].messages] == ["system", "user"]


async def test_the_wall_time_of_one_analysis_is_bounded(
    analyzers: Callable[[FakeOpenAI], Make],
) -> None:
    async with FakeOpenAI(latency=3.0) as fake:
        analyzer = analyzers(fake)(
            openai_timeout=1.0, openai_max_retries=10, openai_analysis_timeout=2.5
        )
        started = time.monotonic()
        with pytest.raises(AnalyzerUnavailableError, match="OPENAI_ANALYSIS_TIMEOUT") as info:
            await analyzer.analyze(CLINIC)
        elapsed = time.monotonic() - started
    # Ten retries of a 1 s timeout would take over 10 s; the analysis stops at 2.5 s.
    assert 2.4 < elapsed < 4.0
    usage = info.value.usage
    assert usage is not None and usage.calls >= 2 and usage.calls == usage.calls_without_usage


async def test_a_failed_analysis_reports_the_usage_of_every_call(
    analyzers: Callable[[FakeOpenAI], Make],
) -> None:
    async with FakeOpenAI() as fake:
        fake.script(
            [FakeReply.answer("{", finish_reason="length"), FakeReply.error(500)]
            + [FakeReply.error(500)] * 3
        )
        analyzer = analyzers(fake)(openai_max_retries=2)
        with pytest.raises(AnalyzerUnavailableError) as info:
            await analyzer.analyze(CLINIC)
    usage = info.value.usage
    assert usage is not None
    # The cut answer's tokens count; the three 500s count as calls without usage.
    assert usage.calls == 4 and usage.calls_without_usage == 3
    assert usage.prompt_tokens > 0 and usage.completion_tokens > 0


async def test_prompt_cache_key_is_per_contact(analyzers: Callable[[FakeOpenAI], Make]) -> None:
    async with FakeOpenAI() as fake:
        analyzer = analyzers(fake)()
        for dialog in (CLINIC, SCHOOL, CLINIC):
            await analyzer.analyze(dialog)
    keys = [r.body["prompt_cache_key"] for r in fake.requests]
    assert keys[0] == keys[2] != keys[1]
    assert CLINIC.contact.phone not in keys[0]
