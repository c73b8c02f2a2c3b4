"""/health (open, liveness), /ready (broker and both databases), /metrics (Prometheus)."""

from __future__ import annotations

from aiohttp import web

from handlers.app import context
from service.metrics import CONTENT_TYPE_LATEST


async def health(_: web.Request) -> web.Response:
    return web.json_response({"ok": True, "service": "crm-backend"})


async def metrics(request: web.Request) -> web.Response:
    body = context(request).metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def setup(app: web.Application) -> None:
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
