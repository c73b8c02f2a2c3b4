"""HTTP server limits of `crm-backend serve` as a real process, and of the CSV export.

Slow or silent clients are cut off, the number of open connections stays under the
process's file limit so `/health` keeps answering, parser errors are one short log line
that never carries the request line (which may hold `?token=`).
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.conftest import ROOT
from tests.rest_support import AUTH, Api, insert_leads, lead_values, open_api
from tests.test_serve_process import WEBHOOK_TOKEN, free_port, service_env


class Served:
    def __init__(self, proc: asyncio.subprocess.Process, port: int) -> None:
        self.proc = proc
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.output = b""

    async def health(self, timeout: float = 5.0) -> int:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http:
            async with http.get(f"{self.base}/health") as resp:
                return resp.status

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)


@contextlib.asynccontextmanager
async def serve_process(
    evolution_dsn: str, results_dsn: str, *, nofile: int | None = None, **env_extra: str
) -> AsyncIterator[Served]:
    port = free_port()
    env = service_env(port, evolution_dsn, results_dsn, LOG_LEVEL="INFO", **env_extra)

    def limit_files() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        "serve",
        env=env,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        preexec_fn=limit_files,
    )
    served = Served(proc, port)
    try:
        for _ in range(150):
            try:
                if await served.health() == 200:
                    break
            except (aiohttp.ClientError, TimeoutError):
                await asyncio.sleep(0.2)
        else:
            raise AssertionError("server did not come up")
        yield served
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 30)
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        assert proc.stdout is not None
        served.output = await proc.stdout.read()


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """True when the server closes the connection (EOF) within `seconds`."""
    try:
        while await asyncio.wait_for(reader.read(4096), seconds):
            pass
    except TimeoutError:
        return False
    except ConnectionError:
        return True
    return True


async def test_slow_request_heads_are_cut_off(evolution_dsn: str, results_dsn: str) -> None:
    async with serve_process(evolution_dsn, results_dsn, HTTP_HEADER_TIMEOUT="1") as served:
        silent = await served.connect()  # sends nothing at all
        dripping = await served.connect()
        dripping[1].write(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        for reader, writer in (silent, dripping):
            writer.write(b"X-Slow: 1\r\n") if reader is dripping[0] else None
            assert await closed_within(reader, 8), "connection still open"
            writer.close()
        assert time.monotonic() - started < 8
        assert await served.health() == 200


async def test_slow_bodies_get_408(evolution_dsn: str, results_dsn: str) -> None:
    async with serve_process(evolution_dsn, results_dsn, HTTP_BODY_TIMEOUT="1") as served:
        reader, writer = await served.connect()
        writer.write(
            f"POST /webhooks/evolution?token={WEBHOOK_TOKEN} HTTP/1.1\r\nHost: x\r\n"
            'Content-Type: application/json\r\nContent-Length: 5000\r\n\r\n{"a":'.encode()
        )
        answer = await asyncio.wait_for(reader.read(4096), 8)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 408"), answer[:100]


async def test_connection_cap_keeps_the_process_answering(
    evolution_dsn: str, results_dsn: str
) -> None:
    async with serve_process(
        evolution_dsn, results_dsn, nofile=256, HTTP_HEADER_TIMEOUT="3"
    ) as served:
        held = []
        for _ in range(400):  # more than the process has descriptors
            with contextlib.suppress(OSError, TimeoutError):
                held.append(await asyncio.wait_for(served.connect(), 2))
        await asyncio.sleep(0.5)
        # A new connection gets an answer at once (503 while the cap is reached), never a
        # hang; once the idle ones time out, /health is 200 again.
        reader, writer = await asyncio.wait_for(served.connect(), 5)
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        first = await asyncio.wait_for(reader.read(4096), 5)
        writer.close()
        assert first.startswith((b"HTTP/1.1 503", b"HTTP/1.1 200")), first[:80]
        await asyncio.sleep(4)
        assert await served.health() == 200
        for _, w in held:
            w.close()
    log = served.output.decode(errors="replace")
    assert "Too many open files" not in log
    assert log.count("HTTP_MAX_CONNECTIONS") <= 3, log[-2000:]


async def test_over_long_url_with_token_is_neither_echoed_nor_logged(
    evolution_dsn: str, results_dsn: str
) -> None:
    secret = "s3cr3t" + uuid.uuid4().hex
    async with serve_process(evolution_dsn, results_dsn) as served:
        answers = []
        for path in (f"/webhooks/evolution?token={secret}&x={'a' * 9000}", f"/\x01?token={secret}"):
            reader, writer = await served.connect()
            writer.write(f"POST {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode("latin-1"))
            answers.append(await asyncio.wait_for(reader.read(65536), 5))
            writer.close()
    for answer in answers:
        assert answer.split(b"\r\n", 1)[0].endswith(b" 400 Bad Request"), answer[:100]
        assert secret.encode() not in answer and len(answer) < 1000
    log = served.output.decode(errors="replace")
    assert secret not in log
    assert log.count("refused by the protocol parser") <= 2


# -- CSV export: bounded sends, bounded concurrency ----------------------------------------
@pytest.fixture
async def export_api(results_dsn: str, account: uuid.UUID) -> AsyncIterator[Api]:
    async with open_api(
        "postgres", results_dsn, account, export_max_concurrent=1, export_send_timeout=1
    ) as api:
        # Enough rows that a client that never reads fills every buffer on the way.
        await insert_leads(
            results_dsn,
            [lead_values(account, i, next_message="Здравствуйте! " * 60) for i in range(6000)],
        )
        yield api


async def test_csv_export_cap_and_send_timeout(export_api: Api) -> None:
    client: Any = export_api.client
    path = f"/dialogs/export-csv?userAccountId={export_api.account}"
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {AUTH['Authorization']}\r\n\r\n".encode()
    )
    await writer.drain()
    await asyncio.sleep(0.5)  # the export is running and blocked on this reader
    params = {"userAccountId": str(export_api.account)}
    status, body = await export_api.call("GET", "/dialogs/export-csv", params=params)
    assert status == 503 and "EXPORT_MAX_CONCURRENT" in body["error"]
    # The silent reader is dropped after EXPORT_SEND_TIMEOUT (reading now would unblock
    # it: wait first); exports work again.
    await asyncio.sleep(3)
    assert await closed_within(reader, 10), "the stalled export is still open"
    writer.close()
    status, text = await export_api.call("GET", "/dialogs/export-csv", params=params)
    assert status == 200 and text.count("\n") == 6001
