"""/health (open, liveness) and /metrics (Prometheus text; bearer token like the REST API)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from aiohttp import web
from loguru import logger

from handlers.app_context import context
from handlers.http_errors import json_response
from handlers.rest_models import Endpoint, HealthResponse
from service.adapters.broker.dead_letters import dead_queue_depth
from service.metrics import CONTENT_TYPE_LATEST

# The DLQ depth costs a broker round trip: refreshed at most this often, and bounded.
DLQ_REFRESH_SECONDS = 15.0
DLQ_TIMEOUT = 2.0


@dataclass
class _DlqProbe:
    checked_at: float = float("-inf")


DLQ_PROBE: web.AppKey[_DlqProbe] = web.AppKey("dlq_probe", _DlqProbe)


async def health(_: web.Request) -> web.Response:
    return json_response(HealthResponse(ok=True, service="crm-backend"))


async def metrics(request: web.Request) -> web.Response:
    await _refresh_dlq_depth(request)
    body = context(request).metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _refresh_dlq_depth(request: web.Request) -> None:
    probe = request.app[DLQ_PROBE]
    now = time.monotonic()
    if now - probe.checked_at < DLQ_REFRESH_SECONDS:
        return
    probe.checked_at = now
    ctx = context(request)
    try:
        async with asyncio.timeout(DLQ_TIMEOUT):
            depth = await dead_queue_depth(ctx.settings, DLQ_TIMEOUT)
    except Exception as exc:  # a down broker must not break the metrics scrape
        logger.debug("DLQ depth not refreshed: {}: {}", type(exc).__name__, exc)
        return
    ctx.metrics.dlq_depth.set(depth)


ROUTES = (
    (
        Endpoint(
            "GET",
            "/health",
            "Liveness (no token needed)",
            response=HealthResponse,
            errors=(),
            auth=False,
            tag="operations",
        ),
        health,
    ),
    (
        Endpoint(
            "GET",
            "/metrics",
            "Prometheus metrics",
            media_type="text/plain",
            errors=(401,),
            tag="operations",
            description="Prometheus text format: analyses by outcome and analyzer, analysis "
            "duration and lead score histograms, leads by interest level, webhook events by "
            "event and outcome, LLM tokens by kind, retries, dead letters and DLQ depth.",
        ),
        metrics,
    ),
)


def setup(app: web.Application) -> None:
    app[DLQ_PROBE] = _DlqProbe()
    for endpoint, handler in ROUTES:
        app.router.add_route(endpoint.method, endpoint.path, handler)
