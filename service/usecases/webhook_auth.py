"""Who may post webhooks: a static token, or the HS256 JWT Evolution signs per call.

- WEBHOOK_TOKEN: accepted as query `token` (the only option for Evolution's global
  webhook, which sends no custom headers), header `X-Webhook-Token` or header `apikey`.
- WEBHOOK_JWT_SECRET: Evolution's `jwt_key` webhook header makes it send
  `Authorization: Bearer <JWT>` with claims app=evolution, action=webhook and exp = iat +
  10 min. The JWT does not cover the body: it proves the sender, not the payload.
  Evolution signs the token once per event, before its retry loop, and resends the same
  token on every retry (webhook.controller.ts: generateJwtToken, retryWebhookRequest):
  a token is therefore accepted past `exp` for as long as that schedule can resend it.

Either configured method passing is enough. With neither configured, requests pass only
under AUTH_DISABLED=true (and `serve` refuses to start otherwise). Pure: no framework.
"""

from __future__ import annotations

import hmac
import math
import time

import jwt
import msgspec

from service.config import ConfigError, Settings

JWT_LEEWAY_SECONDS = 30.0  # clock skew between Evolution's host and ours

# Evolution's webhook retry defaults (webhook.controller.ts, retryWebhookRequest): 10
# attempts, waits of 5 s doubling up to 300 s with +-20 % jitter, each try up to the 30 s
# request timeout. The token it signed lives 600 s.
EVOLUTION_RETRY_ATTEMPTS = 10
EVOLUTION_RETRY_INITIAL_SECONDS = 5.0
EVOLUTION_RETRY_MAX_SECONDS = 300.0
EVOLUTION_RETRY_JITTER = 0.2
EVOLUTION_REQUEST_TIMEOUT_SECONDS = 30.0
EVOLUTION_JWT_LIFETIME_SECONDS = 600


def evolution_retry_span() -> float:
    """Longest time from signing to Evolution's last retry (all waits at +jitter, every
    try timing out)."""
    waits: float = sum(
        min(EVOLUTION_RETRY_INITIAL_SECONDS * 2 ** (n - 1), EVOLUTION_RETRY_MAX_SECONDS)
        * (1 + EVOLUTION_RETRY_JITTER)
        for n in range(1, EVOLUTION_RETRY_ATTEMPTS)
    )
    return waits + (EVOLUTION_RETRY_ATTEMPTS - 1) * EVOLUTION_REQUEST_TIMEOUT_SECONDS


# How long past `exp` a correctly signed token is still accepted: the retry span beyond
# the token's lifetime plus a minute's margin, rounded up to whole minutes (1200 s: a
# token is good for 30 minutes after Evolution signed it).
JWT_RETRY_GRACE_SECONDS = (
    math.ceil((evolution_retry_span() - EVOLUTION_JWT_LIFETIME_SECONDS + 60) / 60) * 60
)


class WebhookCredentials(msgspec.Struct, frozen=True, kw_only=True):
    """What a request presented (None: absent)."""

    query_token: str | None = None
    header_token: str | None = None  # X-Webhook-Token
    apikey: str | None = None  # apikey header
    authorization: str | None = None  # Authorization header


class AuthDecision(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool
    reason: str | None = None  # why not, in words safe to return to the caller
    method: str | None = None  # "token", "jwt" or "disabled" when ok


def check_webhook_auth_config(settings: Settings) -> None:
    """Refuse to run intake with no webhook authentication unless explicitly disabled."""
    if settings.webhook_auth_configured() or settings.auth_disabled:
        return
    raise ConfigError(
        "webhook authentication is not configured: set WEBHOOK_TOKEN or WEBHOOK_JWT_SECRET "
        "(AUTH_DISABLED=true only for a local trial)"
    )


def token_matches(expected: str, presented: str) -> bool:
    """Constant-time comparison of a presented token with the configured one."""
    # surrogateescape: header bytes that are not UTF-8 compare unequal, never raise.
    return hmac.compare_digest(expected.encode(), presented.encode("utf-8", "surrogateescape"))


def bearer_token(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return value.strip() or None


def verify_jwt(
    token: str,
    secret: str,
    *,
    leeway: float = JWT_LEEWAY_SECONDS,
    grace: float = JWT_RETRY_GRACE_SECONDS,
    now: float | None = None,
) -> str | None:
    """None when Evolution's webhook JWT is valid, else the reason it is not.

    Signature, algorithm (HS256 only), `iat`/`nbf` and the claims are checked as usual;
    `exp` is extended by `grace` so Evolution's retries of one event keep working.
    """
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=["HS256"],
            options={"require": ["exp"], "verify_exp": False},
            leeway=leeway,
        )
    except jwt.ExpiredSignatureError:  # pragma: no cover - exp is checked below
        return "JWT expired"
    except jwt.InvalidSignatureError:
        return "JWT signature invalid"
    except jwt.MissingRequiredClaimError:
        return "JWT has no exp claim"
    except jwt.ImmatureSignatureError:
        return "JWT not valid yet"
    except jwt.InvalidAlgorithmError:
        return "JWT algorithm must be HS256"
    except (jwt.PyJWTError, UnicodeError):
        return "JWT malformed"
    if claims.get("app") != "evolution" or claims.get("action") != "webhook":
        return "JWT claims app/action wrong"
    exp = claims.get("exp")
    if not isinstance(exp, int | float) or isinstance(exp, bool):
        return "JWT malformed"
    current = time.time() if now is None else now
    if current > exp + grace + leeway:
        return "JWT expired"
    return None


class WebhookAuth:
    """The configured methods, built once; `check()` runs per request."""

    def __init__(
        self,
        *,
        token: str | None,
        jwt_secret: str | None,
        auth_disabled: bool = False,
        leeway: float = JWT_LEEWAY_SECONDS,
    ) -> None:
        self._token = token or None
        self._jwt_secret = jwt_secret or None
        self._disabled = auth_disabled
        self._leeway = leeway

    @classmethod
    def from_settings(cls, settings: Settings) -> WebhookAuth:
        return cls(
            token=settings.webhook_token,
            jwt_secret=settings.webhook_jwt_secret,
            auth_disabled=settings.auth_disabled,
        )

    def check(self, credentials: WebhookCredentials) -> AuthDecision:
        if self._token is None and self._jwt_secret is None:
            if self._disabled:
                return AuthDecision(ok=True, method="disabled")
            # Fail closed: a server built without configuration never accepts.
            return AuthDecision(ok=False, reason="webhook authentication is not configured")
        failures: list[str] = []
        if self._token is not None:
            presented = [
                value
                for value in (
                    credentials.query_token,
                    credentials.header_token,
                    credentials.apikey,
                )
                if value
            ]
            if presented:
                # Every candidate is compared (no early exit), each in constant time.
                matched = [token_matches(self._token, value) for value in presented]
                if any(matched):
                    return AuthDecision(ok=True, method="token")
                failures.append("invalid webhook token")
        if self._jwt_secret is not None:
            bearer = bearer_token(credentials.authorization)
            if bearer is not None:
                problem = verify_jwt(bearer, self._jwt_secret, leeway=self._leeway)
                if problem is None:
                    return AuthDecision(ok=True, method="jwt")
                failures.append(problem)
        return AuthDecision(ok=False, reason=failures[0] if failures else "missing webhook token")
