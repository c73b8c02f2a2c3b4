"""POST /webhooks/evolution[/{event}]: authenticate, decode, publish (confirmed), answer.

Status codes follow Evolution's retry rules: 200 only after RabbitMQ confirmed the events;
400/401/413 for what a retry cannot fix; 503 (retried by Evolution) when the broker is
unavailable. The request/response middleware here stamps a request id on every log line
and logs requests at DEBUG only: aiohttp's own access log through loguru's JSON sink costs
most of the server's throughput.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl

import msgspec
from aiohttp import web
from loguru import logger

from handlers.app import context
from service.broker.publisher import BrokerUnavailableError
from service.intake import (
    Accepted,
    Ignored,
    event_label,
    normalize_event,
    parse_webhook,
    split_event_tail,
)
from service.webhook_auth import WebhookAuth, WebhookCredentials

AUTH: web.AppKey[WebhookAuth] = web.AppKey("webhook_auth", WebhookAuth)

_encoder = msgspec.json.Encoder()
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Every path Evolution can build from a configured `…/webhooks/evolution[/]`: with
# byEvents it appends `/<event-path>` by string concatenation, so a trailing slash in the
# configured URL gives `//<event-path>` (webhook.controller.ts, emit). The REST bearer
# check leaves these routes alone (handlers.rest_auth).
ROUTES = (
    "/webhooks/evolution",
    "/webhooks/evolution/",
    "/webhooks/evolution/{event}",
    "/webhooks/evolution//{event}",
)


def _json(status: int, payload: dict[str, Any]) -> web.Response:
    return web.Response(
        status=status, body=_encoder.encode(payload), content_type="application/json"
    )


def _too_large(limit: int) -> web.Response:
    # Evolution retries a 413 for a long while: the error says what to change.
    return _json(
        413, {"ok": False, "error": f"body larger than {limit} bytes (WEBHOOK_MAX_BODY_BYTES)"}
    )


def _query(request: web.Request) -> tuple[str | None, str | None]:
    """(`token` query value, event path byEvents appended to the query string)."""
    raw = request.rel_url.raw_query_string
    # Parsing the query string costs more than this check; most calls carry none.
    if not raw:
        return None, None
    raw, tail = split_event_tail(raw)
    if tail is None:
        return request.query.get("token"), None
    # Decoded as aiohttp decodes `request.query` (`+` is a space, %XX escapes).
    token = next((v for k, v in parse_qsl(raw, keep_blank_values=True) if k == "token"), None)
    return token, tail


def _credentials(request: web.Request, query_token: str | None) -> WebhookCredentials:
    headers = request.headers
    return WebhookCredentials(
        query_token=query_token,
        header_token=headers.get("X-Webhook-Token"),
        apikey=headers.get("apikey"),
        authorization=headers.get("Authorization"),
    )


async def evolution_webhook(request: web.Request) -> web.Response:
    ctx = context(request)
    counter = ctx.metrics.webhook_events
    query_token, tail_event = _query(request)
    path_event = request.match_info.get("event") or tail_event
    label = event_label(normalize_event(path_event)) if path_event else "unknown"

    decision = request.app[AUTH].check(_credentials(request, query_token))
    if not decision.ok:
        counter.labels(label, "unauthorized").inc()
        logger.info("webhook refused: {}", decision.reason)
        return _json(401, {"ok": False, "error": decision.reason})

    limit = ctx.settings.webhook_max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        counter.labels(label, "too_large").inc()
        logger.info("webhook refused: body of {} bytes over the limit", request.content_length)
        return _too_large(limit)
    try:
        body = await request.read()  # also enforces the limit on chunked bodies
    except web.HTTPRequestEntityTooLarge:
        counter.labels(label, "too_large").inc()
        logger.info("webhook refused: chunked body over the limit")
        return _too_large(limit)

    outcome = parse_webhook(body, path_event)
    label = event_label(outcome.event)
    if isinstance(outcome, Ignored):
        counter.labels(label, "ignored").inc()
        logger.debug("webhook ignored: {}", outcome.reason)
        return _json(200, {"ok": True, "ignored": outcome.reason})
    if not isinstance(outcome, Accepted):
        counter.labels(label, "rejected").inc()
        logger.info("webhook rejected: {}", outcome.reason)
        return _json(400, {"ok": False, "error": outcome.reason})

    try:
        await ctx.require_publisher().publish(outcome.events)
    except BrokerUnavailableError as exc:
        # The publisher logs the outage once; per-request detail only at DEBUG.
        counter.labels(label, "unavailable").inc()
        logger.debug("webhook not queued: {}", exc)
        return _json(503, {"ok": False, "error": "queue unavailable, retry later"})
    counter.labels(label, "queued").inc()
    logger.debug("queued {} event(s) of instance {}", len(outcome.events), outcome.instance)
    return _json(200, {"ok": True, "queued": len(outcome.events)})


@web.middleware
async def request_context(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """Request id on every log line of the request; one DEBUG line per request."""
    given = request.headers.get("X-Request-Id", "")
    # Not a secret, just unique enough to correlate lines: no urandom call per request.
    request_id = given if _REQUEST_ID.fullmatch(given) else f"{random.getrandbits(64):016x}"
    started = time.perf_counter()
    status = 500
    with logger.contextualize(request_id=request_id):
        try:
            response = await handler(request)
            status = response.status
            response.headers["X-Request-Id"] = request_id
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            # The path only: the query string may carry the webhook token.
            logger.debug(
                "{} {} {} {:.1f}ms",
                request.method,
                request.path,
                status,
                (time.perf_counter() - started) * 1000,
            )


def setup(app: web.Application) -> None:
    from handlers.app import CTX

    app[AUTH] = WebhookAuth.from_settings(app[CTX].settings)
    app.middlewares.append(request_context)
    for path in ROUTES:
        app.router.add_post(path, evolution_webhook)
