"""Supabase Auth access tokens as REST credentials: the signed-in user's account.

Claims as Supabase Auth issues them (guides/auth/jwt-fields): `sub` (user id), `role`
(`authenticated` for a signed-in user; the anon and service-role keys carry `anon` /
`service_role` and no `sub`), `aud` (`authenticated`), `exp`, `app_metadata` (set only
through the admin API, so a user cannot change it). Verified with the project's JWT
secret (HS256, SUPABASE_JWT_SECRET) or its JWKS (asymmetric signing keys,
SUPABASE_JWKS_URL = https://<ref>.supabase.co/auth/v1/.well-known/jwks.json). The account
is the claim named by SUPABASE_ACCOUNT_CLAIM (a dotted path; `sub` where the user's id is
the account id).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import jwt

from service.config import Settings

_ASYMMETRIC = ["RS256", "ES256", "EdDSA"]
LEEWAY_SECONDS = 30
REFETCH_SECONDS = 60.0


def _find(keys: jwt.PyJWKSet | None, kid: Any) -> jwt.PyJWK | None:
    if keys is None:
        return None
    return next((key for key in keys.keys if key.key_id == kid), None)


class UserTokens:
    def __init__(self, settings: Settings) -> None:
        self._secret = settings.supabase_jwt_secret
        self._jwks = (
            jwt.PyJWKClient(settings.supabase_jwks_url, cache_keys=True, lifespan=600, timeout=10)
            if settings.supabase_jwks_url
            else None
        )
        self._keys: jwt.PyJWKSet | None = None
        self._fetched_at = 0.0
        self._lock = asyncio.Lock()
        self._claim = [part for part in settings.supabase_account_claim.split(".") if part]
        self._audience = settings.supabase_jwt_audience

    @property
    def configured(self) -> bool:
        return self._secret is not None or self._jwks is not None

    async def account(self, token: str) -> uuid.UUID | str:
        """The token's account, or why the token is refused (safe to return)."""
        verdict = await self.identify(token)
        return verdict if isinstance(verdict, str) else verdict[0]

    async def identify(self, token: str) -> tuple[uuid.UUID, str] | str:
        """(the token's account, its user id `sub`), or why the token is refused."""
        try:
            claims = await self._claims(token)
        except jwt.ExpiredSignatureError:
            return "access token expired"
        except (jwt.PyJWTError, UnicodeError, ValueError):
            return "access token invalid"
        if claims.get("role") != "authenticated" or not claims.get("sub"):
            return "access token is not a signed-in user's"
        value: Any = claims
        for part in self._claim:
            value = value.get(part) if isinstance(value, dict) else None
        try:
            account = uuid.UUID(str(value)) if value is not None else None
        except ValueError:
            account = None
        if account is None:
            return "access token has no account"
        return account, str(claims["sub"])

    async def _signing_key(self, kid: Any) -> jwt.PyJWK:
        """The JWKS key `kid`; an unknown kid refetches the set at most once a minute, so
        tokens with made-up kids cannot turn into a fetch each."""
        assert self._jwks is not None
        async with self._lock:
            key = _find(self._keys, kid)
            stale = time.monotonic() - self._fetched_at > REFETCH_SECONDS
            if key is None and (stale or self._keys is None):
                # PyJWKClient fetches with urllib (blocking): off the event loop.
                self._keys = await asyncio.to_thread(self._jwks.get_jwk_set, True)
                self._fetched_at = time.monotonic()
                key = _find(self._keys, kid)
        if key is None:
            raise jwt.PyJWKClientError("no such signing key")
        return key

    async def _claims(self, token: str) -> dict[str, Any]:
        algorithm = jwt.get_unverified_header(token).get("alg")
        if algorithm == "HS256" and self._secret is not None:
            claims: dict[str, Any] = jwt.decode(
                token,
                self._secret,
                algorithms=["HS256"],
                audience=self._audience,
                options={"require": ["exp", "sub"]},
                leeway=LEEWAY_SECONDS,
            )
            return claims
        if algorithm in _ASYMMETRIC and self._jwks is not None:
            signing = await self._signing_key(jwt.get_unverified_header(token).get("kid"))
            claims = jwt.decode(
                token,
                signing.key,
                algorithms=_ASYMMETRIC,
                audience=self._audience,
                options={"require": ["exp", "sub"]},
                leeway=LEEWAY_SECONDS,
            )
            return claims
        raise jwt.InvalidAlgorithmError("algorithm not accepted")
