"""Every webhook URL and JWT Evolution actually sends, built as its own code builds them.

Mirrors `src/api/integrations/event/webhook/webhook.controller.ts` of
evolution-foundation/evolution-api (2.3.1–2.3.7, 2.4.0-rc2):

- `WebhookController.emit`: `transformedWe = event.replace(/[.-]/gm, '_').toUpperCase()
  .replace(/_/gm, '-').toLowerCase()`; with byEvents the URL is `${url}/${transformedWe}`
  (per instance) or `${GLOBAL.URL}/${transformedWe}` (global), posted by axios as
  `axios.create({baseURL}).post('')`, i.e. the URL verbatim;
- `generateJwtToken`: HS256 over `{iat, exp: iat + 600, app: 'evolution', action:
  'webhook'}`, minted once per event before `retryWebhookRequest` resends it.
"""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import jwt
import pytest
from yarl import URL

from service.config import Settings
from service.usecases.intake import split_event_tail
from service.usecases.webhook_auth import (
    EVOLUTION_RETRY_ATTEMPTS,
    JWT_RETRY_GRACE_SECONDS,
    evolution_retry_span,
    verify_jwt,
)
from tests.test_intake import body_of, intake_app, message
from tests.test_publisher import WEBHOOK_TOKEN, amqp_settings, drain, events_of

SECRET = "evolution-webhook-jwt-secret-0123456789"
BASE = "http://crm.example.com"


def transformed_event(event: str) -> str:
    """`transformedWe` of WebhookController.emit."""
    we = event.replace(".", "_").replace("-", "_").upper()
    return we.replace("_", "-").lower()


def by_events_url(configured: str, event: str) -> str:
    """`${instance.url}/${transformedWe}` (and the same for WEBHOOK_GLOBAL_URL)."""
    return f"{configured}/{transformed_event(event)}"


def request_target(url: str) -> URL:
    """What Node's HTTP client puts on the request line for that URL: path + query,
    nothing normalised (no slash merging, the query taken as is)."""
    parts = urlsplit(url)
    return URL(parts.path + (f"?{parts.query}" if parts.query else ""), encoded=True)


def evolution_jwt(*, secret: str = SECRET, signed_at: float | None = None, **extra: Any) -> str:
    """generateJwtToken: one token per event, exp = iat + 600."""
    iat = int(time.time() if signed_at is None else signed_at)
    payload: dict[str, Any] = {"iat": iat, "exp": iat + 600, "app": "evolution"}
    payload["action"] = "webhook"
    payload.update(extra)
    return jwt.encode(payload, secret, algorithm="HS256")


def evolution_retry_times(rng: random.Random, timeout: float = 30.0) -> list[float]:
    """Seconds after signing at which retryWebhookRequest sends each attempt when every
    try times out: `min(5 * 2 ** (attempts - 1), 300)` +- 20 % jitter, floored at 5."""
    at, times = 0.0, [0.0]
    for attempts in range(1, EVOLUTION_RETRY_ATTEMPTS):
        delay = min(5 * 2 ** (attempts - 1), 300)
        delay = max(5, delay + delay * 0.2 * (rng.random() * 2 - 1))
        at += timeout + delay
        times.append(at)
    return times


@pytest.fixture
async def settings(amqp_url: str, amqp_prefix: str) -> AsyncIterator[Settings]:
    from tests.harness import declare_topology, delete_topology

    s = amqp_settings(amqp_url, amqp_prefix, webhook_jwt_secret=SECRET)
    await declare_topology(s)
    yield s
    await delete_topology(s)


# -- URL forms ------------------------------------------------------------------------
# Configured URLs a user can take from the README: with the token in the query (the only
# way for the global webhook, which sends no headers), with a trailing slash, or bare
# (authenticated by header), each with byEvents on and off.
CONFIGURED = [
    f"{BASE}/webhooks/evolution?token={WEBHOOK_TOKEN}",
    f"{BASE}/webhooks/evolution/?token={WEBHOOK_TOKEN}",
    f"{BASE}/webhooks/evolution",
    f"{BASE}/webhooks/evolution/",
]


def test_event_tail_is_split_only_for_evolution_events() -> None:
    assert split_event_tail("token=T/messages-upsert") == ("token=T", "messages-upsert")
    assert split_event_tail("token=T&x=1/send-message") == ("token=T&x=1", "send-message")
    # A token that contains a slash, and a tail that is no event, stay whole.
    assert split_event_tail("token=ab/cd") == ("token=ab/cd", None)
    assert split_event_tail("token=T/") == ("token=T/", None)
    assert split_event_tail("token=T") == ("token=T", None)


async def test_every_url_evolution_builds_reaches_intake(settings: Settings) -> None:
    sent: list[str] = []
    async with intake_app(settings) as (client, ctx):
        n = 0
        for configured in CONFIGURED:
            header_auth = "token=" not in configured
            for by_events in (False, True):
                for event in ("messages.upsert", "send.message"):
                    url = by_events_url(configured, event) if by_events else configured
                    n += 1
                    msg_id = f"URL{n:02d}"
                    headers = {"apikey": WEBHOOK_TOKEN} if header_auth else {}
                    resp = await client.post(
                        request_target(url),
                        data=body_of(message(event=event, msg_id=msg_id)),
                        headers=headers,
                    )
                    assert resp.status == 200, (url, await resp.text())
                    assert await resp.json() == {"ok": True, "queued": 1}, url
                    sent.append(msg_id)
        got = sorted(e.message_id for e in events_of(await drain(settings)))
    assert got == sorted(sent)
    assert ctx.metrics.webhook_events.labels("messages.upsert", "queued")._value.get() == 8


