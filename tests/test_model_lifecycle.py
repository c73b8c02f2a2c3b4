"""The configured model's shutdown date, read through the real openai client over HTTP
from a server that announces one (`GET /v1/models/{id}`, the `shutdown_date` field of
openai-python's `types/model.py`): log line, /metrics gauge and /ready check."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import date

import pytest
from loguru import logger

from service.adapters.analyzers.model_lifecycle import ModelLifecycle
from service.adapters.stores.postgres import PostgresStore
from service.config import Settings
from service.metrics import Metrics
from tests.fakes.openai_server import FakeOpenAI
from tests.harness import delete_topology
from tests.parts import parts_around
from tests.rest_support import API_TOKEN, rest_settings, serve

MODEL = "gpt-6.1-terra"
TODAY = date(2026, 12, 1)


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(f"{m.record['level'].name} {m.record['message']}"))
    yield lines
    logger.remove(sink)


def lifecycle(fake: FakeOpenAI, metrics: Metrics, today: date = TODAY) -> ModelLifecycle:
    settings = Settings(openai_api_key="sk-test", openai_base_url=fake.base_url, openai_model=MODEL)
    return ModelLifecycle(settings, metrics, today=lambda: today)


async def ready_and_metrics(
    results_dsn: str,
    watch: ModelLifecycle,
    metrics: Metrics,
    live: tuple[str, str] | None = None,
) -> tuple[int, dict[str, object], str]:
    """/ready and /metrics of an app with this model watch. Without `live` (AMQP URL and
    prefix) the broker and the Evolution DB are down (no broker configured, the reader
    closed); with it every other check passes, so nothing but the model check speaks."""
    amqp = {} if live is None else {"amqp_url": live[0], "amqp_prefix": live[1]}
    settings = rest_settings(results_dsn, **amqp)
    store = await PostgresStore.open(results_dsn)
    try:
        async with (
            parts_around(settings, store, metrics=metrics, model_lifecycle=watch) as ctx,
            serve(ctx) as client,
        ):
            if live is None:
                await ctx.reader.close()
            headers = {"Authorization": f"Bearer {API_TOKEN}"}
            ready = await client.get("/ready", headers=headers)
            body = await ready.json()
            scrape = await (await client.get("/metrics", headers=headers)).text()
        return ready.status, body, scrape
    finally:
        await store.close()
        if live is not None:
            await delete_topology(settings)


async def test_shutdown_within_30_days_warns_in_log_metrics_and_ready(
    results_dsn: str, log_lines: list[str]
) -> None:
    metrics = Metrics()
    async with FakeOpenAI(shutdown_dates={MODEL: "2026-12-11"}) as fake:
        watch = lifecycle(fake, metrics)
        try:
            status = await watch.refresh()
            assert fake.model_lookups == [MODEL]
            assert status.shutdown_date == date(2026, 12, 11) and status.days_left == 10
            _, body, scrape = await ready_and_metrics(results_dsn, watch, metrics)
        finally:
            await watch.close()
    checks = body["checks"]
    assert isinstance(checks, dict)
    assert checks["llm_model"] == (
        "warning: model gpt-6.1-terra shuts down on 2026-12-11 (10 days left); "
        "set OPENAI_MODEL to its replacement"
    )
    # A warning does not fail readiness on its own (the broker is not configured here).
    assert body["error"] == "not ready: broker, evolution_db down"
    assert 'crm_llm_model_shutdown_days{model="gpt-6.1-terra"} 10.0' in scrape
    warnings = [line for line in log_lines if line.startswith("WARNING") and "shuts down" in line]
    assert warnings == [
        "WARNING OPENAI_MODEL gpt-6.1-terra shuts down on 2026-12-11 (10 days left): "
        "switch OPENAI_MODEL before then"
    ]


async def test_past_the_shutdown_date_the_check_fails_with_one_clear_line(
    results_dsn: str, log_lines: list[str]
) -> None:
    metrics = Metrics()
    async with FakeOpenAI(shutdown_dates={MODEL: "2026-12-11"}) as fake:
        watch = lifecycle(fake, metrics, today=date(2026, 12, 12))
        try:
            await watch.refresh()
            status, body, scrape = await ready_and_metrics(results_dsn, watch, metrics)
        finally:
            await watch.close()
    assert status == 503
    checks = body["checks"]
    assert isinstance(checks, dict)
    assert checks["llm_model"] == (
        "down: model gpt-6.1-terra was shut down on 2026-12-11; set OPENAI_MODEL to a current model"
    )
    assert "llm_model" in str(body["error"])
    assert 'crm_llm_model_shutdown_days{model="gpt-6.1-terra"} -1.0' in scrape
    errors = [line for line in log_lines if line.startswith("ERROR")]
    assert errors == [
        "ERROR OPENAI_MODEL gpt-6.1-terra was shut down on 2026-12-11: analyses fall back or "
        "fail until OPENAI_MODEL names a current model"
    ]


@pytest.mark.parametrize("endpoint", [True, False], ids=["no-field", "no-endpoint"])
async def test_servers_without_the_field_or_endpoint_are_fine(
    results_dsn: str, endpoint: bool, log_lines: list[str], amqp_url: str, amqp_prefix: str
) -> None:
    metrics = Metrics()
    async with FakeOpenAI(models_endpoint=endpoint) as fake:
        watch = lifecycle(fake, metrics)
        try:
            status = await watch.refresh()
            _, body, scrape = await ready_and_metrics(
                results_dsn, watch, metrics, live=(amqp_url, amqp_prefix)
            )
        finally:
            await watch.close()
    assert status.shutdown_date is None and status.days_left is None
    checks = body["checks"]
    assert isinstance(checks, dict)
    expected = "ok" if endpoint else "ok: the server has no model lookup"
    assert checks["llm_model"] == expected
    assert "crm_llm_model_shutdown_days{" not in scrape
    assert not [line for line in log_lines if line.startswith(("WARNING", "ERROR"))]


async def test_the_daily_check_runs_at_start_and_again(results_dsn: str) -> None:
    metrics = Metrics()
    async with FakeOpenAI(shutdown_dates={MODEL: "2027-06-01"}) as fake:
        settings = Settings(
            openai_api_key="sk-x", openai_base_url=fake.base_url, openai_model=MODEL
        )
        watch = ModelLifecycle(settings, metrics, today=lambda: TODAY, every=0.05)
        watch.start()
        try:
            for _ in range(100):
                if len(fake.model_lookups) >= 2:
                    break
                await asyncio.sleep(0.02)
        finally:
            await watch.close()
    assert len(fake.model_lookups) >= 2
    assert watch.status.check() == "ok: shutdown announced for 2027-06-01"
