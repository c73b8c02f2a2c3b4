"""Optional per-instance webhook check: the body's `apikey` must be the instance's token.

Evolution puts the instance's own API key ("Instance".token) into every webhook body as
`apikey` when AUTHENTICATION_EXPOSE_IN_FETCH_INSTANCES is on (channel.service.ts,
`sendDataWebhook`). With WEBHOOK_VERIFY_INSTANCE_APIKEY=true a holder of the shared
WEBHOOK_TOKEN can then post only for instances whose token it also knows. Tokens are read
from Evolution's DB and kept for a minute.
"""

from __future__ import annotations

import hmac
import time
from typing import Protocol

import msgspec

CACHE_SECONDS = 60.0


class TokenSource(Protocol):
    async def instance_token(self, name: str) -> str | None: ...


class _Apikey(msgspec.Struct):
    apikey: str | None = None


_decoder = msgspec.json.Decoder(_Apikey)


class InstanceApikeys:
    def __init__(self, source: TokenSource, cache_seconds: float = CACHE_SECONDS) -> None:
        self._source = source
        self._cache_seconds = cache_seconds
        self._cache: dict[str, tuple[float, str | None]] = {}

    async def problem(self, body: bytes, instance: str) -> str | None:
        """Why the body's apikey is not `instance`'s token, or None when it is."""
        try:
            given = _decoder.decode(body).apikey
        except (msgspec.DecodeError, RecursionError):
            given = None
        if not given:
            return "webhook body carries no apikey (AUTHENTICATION_EXPOSE_IN_FETCH_INSTANCES)"
        expected = await self._token(instance)
        if expected is None or not hmac.compare_digest(
            expected.encode(), given.encode("utf-8", "surrogateescape")
        ):
            return "apikey is not this instance's token"
        return None

    async def _token(self, instance: str) -> str | None:
        now = time.monotonic()
        cached = self._cache.get(instance)
        if cached is not None and now - cached[0] < self._cache_seconds:
            return cached[1]
        token = await self._source.instance_token(instance)
        if len(self._cache) > 10_000:  # bounded: names come from requests
            self._cache.clear()
        self._cache[instance] = (now, token)
        return token
