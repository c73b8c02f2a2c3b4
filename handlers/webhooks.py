"""POST /webhooks/evolution[/{event}]: authenticate, decode, publish (confirmed), answer.

Status codes follow Evolution's retry rules: 200 only after RabbitMQ confirmed the events;
400/401/413 for what a retry cannot fix; 503 (retried by Evolution) when the broker is
unavailable.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

import msgspec
from aiohttp import web
from loguru import logger

from handlers.app_context import CTX, context
from handlers.body import BodyError, read_limited
from service.adapters.broker.publisher import BrokerUnavailableError
from service.usecases.instance_auth import InstanceApikeys
from service.usecases.intake import (
    Accepted,
    Ignored,
    event_label,
    normalize_event,
    split_event_tail,
)
from service.usecases.intake_guard import parse_checked
from service.usecases.webhook_auth import WebhookAuth, WebhookCredentials

AUTH: web.AppKey[WebhookAuth] = web.AppKey("webhook_auth", WebhookAuth)
APIKEYS: web.AppKey[InstanceApikeys] = web.AppKey("instance_apikeys", InstanceApikeys)

_encoder = msgspec.json.Encoder()

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


def _error(exc: BodyError) -> dict[str, Any]:
    return {"ok": False, "error": exc.message}


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
    try:
        body = await read_limited(request, limit, ctx.settings.http_body_timeout)
    except BodyError as exc:
        counter.labels(label, "too_large" if exc.status == 413 else "rejected").inc()
        logger.info("webhook refused: {}", exc.message)
        return _too_large(limit) if exc.status == 413 else _json(exc.status, _error(exc))

    outcome = parse_checked(body, path_event, max_skew_seconds=ctx.settings.max_clock_skew_seconds)
    label = event_label(outcome.event)
    if isinstance(outcome, Ignored):
        counter.labels(label, "ignored").inc()
        logger.debug("webhook ignored: {}", outcome.reason)
        return _json(200, {"ok": True, "ignored": outcome.reason})
    if not isinstance(outcome, Accepted):
        counter.labels(label, "rejected").inc()
        logger.info("webhook rejected: {}", outcome.reason)
        return _json(400, {"ok": False, "error": outcome.reason})

    apikeys = request.app.get(APIKEYS)
    if apikeys is not None:
        problem = await apikeys.problem(body, outcome.instance)
        if problem is not None:
            counter.labels(label, "unauthorized").inc()
            logger.info("webhook refused: {}", problem, instance=outcome.instance)
            return _json(401, {"ok": False, "error": problem})

    try:
        await ctx.publisher.publish(outcome.events)
    except BrokerUnavailableError as exc:
        # The publisher logs the outage once; per-request detail only at DEBUG.
        counter.labels(label, "unavailable").inc()
        logger.debug("webhook not queued: {}", exc)
        return _json(503, {"ok": False, "error": "queue unavailable, retry later"})
    counter.labels(label, "queued").inc()
    logger.debug("queued {} event(s) of instance {}", len(outcome.events), outcome.instance)
    return _json(200, {"ok": True, "queued": len(outcome.events)})


def setup(app: web.Application) -> None:
    app[AUTH] = WebhookAuth.from_settings(app[CTX].settings)
    reader = app[CTX].reader
    if app[CTX].settings.webhook_verify_instance_apikey and reader is not None:
        app[APIKEYS] = InstanceApikeys(reader)
    for path in ROUTES:
        app.router.add_post(path, evolution_webhook)
