"""GET /ready: can this process do its work? Broker, results DB, Evolution DB, and the
configured model's announced shutdown (`llm_model`, when the OpenAI analyzer is on).

200 when every check passes, else 503 naming what is down. The checks run concurrently,
each bounded by a timeout, so a hung dependency cannot hang the probe.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import web
from loguru import logger

from handlers.app_context import context
from handlers.http_errors import json_response
from handlers.rest_models import Endpoint, ReadyResponse
from service.adapters.stores.base import StoreAccessError
from service.bootstrap.context import AppContext

CHECK_TIMEOUT = 3.0


async def _broker(ctx: AppContext) -> str:
    return "ok" if await ctx.publisher.ping() else "down: not connected"


async def _results_db(ctx: AppContext) -> str:
    await ctx.store.ping()
    return "ok"


async def _evolution_db(ctx: AppContext) -> str:
    await ctx.reader.ping()  # raises EvolutionUnavailableError when down
    return "ok"


async def _llm_model(ctx: AppContext) -> str:
    # Cached status (refreshed daily): a probe must not call the model server.
    assert ctx.model_lifecycle is not None
    return ctx.model_lifecycle.status.check()


CHECKS: dict[str, Callable[[AppContext], Awaitable[str]]] = {
    "broker": _broker,
    "results_db": _results_db,
    "evolution_db": _evolution_db,
}


async def _run(name: str, check: Callable[[AppContext], Awaitable[str]], ctx: AppContext) -> str:
    try:
        async with asyncio.timeout(CHECK_TIMEOUT):
            return await check(ctx)
    except TimeoutError:
        result = f"down: no answer within {CHECK_TIMEOUT:.0f}s"
    except StoreAccessError as exc:
        result = f"down: {exc}"  # what to fix (the key, the grants); names no host
    except Exception as exc:
        # Details (which may name hosts) go to the log; the probe says what kind of failure.
        logger.warning("readiness check {} failed: {}: {}", name, type(exc).__name__, exc)
        result = f"down: {type(exc).__name__}"
    return result


async def ready(request: web.Request) -> web.Response:
    ctx = context(request)
    active = dict(CHECKS)
    if ctx.model_lifecycle is not None:
        active["llm_model"] = _llm_model
    results = await asyncio.gather(*(_run(name, check, ctx) for name, check in active.items()))
    checks = dict(zip(active, results, strict=True))
    # "ok: …" and "warning: …" (e.g. a model shutdown weeks ahead) pass.
    down = [name for name, result in checks.items() if not result.startswith(("ok", "warning"))]
    if down:
        error = "not ready: " + ", ".join(down) + " down"
        return json_response(ReadyResponse(ok=False, checks=checks, error=error), status=503)
    return json_response(ReadyResponse(ok=True, checks=checks))


ROUTES = (
    (
        Endpoint(
            "GET",
            "/ready",
            "Readiness: broker and both databases",
            response=ReadyResponse,
            errors=(401, 503),
            tag="operations",
            description="503 with `checks` naming each dependency that is down.",
        ),
        ready,
    ),
)


def setup(app: web.Application) -> None:
    for endpoint, handler in ROUTES:
        app.router.add_route(endpoint.method, endpoint.path, handler)
