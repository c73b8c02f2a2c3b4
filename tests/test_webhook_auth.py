"""Webhook authentication: the pure checks, then 401s over HTTP on the real intake app."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import jwt
import pytest

from service.config import ConfigError, Settings
from service.usecases.webhook_auth import (
    JWT_RETRY_GRACE_SECONDS,
    WebhookAuth,
    WebhookCredentials,
    bearer_token,
    check_webhook_auth_config,
    verify_jwt,
)
from tests.test_intake import body_of, intake_app, message
from tests.test_publisher import WEBHOOK_TOKEN, amqp_settings, drain, events_of

SECRET = "evolution-webhook-jwt-secret-0123456789"  # 32+ bytes, as HS256 wants
TOKEN = "s3cret-webhook-token-0123456789abcdef012"
# Evolution resends one token through its retry schedule: `exp` is extended by this.
GRACE = JWT_RETRY_GRACE_SECONDS


def evolution_jwt(
    *,
    secret: str = SECRET,
    exp_in: float = 600,
    claims: dict[str, Any] | None = None,
    drop: tuple[str, ...] = (),
) -> str:
    """A token as Evolution signs it (iat, exp = iat + 600, app, action)."""
    now = int(time.time())
    payload: dict[str, Any] = {
        "iat": now,
        "exp": int(now + exp_in),
        "app": "evolution",
        "action": "webhook",
    }
    payload.update(claims or {})
    for name in drop:
        payload.pop(name)
    return jwt.encode(payload, secret, algorithm="HS256")


# -- configuration -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("env", "ok"),
    [
        ({}, False),
        ({"AUTH_DISABLED": "true"}, True),
        ({"WEBHOOK_TOKEN": TOKEN}, True),
        ({"WEBHOOK_JWT_SECRET": SECRET}, True),
        ({"AUTH_DISABLED": "false", "API_TOKEN": "x" * 40}, False),
    ],
)
def test_intake_refuses_to_start_without_auth(env: dict[str, str], ok: bool) -> None:
    settings = amqp_settings("amqp://localhost/", "p", webhook_token="", **env)
    if ok:
        check_webhook_auth_config(settings)
    else:
        with pytest.raises(ConfigError, match="WEBHOOK_TOKEN or WEBHOOK_JWT_SECRET"):
            check_webhook_auth_config(settings)


# -- static token ------------------------------------------------------------------------------
TOKEN_AUTH = WebhookAuth(token=TOKEN, jwt_secret=None)


@pytest.mark.parametrize("place", ["query_token", "header_token", "apikey"])
def test_token_accepted_in_each_place(place: str) -> None:
    decision = TOKEN_AUTH.check(WebhookCredentials(**{place: TOKEN}))
    assert decision.ok and decision.method == "token"


def test_token_missing_or_wrong() -> None:
    missing = TOKEN_AUTH.check(WebhookCredentials())
    assert not missing.ok and missing.reason == "missing webhook token"
    wrong = TOKEN_AUTH.check(WebhookCredentials(query_token=TOKEN + "x"))
    assert not wrong.ok and wrong.reason == "invalid webhook token"
    prefix = TOKEN_AUTH.check(WebhookCredentials(header_token=TOKEN[:-1]))
    assert not prefix.ok and prefix.reason == "invalid webhook token"
    # One right value among wrong ones passes; a bearer JWT means nothing without a secret.
    mixed = TOKEN_AUTH.check(
        WebhookCredentials(query_token="nope", apikey=TOKEN, authorization="Bearer x")
    )
    assert mixed.ok
    bearer_only = TOKEN_AUTH.check(WebhookCredentials(authorization=f"Bearer {TOKEN}"))
    assert not bearer_only.ok and bearer_only.reason == "missing webhook token"


# -- JWT ---------------------------------------------------------------------------------------
JWT_AUTH = WebhookAuth(token=None, jwt_secret=SECRET)


def jwt_decision(token: str, auth: WebhookAuth = JWT_AUTH) -> tuple[bool, str | None]:
    decision = auth.check(WebhookCredentials(authorization=f"Bearer {token}"))
    return decision.ok, decision.reason


def test_jwt_cases() -> None:
    assert jwt_decision(evolution_jwt()) == (True, None)
    assert jwt_decision(evolution_jwt(exp_in=-120 - GRACE)) == (False, "JWT expired")
    assert jwt_decision(evolution_jwt(exp_in=-5 - GRACE)) == (True, None)  # within clock leeway
    assert jwt_decision(evolution_jwt(secret="another-secret-of-enough-length-xx")) == (
        False,
        "JWT signature invalid",
    )
    assert jwt_decision(evolution_jwt(claims={"app": "other"})) == (
        False,
        "JWT claims app/action wrong",
    )
    assert jwt_decision(evolution_jwt(claims={"action": "send"})) == (
        False,
        "JWT claims app/action wrong",
    )
    assert jwt_decision(evolution_jwt(drop=("action",))) == (False, "JWT claims app/action wrong")
    assert jwt_decision(evolution_jwt(drop=("exp",))) == (False, "JWT has no exp claim")
    assert jwt_decision("not.a.jwt") == (False, "JWT malformed")
    unsigned = jwt.encode({"app": "evolution", "action": "webhook", "exp": 2**31}, None, "none")
    assert jwt_decision(unsigned) == (False, "JWT algorithm must be HS256")
    assert JWT_AUTH.check(WebhookCredentials()).reason == "missing webhook token"
    # Bearer scheme is case-insensitive; other schemes are not a JWT.
    assert JWT_AUTH.check(WebhookCredentials(authorization=f"bearer {evolution_jwt()}")).ok
    assert not JWT_AUTH.check(WebhookCredentials(authorization=f"Basic {evolution_jwt()}")).ok


def test_verify_jwt_and_bearer_helpers() -> None:
    assert verify_jwt(evolution_jwt(), SECRET) is None
    assert verify_jwt(evolution_jwt(exp_in=-10 - GRACE), SECRET, leeway=0) == "JWT expired"
    assert bearer_token("Bearer  abc ") == "abc"
    assert bearer_token("Bearer") is None
    assert bearer_token(None) is None


def test_either_method_is_enough_when_both_configured() -> None:
    both = WebhookAuth(token=TOKEN, jwt_secret=SECRET)
    assert both.check(WebhookCredentials(query_token=TOKEN)).method == "token"
    assert both.check(WebhookCredentials(authorization=f"Bearer {evolution_jwt()}")).method == (
        "jwt"
    )
    expired = both.check(
        WebhookCredentials(authorization=f"Bearer {evolution_jwt(exp_in=-99 - GRACE)}")
    )
    assert expired.reason == "JWT expired"
    neither = both.check(WebhookCredentials(query_token="bad"))
    assert not neither.ok and neither.reason == "invalid webhook token"


def test_unconfigured_auth_fails_closed_unless_disabled() -> None:
    closed = WebhookAuth(token=None, jwt_secret=None)
    assert not closed.check(WebhookCredentials(query_token="anything")).ok
    opened = WebhookAuth(token=None, jwt_secret=None, auth_disabled=True)
    decision = opened.check(WebhookCredentials())
    assert decision.ok and decision.method == "disabled"
    # AUTH_DISABLED does not switch off a configured token.
    strict = WebhookAuth(token=TOKEN, jwt_secret=None, auth_disabled=True)
    assert not strict.check(WebhookCredentials()).ok


# -- over HTTP ---------------------------------------------------------------------------------
@pytest.fixture
async def settings(amqp_url: str, amqp_prefix: str) -> AsyncIterator[Settings]:
    from tests.harness import delete_topology

    s = amqp_settings(amqp_url, amqp_prefix, webhook_jwt_secret=SECRET, webhook_max_body_bytes=4096)
    yield s
    await delete_topology(s)


async def test_http_auth_outcomes(settings: Settings) -> None:
    body = body_of(message())
    path = "/webhooks/evolution"
    async with intake_app(settings) as (client, ctx):
        refused: list[tuple[dict[str, str], str, str]] = [
            ({}, path, "missing webhook token"),
            ({}, f"{path}?token=wrong", "invalid webhook token"),
            ({"X-Webhook-Token": "wrong"}, path, "invalid webhook token"),
            (
                {"Authorization": f"Bearer {evolution_jwt(exp_in=-300 - GRACE)}"},
                path,
                "JWT expired",
            ),
            (
                {"Authorization": f"Bearer {evolution_jwt(secret='x' * 40)}"},
                path,
                "JWT signature invalid",
            ),
            (
                {"Authorization": f"Bearer {evolution_jwt(claims={'app': 'x'})}"},
                path,
                "JWT claims app/action wrong",
            ),
        ]
        for headers, url, reason in refused:
            resp = await client.post(url, data=body, headers=headers)
            assert resp.status == 401, (headers, url)
            assert await resp.json() == {"ok": False, "error": reason}
        assert ctx.metrics.webhook_events.labels("unknown", "unauthorized")._value.get() == len(
            refused
        )

        accepted: list[tuple[dict[str, str], str]] = [
            ({}, f"{path}?token={WEBHOOK_TOKEN}"),
            ({"X-Webhook-Token": WEBHOOK_TOKEN}, path),
            ({"apikey": WEBHOOK_TOKEN}, path),
            ({"Authorization": f"Bearer {evolution_jwt()}"}, path),
        ]
        for n, (headers, url) in enumerate(accepted):
            resp = await client.post(url, data=body_of(message(msg_id=f"OK{n}")), headers=headers)
            assert resp.status == 200, (headers, url, await resp.text())
            assert await resp.json() == {"ok": True, "queued": 1}
    # Nothing refused reached the queue; every accepted call did.
    ids = sorted(e.message_id for e in events_of(await drain(settings)))
    assert ids == [f"OK{n}" for n in range(len(accepted))]


async def test_auth_is_checked_before_the_body_is_read(settings: Settings) -> None:
    async with intake_app(settings) as (client, _):
        huge = b"x" * (settings.webhook_max_body_bytes + 10)
        resp = await client.post("/webhooks/evolution", data=huge)
        assert resp.status == 401
        assert (await resp.json())["error"] == "missing webhook token"
