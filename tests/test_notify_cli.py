"""`crm-backend notify add/list/remove` on both results stores, and deliveries made by a
real `consume` process (no other worker started)."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from service.adapters.stores.postgres import PostgresStore
from service.config import Settings
from tests.fakes.postgrest_server import SERVICE_KEY, running_postgrest
from tests.harness import settings_env
from tests.test_webhooks_out import ANY, publish_event
from tests.webhook_receiver import Receiver, running_receiver

ROOT = Path(__file__).parent.parent


async def notify(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.isupper() or k in ("PATH", "HOME")}
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "service", "notify", *args],
        env={**base, **env, "PYTHONPATH": str(ROOT), "LOG_LEVEL": "WARNING"},
        cwd=ROOT / "tests",  # no .env here
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def round_trip(env: dict[str, str], account: uuid.UUID) -> None:
    added = await notify(
        "add", "http://127.0.0.1:5678/webhook/lead", "--account", str(account),
        "--events", "lead.hot", env=env,
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    endpoint_id, secret = added.stdout.split()
    uuid.UUID(endpoint_id)
    assert secret.startswith("whsec_") and len(base64.b64decode(secret[6:])) >= 24
    assert "shown only now" in added.stderr
    every = await notify("add", "https://relay.example.com/tg", "--account", str(account), env=env)
    assert every.returncode == 0, every.stderr
    every_id = every.stdout.split()[0]

    listed = await notify("list", env=env)
    assert listed.returncode == 0, listed.stderr
    assert secret not in listed.stdout and secret[6:] not in listed.stdout
    rows = {line.split("\t")[0]: line.split("\t") for line in listed.stdout.splitlines()}
    assert rows[endpoint_id][1:4] == [
        str(account),
        "http://127.0.0.1:5678/webhook/lead",
        "lead.hot",
    ]
    assert rows[endpoint_id][4] == secret[:10] + "…"
    assert rows[every_id][3] == "*"  # every event
    other = await notify("list", "--account", str(uuid.uuid4()), env=env)
    assert other.returncode == 0 and other.stdout == ""

    removed = await notify("remove", endpoint_id, env=env)
    assert removed.returncode == 0 and removed.stdout.strip() == f"removed {endpoint_id}"
    listed = await notify("list", "--account", str(account), env=env)
    assert [line.split("\t")[0] for line in listed.stdout.splitlines()] == [every_id]
    again = await notify("remove", endpoint_id, env=env)
    assert again.returncode == 2 and again.stderr.count("\n") == 1, again.stderr

    for bad in (["ftp://x/y"], ["http://h/x", "--events", "lead.cold"]):
        refused = await notify("add", *bad, "--account", str(account), env=env)
        assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
        assert refused.stderr.startswith("crm-backend: error: cannot add")


async def test_notify_round_trip_on_postgres(results_dsn: str, account: uuid.UUID) -> None:
    await round_trip({"RESULTS_DATABASE_URL": results_dsn}, account)


async def test_notify_round_trip_on_supabase(results_dsn: str, account: uuid.UUID) -> None:
    async with running_postgrest(results_dsn) as server:
        await round_trip({"SUPABASE_URL": server.url, "SUPABASE_SERVICE_KEY": SERVICE_KEY}, account)


async def test_the_consume_process_delivers(service_settings: Settings, account: uuid.UUID) -> None:
    env = settings_env(service_settings)
    env.update({"LOG_LEVEL": "WARNING", "NOTIFY_RETRY_DELAYS": "0.3,0.6"})
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "consume"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    receiver: Receiver
    try:
        async with running_receiver() as receiver:
            store = await PostgresStore.open(service_settings.results_database_url)
            try:
                from service.usecases.webhook_endpoints import add_endpoint

                url = receiver.url_of("n8n")
                endpoint = await add_endpoint(store, ANY, account, url, None)
                receiver.secrets["n8n"] = endpoint.secret
            finally:
                await store.close()
            _, body = await publish_event(service_settings, "lead.stage_changed", account)
            await receiver.wait(lambda: receiver.accepted("n8n"), timeout=30, what="delivery")
            assert receiver.accepted("n8n")[0].body == body
            assert receiver.accepted("n8n")[0].verified
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = await asyncio.to_thread(proc.communicate, timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("consume did not stop on SIGTERM")
    assert proc.returncode == 0, err.decode()[-2000:]