async def test_wrong_tokens_are_still_refused_in_every_form(settings: Settings) -> None:
    wrong = [
        f"{BASE}/webhooks/evolution?token=wrong",
        f"{BASE}/webhooks/evolution?token={WEBHOOK_TOKEN}x",
        # The real token as a prefix of the value is not the token.
        f"{BASE}/webhooks/evolution?token={WEBHOOK_TOKEN}/not-an-event",
        f"{BASE}/webhooks/evolution?token={WEBHOOK_TOKEN[:-1]}",
        f"{BASE}/webhooks/evolution/?token=",
    ]
    async with intake_app(settings) as (client, _):
        for configured in wrong:
            for url in (configured, by_events_url(configured, "messages.upsert")):
                resp = await client.post(request_target(url), data=body_of(message()))
                assert resp.status == 401, url
        # A byEvents tail that contradicts the body is a 400, not a silent accept.
        url = by_events_url(f"{BASE}/webhooks/evolution?token={WEBHOOK_TOKEN}", "send.message")
        resp = await client.post(request_target(url), data=body_of(message()))
        assert resp.status == 400
    assert events_of(await drain(settings)) == []


async def test_trailing_slash_forms_never_reach_the_rest_auth_layer(settings: Settings) -> None:
    async with intake_app(settings) as (client, _):
        for path in ("/webhooks/evolution/", "/webhooks/evolution//messages-upsert"):
            resp = await client.post(URL(path, encoded=True), data=body_of(message()))
            # Refused by webhook auth (its own message), not the REST bearer check.
            assert resp.status == 401
            assert await resp.json() == {"ok": False, "error": "missing webhook token"}
    assert events_of(await drain(settings)) == []


# -- the JWT window ---------------------------------------------------------------------
def test_grace_covers_evolutions_whole_retry_schedule() -> None:
    span = evolution_retry_span()
    rng = random.Random(9)
    latest = max(evolution_retry_times(rng)[-1] for _ in range(2000))
    assert latest <= span
    # The schedule reaches past the token's own 10 minutes; the window covers it.
    assert span > 600
    assert 600 + JWT_RETRY_GRACE_SECONDS >= span + 60


def test_jwt_past_exp_within_the_retry_window() -> None:
    now = time.time()
    for at in evolution_retry_times(random.Random(1)):
        token = evolution_jwt(signed_at=now - at)
        assert verify_jwt(token, SECRET, now=now) is None, at
    # Past the window: expired.
    old = evolution_jwt(signed_at=now - 600 - JWT_RETRY_GRACE_SECONDS - 31)
    assert verify_jwt(old, SECRET, now=now) == "JWT expired"
    # The rest is still checked on an old token.
    stale = now - 1500
    assert verify_jwt(evolution_jwt(secret="y" * 40, signed_at=stale), SECRET, now=now) == (
        "JWT signature invalid"
    )
    assert verify_jwt(evolution_jwt(signed_at=stale, app="x"), SECRET, now=now) == (
        "JWT claims app/action wrong"
    )
    none_alg = jwt.encode(
        {"exp": int(now) + 60, "app": "evolution", "action": "webhook"}, None, algorithm="none"
    )
    assert verify_jwt(none_alg, SECRET, now=now) == "JWT algorithm must be HS256"
    hs512 = jwt.encode(
        {"exp": int(now), "app": "evolution", "action": "webhook"}, SECRET, algorithm="HS512"
    )
    assert verify_jwt(hs512, SECRET, now=now) == "JWT algorithm must be HS256"
    no_exp = jwt.encode({"app": "evolution", "action": "webhook"}, SECRET, algorithm="HS256")
    assert verify_jwt(no_exp, SECRET, now=now) == "JWT has no exp claim"


async def test_retries_of_one_event_with_its_one_token_are_accepted(settings: Settings) -> None:
    """The same token Evolution minted before its retry loop, presented as the last
    retries would present it: about 25 minutes after signing."""
    token = evolution_jwt(signed_at=time.time() - 25 * 60)
    expired = evolution_jwt(signed_at=time.time() - 600 - JWT_RETRY_GRACE_SECONDS - 60)
    async with intake_app(settings) as (client, _):
        url = by_events_url(f"{BASE}/webhooks/evolution", "messages.upsert")
        resp = await client.post(
            request_target(url),
            data=body_of(message(msg_id="LATE")),
            headers={"Authorization": f"Bearer {token}"},
        )
        assert resp.status == 200, await resp.text()
        resp = await client.post(
            request_target(url),
            data=body_of(message(msg_id="TOO-LATE")),
            headers={"Authorization": f"Bearer {expired}"},
        )
        assert resp.status == 401
        assert await resp.json() == {"ok": False, "error": "JWT expired"}
    assert [e.message_id for e in events_of(await drain(settings))] == ["LATE"]
