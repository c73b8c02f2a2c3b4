"""POST /dialogs/analyze on a real Evolution DB with the rules analyzer; manual edits that
survive re-analysis; /ready; /metrics; /openapi.json and /docs."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from html.parser import HTMLParser
from typing import Any

import aio_pika
import jsonschema
import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from handlers.dialogs import ROUTES
from handlers.rest_models import AnalysisListParams, LeadPatchBody
from service.adapters.broker.topology import Topology
from service.adapters.evolution import seed
from service.adapters.evolution.reader import EvolutionReader
from service.domain.scoring import ScoreInputs, score
from tests.harness import delete_topology
from tests.parts import parts_around
from tests.rest_support import (
    API_TOKEN,
    INSTANCE,
    Api,
    open_store,
    pg_api_fixture,  # noqa: F401 - fixture
    rest_settings,
    serve,
)

DIALOGS = 12  # dev-01 … dev-12: eleven over the threshold, dev-12 (2 incoming) under it


@contextlib.asynccontextmanager
async def full_app(
    results_dsn: str, evolution_dsn: str, account: uuid.UUID, **settings: Any
) -> AsyncIterator[Api]:
    """The app with store, Evolution reader, rules analyzer and pipeline (the broker only
    when `amqp_url` is given)."""
    config = rest_settings(results_dsn, evolution_dsn, **settings)
    async with open_store("postgres", results_dsn) as store:
        await store.add_instance(INSTANCE, account)
        reader = await EvolutionReader.connect(evolution_dsn)
        try:
            async with (
                parts_around(config, store, reader=reader) as ctx,
                serve(ctx) as client,
            ):
                yield Api(client=client, ctx=ctx, results_dsn=results_dsn, account=account)
        finally:
            await reader.close()


@pytest.fixture
async def full_api(
    results_dsn: str, evolution_dsn: str, account: uuid.UUID, dialogs: list[dict[str, Any]]
) -> AsyncIterator[Api]:
    await seed.load_dialogs(evolution_dsn, INSTANCE, dialogs[:DIALOGS])
    async with full_app(results_dsn, evolution_dsn, account) as api:
        yield api


def analyze_body(api: Api, **extra: Any) -> dict[str, Any]:
    return {"instanceName": INSTANCE, "userAccountId": str(api.account), **extra}


async def test_analyze_runs_the_pipeline_over_the_instance(full_api: Api) -> None:
    status, body = await full_api.call("POST", "/dialogs/analyze", json=analyze_body(full_api))
    assert status == 200, body
    assert body["success"] is True
    stats = body["stats"]
    assert set(stats) == {"total", "analyzed", "new_leads", "hot", "warm", "cold", "errors"}
    assert stats["total"] == DIALOGS
    assert stats["new_leads"] == 1
    assert stats["analyzed"] == DIALOGS - 1
    assert stats["hot"] + stats["warm"] + stats["cold"] == stats["analyzed"]
    assert stats["errors"] == 0

    status, listed = await full_api.leads(limit=1000)
    assert listed["count"] == DIALOGS
    by_phone = {r["contact_phone"]: r for r in listed["results"]}
    assert by_phone["77012345612"]["funnel_stage"] == "new_lead"  # dev-12, under threshold
    assert by_phone["77012345601"]["analyzer"] == "rules"

    # Nothing changed since: the second run analyses nothing again.
    status, body = await full_api.call("POST", "/dialogs/analyze", json=analyze_body(full_api))
    assert body["stats"]["analyzed"] == 0 and body["stats"]["total"] == DIALOGS


async def test_analyze_limits(full_api: Api) -> None:
    status, body = await full_api.call(
        "POST", "/dialogs/analyze", json=analyze_body(full_api, maxDialogs=3, minIncoming=4)
    )
    assert status == 200
    assert body["stats"]["analyzed"] == 3
    # Contacts under minIncoming=4 are stored as new leads, not analysed.
    assert body["stats"]["new_leads"] >= 2
    status, body = await full_api.call(
        "POST", "/dialogs/analyze", json=analyze_body(full_api, maxContacts=2)
    )
    assert body["stats"]["total"] == 2


async def test_analyze_needs_the_accounts_instance(full_api: Api) -> None:
    status, body = await full_api.call(
        "POST",
        "/dialogs/analyze",
        json={"instanceName": INSTANCE, "userAccountId": str(uuid.uuid4())},
    )
    assert status == 404 and body["success"] is False
    status, body = await full_api.call(
        "POST", "/dialogs/analyze", json=analyze_body(full_api, instanceName="unmapped")
    )
    assert status == 404
    status, listed = await full_api.leads()
    assert listed["count"] == 0  # nothing analysed


async def test_a_patch_survives_later_automatic_analysis(
    full_api: Api, evolution_dsn: str, dialogs: list[dict[str, Any]]
) -> None:
    await full_api.call("POST", "/dialogs/analyze", json=analyze_body(full_api))
    status, listed = await full_api.leads(limit=1000)
    before = next(r for r in listed["results"] if r["contact_phone"] == "77012345601")

    status, body = await full_api.call(
        "PATCH",
        f"/dialogs/leads/{before['id']}",
        json={
            "userAccountId": str(full_api.account),
            "contactName": "Айгерим (VIP)",
            "funnelStage": "deal_closed",
            "businessType": "сеть клиник",
            "notes": "договор подписан",
        },
    )
    assert status == 200, body
    patched = body["lead"]
    assert set(patched["manual_fields"]) == {
        "contact_name",
        "funnel_stage",
        "business_type",
        "notes",
    }

    # The contact writes again: the dialog changed, so the pipeline analyses it again.
    extra = {
        "id": "dev-01-later",
        "contact": dialogs[0]["contact"],
        "messages": [
            {"from_me": False, "text": "Передумала, не актуально", "ts": "2026-09-03T09:00:00Z"}
        ],
    }
    await seed.load_dialogs(evolution_dsn, INSTANCE, [extra])
    status, body = await full_api.call("POST", "/dialogs/analyze", json=analyze_body(full_api))
    assert body["stats"]["analyzed"] == 1

    status, listed = await full_api.leads(limit=1000)
    after = next(r for r in listed["results"] if r["contact_phone"] == "77012345601")
    assert after["incoming_count"] == before["incoming_count"] + 1  # the analysis ran
    assert after["analyzed_at"] > before["analyzed_at"]
    assert after["contact_name"] == "Айгерим (VIP)"  # … and kept every manual value
    assert after["funnel_stage"] == "deal_closed"
    assert after["business_type"] == "сеть клиник"
    assert after["notes"] == "договор подписан"
    expected = score(
        ScoreInputs(
            funnel_stage="deal_closed",
            niche=after["niche"],
            is_owner=after["is_owner"],
            budget_stated=bool(after["budget_stated"]),
        )
    )
    assert after["score"] == expected.total  # scored from the merged facts
    assert after["interest_level"] == expected.interest_level


# -- /ready ---------------------------------------------------------------------------------
async def test_ready_checks_broker_and_both_databases(
    results_dsn: str,
    evolution_dsn: str,
    account: uuid.UUID,
    amqp_url: str,
    amqp_prefix: str,
) -> None:
    async with full_app(results_dsn, evolution_dsn, account) as api:  # no broker
        status, body = await api.call("GET", "/ready")
        assert status == 503
        assert body["ok"] is False
        assert body["checks"]["broker"].startswith("down")
        assert body["checks"]["results_db"] == "ok"
        assert body["checks"]["evolution_db"] == "ok"
        assert body["error"] == "not ready: broker down"

    settings = rest_settings(results_dsn, amqp_url=amqp_url, amqp_prefix=amqp_prefix)
    live = {"amqp_url": amqp_url, "amqp_prefix": amqp_prefix}
    async with full_app(results_dsn, evolution_dsn, account, **live) as api:
        try:
            status, body = await api.call("GET", "/ready")
            assert status == 200, body
            assert body == {
                "ok": True,
                "checks": {"broker": "ok", "results_db": "ok", "evolution_db": "ok"},
                "error": None,
            }
            await api.ctx.reader.close()  # the Evolution DB goes away
            status, body = await api.call("GET", "/ready")
            assert status == 503
            assert body["checks"]["evolution_db"].startswith("down")
            assert body["checks"]["broker"] == "ok"
            assert body["error"] == "not ready: evolution_db down"
        finally:
            await delete_topology(settings)


async def test_ready_with_an_unreachable_broker(pg_api: Api) -> None:
    # The app's publisher points at a port nothing listens on; the Evolution DB is gone.
    await pg_api.ctx.reader.close()
    status, body = await pg_api.call("GET", "/ready")
    assert status == 503
    assert body["checks"]["broker"].startswith("down")
    assert body["checks"]["results_db"] == "ok"
    assert "broker" in body["error"] and "evolution_db" in body["error"]


# -- /metrics -------------------------------------------------------------------------------
async def test_metrics_after_an_analysis(full_api: Api) -> None:
    await full_api.call("POST", "/dialogs/analyze", json=analyze_body(full_api))
    response = await full_api.client.get(
        "/metrics", headers={"Authorization": "Bearer " + API_TOKEN}
    )
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(await response.text())}
    analyses = {
        (s.labels["outcome"], s.labels["analyzer"]): s.value
        for s in families["crm_analyses"].samples
        if s.name == "crm_analyses_total"
    }
    assert analyses[("analyzed", "rules")] == DIALOGS - 1
    assert analyses[("new_lead", "none")] == 1
    scored = sum(s.value for s in families["crm_leads_scored"].samples if s.name.endswith("_total"))
    assert scored == DIALOGS - 1
    assert "crm_analysis_duration_seconds" in families
    assert "crm_dlq_depth" in families


# -- /openapi.json and /docs ------------------------------------------------------------------
async def test_openapi_document_matches_the_routes(pg_api: Api) -> None:
    status, doc = await pg_api.call("GET", "/openapi.json")
    assert status == 200
    assert doc["openapi"] == "3.1.0"
    served = {
        (route.method.lower(), route.resource.canonical)
        for route in pg_api.client.app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }
    documented = {(m, p) for p, ops in doc["paths"].items() for m in ops}
    assert served == documented

    params = doc["paths"]["/dialogs/analysis"]["get"]["parameters"]
    assert [p["name"] for p in params] == [
        f.encode_name for f in msgspec.structs.fields(AnalysisListParams)
    ]
    min_score = next(p for p in params if p["name"] == "minScore")
    assert min_score["schema"] == {
        "type": "integer",
        "minimum": 0,
        "maximum": 100,
        "description": "Lowest score included",
    }
    assert next(p for p in params if p["name"] == "userAccountId")["required"] is True

    patch_schema = doc["components"]["schemas"]["LeadPatchBody"]
    assert patch_schema["required"] == ["userAccountId"]
    assert patch_schema["additionalProperties"] is False
    assert set(patch_schema["properties"]) == {
        f.encode_name for f in msgspec.structs.fields(LeadPatchBody)
    }
    assert doc["paths"]["/health"]["get"]["security"] == []
    assert "security" not in doc["paths"]["/dialogs/stats"]["get"]  # the global bearer
    for endpoint, _ in ROUTES:
        operation = doc["paths"][endpoint.path][endpoint.method.lower()]
        assert str(endpoint.status) in operation["responses"]
    for schema in doc["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


async def test_docs_page_lists_every_endpoint_offline(pg_api: Api) -> None:
    response = await pg_api.client.get("/docs", headers={"Authorization": "Bearer " + API_TOKEN})
    assert response.status == 200
    assert response.content_type == "text/html"
    page = await response.text()
    parser = _Collect()
    parser.feed(page)
    text = " ".join(parser.text)
    status, doc = await pg_api.call("GET", "/openapi.json")
    assert status == 200
    for path, operations in doc["paths"].items():
        for method in operations:
            assert f"{method.upper()}" in text and path in text
    for name in ("minScore", "qualificationComplete", "LeadCreateBody", "ErrorResponse"):
        assert name in text
    # Nothing fetched from elsewhere: no scripts, no external stylesheets or images.
    assert "script" not in parser.tags and "link" not in parser.tags and "img" not in parser.tags


async def test_metrics_refresh_the_dead_letter_queue_depth(
    results_dsn: str, account: uuid.UUID, amqp_url: str, amqp_prefix: str
) -> None:
    settings = rest_settings(results_dsn, amqp_url=amqp_url, amqp_prefix=amqp_prefix)
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        topology = Topology(settings)
        await topology.declare(channel)
        dlx = await channel.get_exchange(topology.dlx_exchange)
        for n in range(3):
            await dlx.publish(aio_pika.Message(body=f"dead {n}".encode()), routing_key="")
        async with (
            open_store("postgres", results_dsn) as store,
            parts_around(settings, store) as ctx,
            serve(ctx) as client,
        ):
            response = await client.get(
                "/metrics", headers={"Authorization": "Bearer " + API_TOKEN}
            )
            text = await response.text()
        depth = next(
            s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "crm_dlq_depth"
        )
        assert depth == 3
    finally:
        await connection.close()
        await delete_topology(settings)
