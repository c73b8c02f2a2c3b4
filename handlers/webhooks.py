"""POST /webhooks/evolution[/{event}]: authenticate, decode, publish (confirmed), answer.

Status codes follow Evolution's retry rules: 200 only after RabbitMQ confirmed the events;
400/401/413 for what a retry cannot fix; 503 (retried by Evolution) when the broker is
unavailable.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import msgspec
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from loguru import logger

from handlers.app_context import CTX, context
from handlers.body import BodyError, read_limited
from handlers.http_errors import failure_response
from handlers.request_id import request_id_of
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

if TYPE_CHECKING:
    from loguru import Logger

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


# The answers to a queued webhook, by event count (almost always 1): encoded once.
_QUEUED = [_encoder.encode({"ok": True, "queued": n}) for n in range(33)]


def _queued(count: int) -> web.Response:
    body = (
        _QUEUED[count] if count < len(_QUEUED) else _encoder.encode({"ok": True, "queued": count})
    )
    return web.Response(status=200, body=body, content_type="application/json")


# Set by the lean path (below), which runs without `request_context`'s log context.
_REQUEST_ID: web.RequestKey[str] = web.RequestKey("webhook_request_id", str)


def _log(request: web.Request) -> Logger:
    """The logger for a refusal: bound to the request id when no middleware set one."""
    request_id = request.get(_REQUEST_ID)
    return logger if request_id is None else logger.bind(request_id=request_id)


class _Counts:
    """The webhook counter's children by (event, outcome), looked up once each: a
    `labels()` call per request costs three times the increment."""

    def __init__(self, counter: Any) -> None:
        self._counter = counter
        self._children: dict[tuple[str, str], Any] = {}

    def inc(self, label: str, outcome: str) -> None:
        key = (label, outcome)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._counter.labels(label, outcome)
        child.inc()


COUNTS: web.AppKey[_Counts] = web.AppKey("webhook_counts", _Counts)


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
    counter = request.app[COUNTS]
    query_token, tail_event = _query(request)
    path_event = request.match_info.get("event") or tail_event
    label = event_label(normalize_event(path_event)) if path_event else "unknown"

    decision = request.app[AUTH].check(_credentials(request, query_token))
    if not decision.ok:
        counter.inc(label, "unauthorized")
        _log(request).info("webhook refused: {}", decision.reason)
        return _json(401, {"ok": False, "error": decision.reason})

    limit = ctx.settings.webhook_max_body_bytes
    try:
        body = await read_limited(request, limit, ctx.settings.http_body_timeout)
    except BodyError as exc:
        counter.inc(label, "too_large" if exc.status == 413 else "rejected")
        _log(request).info("webhook refused: {}", exc.message)
        return _too_large(limit) if exc.status == 413 else _json(exc.status, _error(exc))

    outcome = parse_checked(body, path_event, max_skew_seconds=ctx.settings.max_clock_skew_seconds)
    label = event_label(outcome.event)
    if isinstance(outcome, Ignored):
        counter.inc(label, "ignored")
        logger.debug("webhook ignored: {}", outcome.reason)
        return _json(200, {"ok": True, "ignored": outcome.reason})
    if not isinstance(outcome, Accepted):
        counter.inc(label, "rejected")
        _log(request).info("webhook rejected: {}", outcome.reason)
        return _json(400, {"ok": False, "error": outcome.reason})

    apikeys = request.app.get(APIKEYS)
    if apikeys is not None:
        problem = await apikeys.problem(body, outcome.instance)
        if problem is not None:
            counter.inc(label, "unauthorized")
            _log(request).info("webhook refused: {}", problem, instance=outcome.instance)
            return _json(401, {"ok": False, "error": problem})

    try:
        await ctx.publisher.publish(outcome.events)
    except BrokerUnavailableError as exc:
        # The publisher logs the outage once; per-request detail only at DEBUG.
        counter.inc(label, "unavailable")
        logger.debug("webhook not queued: {}", exc)
        return _json(503, {"ok": False, "error": "queue unavailable, retry later"})
    counter.inc(label, "queued")
    logger.debug("queued {} event(s) of instance {}", len(outcome.events), outcome.instance)
    return _queued(len(outcome.events))


def lean_middleware() -> Middleware:
    """The webhook routes without the other middlewares (outermost, before them).

    What those do for a webhook, done here at a fraction of the cost: the X-Request-Id
    answer header, the request id on the handler's log lines, and the JSON answer to an
    unexpected error; the bearer check never applied to these routes (they authenticate
    on their own). The route is recognised by the handler the router matched, so no
    spelling of a URL reaches another handler this way. Installed only when DEBUG
    logging is off: the per-request DEBUG line is `request_context`'s.
    """

    @web.middleware
    async def lean_webhooks(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.match_info.handler is not evolution_webhook:
            return await handler(request)
        request_id = request_id_of(request)
        request[_REQUEST_ID] = request_id
        try:
            response: web.StreamResponse = await evolution_webhook(request)
        except Exception as exc:
            with logger.contextualize(request_id=request_id):
                response = failure_response(request, exc)
        response.headers["X-Request-Id"] = request_id
        return response

    return lean_webhooks


def setup(app: web.Application) -> None:
    app[AUTH] = WebhookAuth.from_settings(app[CTX].settings)
    app[COUNTS] = _Counts(app[CTX].metrics.webhook_events)
    reader = app[CTX].reader
    if app[CTX].settings.webhook_verify_instance_apikey:
        app[APIKEYS] = InstanceApikeys(reader)
    for path in ROUTES:
        app.router.add_post(path, evolution_webhook)
