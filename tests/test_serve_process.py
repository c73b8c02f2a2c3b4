"""`crm-backend run` as a real process: up without a broker, answering what it can."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path

import aiohttp

ROOT = Path(__file__).parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


API_TOKEN = "api-token-0123456789abcdef0123456789ab"
WEBHOOK_TOKEN = "hook-token-0123456789abcdef0123456789a"


def service_env(port: int, evolution_dsn: str, results_dsn: str, **extra: str) -> dict[str, str]:
    """The environment of a service process on fresh databases, with no broker."""
    env = {k: v for k, v in os.environ.items() if not k.isupper() or k in ("PATH", "HOME")}
    env.update(
        {
            "PORT": str(port),
            "HOST": "127.0.0.1",
            "EVOLUTION_DATABASE_URL": evolution_dsn,
            "RESULTS_DATABASE_URL": results_dsn,
            "AMQP_URL": "amqp://guest:guest@127.0.0.1:5999/",  # nothing listens here
            "API_TOKEN": API_TOKEN,
            "WEBHOOK_TOKEN": WEBHOOK_TOKEN,
            "LOG_LEVEL": "WARNING",
            "PYTHONPATH": str(ROOT),
            **extra,
        }
    )
    return env


async def test_run_without_broker_serves_health_and_503(
    evolution_dsn: str, results_dsn: str
) -> None:
    port = free_port()
    env = service_env(port, evolution_dsn, results_dsn)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        "run",
        env=env,
        cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(100):
                try:
                    async with http.get(f"{base}/health") as resp:
                        assert await resp.json() == {"ok": True, "service": "crm-backend"}
                        break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.2)
            else:
                raise AssertionError("server did not come up")
            body = {
                "event": "messages.upsert",
                "instance": "clinic-sales",
                "data": {
                    "key": {"remoteJid": "77010000009@s.whatsapp.net", "fromMe": False, "id": "X1"},
                    "message": {"conversation": "Здравствуйте"},
                    "messageType": "conversation",
                    "messageTimestamp": 1759482845,
                },
            }
            async with http.post(
                f"{base}/webhooks/evolution?token={WEBHOOK_TOKEN}", json=body
            ) as resp:
                assert resp.status == 503
            async with http.get(
                f"{base}/ready",
                headers={"Authorization": f"Bearer {API_TOKEN}"},
            ) as resp:
                assert resp.status == 503
                assert "broker" in (await resp.text())
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), timeout=30)
        assert code == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
