"""Request id on every log line of a request; one DEBUG line per request.

Requests are logged at DEBUG only: aiohttp's own access log through loguru's JSON sink costs
most of the server's throughput.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from loguru import logger

_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def request_id_of(request: web.Request) -> str:
    """The caller's X-Request-Id when it is a plain token, else a new one."""
    given = request.headers.get("X-Request-Id", "")
    # Not a secret, just unique enough to correlate lines: no urandom call per request.
    return given if _REQUEST_ID.fullmatch(given) else f"{random.getrandbits(64):016x}"


@web.middleware
async def request_context(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """Request id on every log line of the request; one DEBUG line per request."""
    request_id = request_id_of(request)
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
