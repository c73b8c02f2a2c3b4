"""The HTTP server around the app: limits a single client cannot get around.

aiohttp (web_protocol.RequestHandler) has no header-read timeout of its own, but its
keep-alive timer starts with the connection and closes it while no complete request has
arrived: `keepalive_timeout` = HTTP_HEADER_TIMEOUT bounds slow request heads and idle
connections alike. What this module adds:

- a cap on open connections (HTTP_MAX_CONNECTIONS, kept below the process's file limit):
  beyond it a connection gets a 503 and is closed, so `/health` and the webhooks keep
  working instead of the process running out of descriptors;
- protocol errors (malformed or over-long request lines, bad headers) logged as one line
  naming the kind of error, at most once a minute per kind, and answered without echoing
  the request: the request line can carry `?token=`.
"""

from __future__ import annotations

import asyncio
import resource
import time
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from loguru import logger

from service.config import Settings

_FD_RESERVE = 64  # descriptors left for database, broker and log files
_BACKLOG = 128  # listen() backlog, and the most sockets asyncio accepts in one burst
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 25\r\nConnection: close\r\n\r\ntoo many open connections"
)


def handler_args(settings: Settings) -> dict[str, Any]:
    """RequestHandler options of every server of the app (TestServer included)."""
    return {
        # The keep-alive timer runs from connection start: it is the header timeout.
        "keepalive_timeout": settings.http_header_timeout,
        # Bodies are inflated by `handlers.body` within the size limit, never by the parser.
        "auto_decompress": False,
        # A refused request's unread body is drained for at most this long.
        "lingering_time": 2.0,
    }


class OncePer:
    """Lets one log line per key through per `seconds`."""

    def __init__(self, seconds: float = 60.0) -> None:
        self._seconds = seconds
        self._last: dict[str, float] = {}

    def __call__(self, key: str) -> bool:
        now = time.monotonic()
        if now - self._last.get(key, -self._seconds) < self._seconds:
            return False
        self._last[key] = now
        return True


class _QuietHandler(RequestHandler):
    """aiohttp's protocol, with one-line, content-free error logging and bodies, and a
    deadline for the first request head of its own (aiohttp 3.14 starts its keep-alive
    timer with the connection, its main branch does not)."""

    __slots__ = ("_head_timer", "_once")

    def __init__(self, manager: web.Server, *, once: OncePer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._once = once
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._head_timer = asyncio.get_running_loop().call_later(
            self.keepalive_timeout, self._head_overdue
        )

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        super().connection_lost(exc)

    def _head_overdue(self) -> None:
        self._head_timer = None
        if self._request_count == 0:  # no complete request head yet
            self.force_close()

    def log_exception(self, *args: Any, **kw: Any) -> None:
        exc = kw.get("exc_info")
        kind = type(exc).__name__ if isinstance(exc, BaseException) else "error"
        if self._once(kind):
            logger.warning("HTTP request refused by the protocol parser: {}", kind)

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        # The parser's message quotes the offending request line: answer with the phrase.
        return super().handle_error(request, status, exc, HTTPStatus(status).phrase)


class _Refuse(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(_BUSY)
        transport.close()


class _Gate:
    """Protocol factory: a quiet handler while under the cap, else a 503 and close."""

    def __init__(self, server: web.Server, cap: int) -> None:
        self._server = server
        self._cap = cap
        self._once = OncePer()

    def __call__(self) -> asyncio.BaseProtocol:
        if len(self._server.connections) >= self._cap:
            if self._once("cap"):
                logger.warning(
                    "{} open HTTP connections (HTTP_MAX_CONNECTIONS): refusing new ones", self._cap
                )
            return _Refuse()
        # Server.__call__ builds a plain RequestHandler from these same options.
        options: dict[str, Any] = self._server._kwargs
        return _QuietHandler(
            self._server, once=self._once, loop=asyncio.get_running_loop(), **options
        )


def connection_cap(configured: int) -> int:
    """HTTP_MAX_CONNECTIONS, lowered to fit the process's open-file limit (asyncio accepts
    up to a backlog of sockets in one go, before any can be refused)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    fitting = max(16, soft - _FD_RESERVE - _BACKLOG)
    if fitting < configured:
        logger.warning(
            "HTTP_MAX_CONNECTIONS lowered from {} to {} to fit the open-file limit ({})",
            configured,
            fitting,
            soft,
        )
        return fitting
    return configured


class GuardedRunner(web.AppRunner):
    """AppRunner whose sites accept connections through `_Gate`."""

    def __init__(self, app: web.Application, *, max_connections: int, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._max_connections = max_connections
        self._gate: _Gate | None = None

    @property
    def server(self) -> Any:  # the sites only call it as a protocol factory
        inner = super().server
        if inner is None:
            return None
        if self._gate is None:
            self._gate = _Gate(inner, connection_cap(self._max_connections))
        return self._gate


async def start_site(app: web.Application, settings: Settings) -> web.AppRunner:
    """Serve `app` on HOST:PORT with the limits above; `cleanup()` the runner to stop."""
    runner = GuardedRunner(
        app, max_connections=settings.http_max_connections, access_log=None, handle_signals=False
    )
    await runner.setup()
    _quiet_accept_errors(asyncio.get_running_loop())
    await web.TCPSite(runner, settings.host, settings.port, backlog=_BACKLOG).start()
    return runner


async def start_local(app: web.Application) -> tuple[web.AppRunner, int]:
    """Serve `app` on a free port of 127.0.0.1 (demo, benchmarks): the runner and the port."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, int(runner.addresses[0][1])


def _quiet_accept_errors(loop: asyncio.AbstractEventLoop) -> None:
    """asyncio reports every failed accept() (EMFILE, ENFILE, ENOBUFS) as an ERROR with a
    traceback, many a second under a flood: one line a minute is enough."""
    once = OncePer()
    previous = loop.get_exception_handler()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        message = str(context.get("message", ""))
        if "socket.accept() out of system resource" in message:
            if once("accept"):
                exc = context.get("exception")
                logger.warning("accepting connections paused: {}", exc or message.split("\n")[0])
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
