"""A real HTTP webhook receiver for tests: verifies every request with `standardwebhooks`.

Each endpoint is a path `/hook/<name>` with a script of answers (status, delay, headers),
used one per request; once the script is used up it answers 200. Every request is
recorded with whether its signature verified against the endpoint's secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from tests.harness import free_port_in

PORTS = range(19850, 19900)


@dataclass(frozen=True)
class Answer:
    status: int = 200
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Received:
    name: str
    webhook_id: str
    timestamp: int
    body: bytes
    verified: bool
    status: int  # what the receiver answered (or would have, for a timed-out request)
    at: float  # time.monotonic() on arrival


class Receiver:
    def __init__(self) -> None:
        self.secrets: dict[str, str] = {}
        self.scripts: dict[str, list[Answer]] = {}
        self.received: list[Received] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    def url_of(self, name: str) -> str:
        return f"{self.url}/hook/{name}"

    def of(self, name: str) -> list[Received]:
        return [r for r in self.received if r.name == name]

    def accepted(self, name: str) -> list[Received]:
        return [r for r in self.of(name) if 200 <= r.status < 300]

    async def wait(self, check: object, timeout: float = 15.0, what: str = "requests") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():  # type: ignore[operator]
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}: {self.received}")

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        body = await request.read()
        headers = {k: v for k, v in request.headers.items()}
        verified = True
        try:
            Webhook(self.secrets[name]).verify(body, headers)
        except (WebhookVerificationError, KeyError):
            verified = False
        script = self.scripts.get(name) or []
        answer = script.pop(0) if script else Answer()
        self.received.append(
            Received(
                name=name,
                webhook_id=request.headers.get("webhook-id", ""),
                timestamp=int(request.headers.get("webhook-timestamp", "0")),
                body=body,
                verified=verified,
                status=answer.status if answer.delay == 0 else 0,
                at=time.monotonic(),
            )
        )
        if answer.delay:
            index = len(self.received) - 1
            await asyncio.sleep(answer.delay)
            # Answered late: counted only if the sender still waits (slow, not timed out).
            transport = request.transport
            if transport is not None and not transport.is_closing():
                done = self.received[index]
                self.received[index] = Received(**{**done.__dict__, "status": answer.status})
        return web.Response(status=answer.status, headers=answer.headers)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook/{name}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        port = free_port_in(PORTS)
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@contextlib.asynccontextmanager
async def running_receiver() -> AsyncIterator[Receiver]:
    receiver = Receiver()
    await receiver.start()
    try:
        yield receiver
    finally:
        await receiver.close()
