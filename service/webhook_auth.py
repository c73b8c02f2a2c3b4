"""Who may post webhooks: a static token, or the HS256 JWT Evolution signs per call.

- WEBHOOK_TOKEN: accepted as query `token` (the only option for Evolution's global
  webhook, which sends no custom headers), header `X-Webhook-Token` or header `apikey`.
- WEBHOOK_JWT_SECRET: Evolution's `jwt_key` webhook header makes it send
  `Authorization: Bearer <JWT>` with claims app=evolution, action=webhook and exp = iat +
  10 min. The JWT does not cover the body: it proves the sender, not the payload.

Either configured method passing is enough. With neither configured, requests pass only
under AUTH_DISABLED=true (and `serve` refuses to start otherwise). Pure: no framework.
"""

from __future__ import annotations

import hmac

import jwt
import msgspec

from service.config import ConfigError, Settings

JWT_LEEWAY_SECONDS = 30.0  # clock skew between Evolution's host and ours


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


def verify_jwt(token: str, secret: str, *, leeway: float = JWT_LEEWAY_SECONDS) -> str | None:
    """None when Evolution's webhook JWT is valid, else the reason it is not."""
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=["HS256"],
            options={"require": ["exp"]},
            leeway=leeway,
        )
    except jwt.ExpiredSignatureError:
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
