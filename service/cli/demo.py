"""`crm-backend demo`: the whole event-driven path on local services, in one command.

Builds an Evolution-shaped database holding nothing, maps a demo instance to a demo
account, starts intake and consumer in this process, replays every sample dialog message as
an Evolution webhook in time order (compressed: Evolution stores each message, then posts
it), waits until every contact's lead is current, and prints the leads.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import sys
import time
import uuid
from datetime import datetime
from importlib import resources
from typing import Any, TextIO
from urllib.parse import urlsplit

import aiohttp
import asyncpg
import msgspec

from service.adapters.stores.base import LeadQuery
from service.config import Settings
from service.domain.dialog import jid_of
from service.domain.lead import LeadRow

DEMO_INSTANCE = "demo"
DEMO_ACCOUNT = uuid.uuid5(uuid.NAMESPACE_URL, "crm-backend/demo-account")
DEMO_EVOLUTION_DB = "crm_demo_evolution"


def load_sample_dialogs() -> list[dict[str, Any]]:
    text = resources.files("service").joinpath("demo_data/dialogs.json").read_text("utf-8")
    data: list[dict[str, Any]] = json.loads(text)
    return data


def webhook_bodies(dialogs: list[dict[str, Any]], instance: str) -> list[dict[str, Any]]:
    """Every message of every dialog as an Evolution `messages.upsert` body, oldest first."""
    bodies: list[tuple[int, int, dict[str, Any]]] = []
    for item in dialogs:
        phone = item["contact"]["phone"]
        for index, message in enumerate(item["messages"]):
            ts = int(datetime.fromisoformat(message["ts"].replace("Z", "+00:00")).timestamp())
            from_me = bool(message["from_me"])
            body = {
                "event": "messages.upsert",
                "instance": instance,
                "destination": "",
                "date_time": message["ts"],
                "sender": "",
                "server_url": "",
                "apikey": None,
                "data": {
                    "key": {
                        "remoteJid": jid_of(phone),
                        "fromMe": from_me,
                        "id": f"DEMO{item['id'].upper().replace('-', '')}M{index:03d}",
                    },
                    "pushName": "Você" if from_me else item["contact"].get("push_name"),
                    "status": "SERVER_ACK" if from_me else "DELIVERY_ACK",
                    "message": {"conversation": message["text"]},
                    "contextInfo": None,
                    "messageType": "conversation",
                    "messageTimestamp": ts,
                    "instanceId": f"inst-{instance}",
                    "source": "web" if from_me else "android",
                },
            }
            bodies.append((ts, len(bodies), body))
    bodies.sort(key=lambda item: (item[0], item[1]))
    return [body for _, _, body in bodies]


def _with_database(dsn: str, name: str) -> str:
    """`dsn` with another database name; keeps a socket form such as `postgresql:///crm`."""
    parts = urlsplit(dsn)
    # urlunsplit drops the `//` of an empty host, and libpq then reads the path as a host.
    query = f"?{parts.query}" if parts.query else ""
    fragment = f"#{parts.fragment}" if parts.fragment else ""
    return f"{parts.scheme}://{parts.netloc}/{name}{query}{fragment}"


async def _fresh_evolution_db(settings: Settings, name: str) -> str:
    """A new, empty Evolution-shaped database next to the results database."""
    from service.adapters.evolution.seed import create_schema

    server = settings.results_database_url
    admin = await asyncpg.connect(_with_database(server, "postgres"))
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    dsn = _with_database(server, name)
    await create_schema(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            'INSERT INTO "Instance" (id, name, "connectionStatus", "updatedAt") '
            "VALUES ($1, $2, 'open', now())",
            f"inst-{DEMO_INSTANCE}",
            DEMO_INSTANCE,
        )
    finally:
        await conn.close()
    return dsn


async def run_demo(
    settings: Settings,
    out: TextIO = sys.stdout,
    speed: float = 0.005,
    evolution_db: str = DEMO_EVOLUTION_DB,
) -> list[LeadRow]:
    """Run the demo; returns the leads it printed. `speed` = seconds between messages."""

    from consumers.contacts import ContactConsumer
    from consumers.outbox import OutboxDrainer
    from handlers.http_app import make_app
    from handlers.server import start_local
    from service.adapters.evolution.seed import insert_webhook_message
    from service.adapters.stores.migrations import apply_migrations
    from service.bootstrap.builders import app_context

    if settings.uses_supabase():
        raise RuntimeError("the demo runs on local services: unset SUPABASE_URL for it")
    say = _printer(out)
    say("preparing a local Evolution database and the results tables ...")
    evolution_dsn = await _fresh_evolution_db(settings, evolution_db)
    await apply_migrations(settings.results_database_url)
    webhook_token = settings.webhook_token or secrets.token_urlsafe(32)
    demo = msgspec.structs.replace(
        settings,
        evolution_database_url=evolution_dsn,
        evolution_db_schema="public",
        amqp_prefix=f"{settings.amqp_prefix}.demo",
        webhook_token=webhook_token,
        api_token=settings.api_token or secrets.token_urlsafe(32),
        debounce_seconds=1.0,
        queue_shards=4,
    )
    dialogs = load_sample_dialogs()
    bodies = webhook_bodies(dialogs, DEMO_INSTANCE)
    async with app_context(demo) as ctx:
        store = ctx.store
        await store.add_instance(DEMO_INSTANCE, DEMO_ACCOUNT)
        consumer = ContactConsumer(ctx)
        await consumer.start()
        drainer = OutboxDrainer(ctx)  # the lead events, as `run` publishes them
        await drainer.start()
        runner, port = await start_local(make_app(ctx))
        url = f"http://127.0.0.1:{port}/webhooks/evolution?token={webhook_token}"
        say(
            f"replaying {len(bodies)} messages of {len(dialogs)} dialogs as Evolution webhooks "
            f"(analyzer: {ctx.pipeline.analyzer_name}) ..."
        )
        started = time.monotonic()
        evo = await asyncpg.connect(evolution_dsn)
        try:
            async with aiohttp.ClientSession() as http:
                for body in bodies:
                    await insert_webhook_message(evo, body)  # Evolution stores, then posts
                    async with http.post(url, json=body) as resp:
                        if resp.status != 200:
                            raise RuntimeError(
                                f"webhook refused: {resp.status} {await resp.text()}"
                            )
                    if speed:
                        await asyncio.sleep(speed)
        finally:
            await evo.close()
        expected = _expected_last_ids(bodies)
        await _wait_current(store, expected, limit_s=120)
        while not await consumer.idle():  # noqa: ASYNC110 - polls two sources of work
            await asyncio.sleep(0.1)
        elapsed = time.monotonic() - started
        rows, _ = await store.query_leads(LeadQuery(user_account_id=DEMO_ACCOUNT, limit=1000))
        await drainer.stop()
        await consumer.stop()
        await runner.cleanup()
    _print_table(rows, out)
    hot = sum(1 for r in rows if r.interest_level == "hot")
    warm = sum(1 for r in rows if r.interest_level == "warm")
    say(
        f"\n{len(rows)} leads ({hot} hot, {warm} warm) from {len(bodies)} webhooks "
        f"in {elapsed:.1f}s.\n"
        "Where to look next (after `make run`):\n"
        f"  curl -H 'Authorization: Bearer $API_TOKEN' "
        f"'http://localhost:{settings.port}/dialogs/analysis?userAccountId={DEMO_ACCOUNT}&instanceName={DEMO_INSTANCE}'\n"
        f"  curl -H 'Authorization: Bearer $API_TOKEN' 'http://localhost:{settings.port}/dialogs/stats?userAccountId={DEMO_ACCOUNT}'\n"
        f"  curl -H 'Authorization: Bearer $API_TOKEN' 'http://localhost:{settings.port}/metrics'\n"
        f"  API docs: http://localhost:{settings.port}/docs   (API_TOKEN is in .env)"
    )
    return rows


def _printer(out: TextIO) -> Any:
    def say(text: str) -> None:
        print(text, file=out, flush=True)

    return say


def _expected_last_ids(bodies: list[dict[str, Any]]) -> dict[str, str]:
    last: dict[str, str] = {}
    for body in bodies:
        phone = body["data"]["key"]["remoteJid"].split("@", 1)[0]
        last[phone] = body["data"]["key"]["id"]
    return last


async def _wait_current(store: Any, expected: dict[str, str], limit_s: float) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        rows, _ = await store.query_leads(LeadQuery(user_account_id=DEMO_ACCOUNT, limit=1000))
        current = {
            r.contact_phone for r in rows if expected.get(r.contact_phone) == r.last_message_id
        }
        if current >= set(expected):
            return
        await asyncio.sleep(0.25)
    raise RuntimeError("demo leads did not become current in time: is the consumer running?")


def _print_table(rows: list[LeadRow], out: TextIO) -> None:
    headers = ("contact", "name", "niche", "stage", "score", "interest")
    lines = [
        (
            r.contact_phone,
            (r.contact_name or "")[:14],
            r.niche or "",
            r.funnel_stage or "",
            str(r.score if r.score is not None else ""),
            r.interest_level or "",
        )
        for r in rows
    ]
    widths = [
        max(len(h), *(len(line[i]) for line in lines)) if lines else len(h)
        for i, h in enumerate(headers)
    ]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    print(fmt.format(*headers), file=out)
    print("  ".join("-" * w for w in widths), file=out)
    for line in lines:
        print(fmt.format(*line), file=out)
    with contextlib.suppress(Exception):
        out.flush()
