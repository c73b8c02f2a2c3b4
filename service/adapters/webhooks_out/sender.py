"""One delivery attempt: a signed POST of the exact body, bounded by NOTIFY_TIMEOUT.

Redirects are not followed (a 3xx is a failed attempt: the endpoint's URL should change),
no cookies are kept, and the response body is not read: only its status and `Retry-After`
matter. Failures are described without the URL's path or query (they may carry tokens).
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from urllib.parse import urlsplit

import aiohttp
import msgspec

from service.adapters.webhooks_out.signing import secret_key, signature
from service.adapters.webhooks_out.targets import TargetPolicy, TargetRefusedError
from service.config import Settings
from service.domain.webhooks import WebhookEndpoint, parse_retry_after

USER_AGENT = "crm-backend-webhooks/1"


class AttemptResult(msgspec.Struct, kw_only=True, frozen=True):
    status: int | None  # None: no HTTP answer (timeout, refused, DNS)
    error: str | None  # why it failed, for logs and the dead-letter queue
    retry_after: float | None = None  # seconds the receiver asked to wait
    seconds: float = 0.0
    permanent: bool = False  # 410 Gone or a refused target: retrying cannot help

    @property
    def accepted(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


class WebhookSender:
    """Holds one HTTP client for every endpoint; `start()` inside the running loop."""

    def __init__(self, settings: Settings, policy: TargetPolicy) -> None:
        self._timeout = settings.notify_timeout
        self._limit = settings.notify_concurrency
        self._policy = policy
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self._limit, resolver=self._policy.resolver(), ttl_dns_cache=60
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),
                timeout=aiohttp.ClientTimeout(total=self._timeout),
                headers={"User-Agent": USER_AGENT},
            )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(self, endpoint: WebhookEndpoint, webhook_id: str, body: bytes) -> AttemptResult:
        await self.start()
        assert self._session is not None
        started = time.monotonic()
        try:
            self._policy.check_url(endpoint.url)
        except TargetRefusedError as exc:
            return AttemptResult(status=None, error=str(exc), permanent=True)
        timestamp = int(time.time())
        try:
            key = secret_key(endpoint.secret)
        except ValueError as exc:
            return AttemptResult(status=None, error=f"endpoint secret: {exc}", permanent=True)
        headers = {
            "Content-Type": "application/json",
            "webhook-id": webhook_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signature(key, webhook_id, timestamp, body),
        }
        try:
            async with self._session.post(
                endpoint.url, data=body, headers=headers, allow_redirects=False
            ) as response:
                status = response.status
                retry_after = parse_retry_after(
                    response.headers.get("Retry-After"), datetime.now(UTC)
                )
        except TimeoutError:
            return AttemptResult(
                status=None,
                error=f"no answer from {_where(endpoint.url)} within {self._timeout:g}s",
                seconds=time.monotonic() - started,
            )
        except (aiohttp.ClientError, OSError) as exc:
            return AttemptResult(
                status=None,
                error=f"{_where(endpoint.url)}: {type(exc).__name__}",
                seconds=time.monotonic() - started,
            )
        except asyncio.CancelledError:
            raise
        seconds = time.monotonic() - started
        if 200 <= status < 300:
            return AttemptResult(status=status, error=None, seconds=seconds)
        return AttemptResult(
            status=status,
            error=f"HTTP {status} from {_where(endpoint.url)}",
            retry_after=retry_after,
            seconds=seconds,
            permanent=status == 410,
        )


def _where(url: str) -> str:
    """Scheme, host and port of a URL: enough to tell endpoints apart, nothing secret."""
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port}"
