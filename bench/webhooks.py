"""Outbound webhooks: deliveries per second and publish → receipt latency of one process.

N events are published as the outbox does (confirmed, to the events exchange) for one
account with E endpoints on a loopback receiver; one in-process fan-out + delivery worker
(what every `consume` process runs) delivers them. With `--slow 1`, one more endpoint
answers only after `--slow-seconds`: the other endpoints' latency should not change.

    python -m bench webhooks -- --events 500 --endpoints 4 --slow 1
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import time
import uuid
from datetime import UTC, datetime

import msgspec
from aiohttp import web

from bench._databases import create_database, drop_database
from consumers.webhooks import WebhookWorkers
from service.adapters.broker.confirm import publish_confirmed
from service.adapters.broker.connection import connect_once
from service.adapters.broker.topology import Topology
from service.adapters.stores.migrations import apply_migrations
from service.adapters.stores.postgres import PostgresStore
from service.adapters.webhooks_out.targets import TargetPolicy
from service.config import load_settings
from service.logs import setup_logging
from service.metrics import Metrics
from service.usecases.webhook_endpoints import add_endpoint

PORT = 19860


async def run(events: int, endpoints: int, slow: int, slow_seconds: float) -> None:
    name = f"crmb_{secrets.token_hex(4)}"
    dsn = await create_database(name)
    prefix = f"crmb.{secrets.token_hex(3)}"
    settings = load_settings(
        {
            "RESULTS_DATABASE_URL": dsn,
            "AMQP_PREFIX": prefix,
            "LOG_LEVEL": os.environ.get("BENCH_LOG_LEVEL", "ERROR"),
            "NOTIFY_ENDPOINT_CONCURRENCY": os.environ.get("NOTIFY_ENDPOINT_CONCURRENCY", "8"),
        },
        dotenv=None,
    )
    setup_logging(settings)
    received: dict[str, list[float]] = {}
    published: dict[str, float] = {}

    async def hook(request: web.Request) -> web.Response:
        body = await request.read()
        lead = msgspec.json.decode(body)["data"]["lead_id"]
        name = request.match_info["name"]
        if name.startswith("slow"):
            await asyncio.sleep(slow_seconds)
        received.setdefault(name, []).append(time.monotonic() - published[lead])
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook/{name}", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", PORT).start()
    await apply_migrations(dsn)
    store = await PostgresStore.open(dsn)
    metrics = Metrics()
    workers = WebhookWorkers(settings, store, metrics)
    connection = await connect_once(settings, "bench")
    try:
        await workers.start()
        account = uuid.uuid4()
        policy = TargetPolicy([], deny_private=False)
        names = [f"fast{i}" for i in range(endpoints)] + [f"slow{i}" for i in range(slow)]
        for hook_name in names:
            url = f"http://127.0.0.1:{PORT}/hook/{hook_name}"
            await add_endpoint(store, policy, account, url, None)
        channel = await connection.channel(publisher_confirms=True)
        exchange = Topology(settings).events_exchange
        started = time.monotonic()

        async def publish(i: int) -> None:
            lead = str(uuid.uuid4())
            body = msgspec.json.encode(
                {
                    "type": "lead.hot",
                    "timestamp": datetime.now(UTC).isoformat(),
                    "data": {"lead_id": lead, "account": str(account), "score": i},
                }
            )
            published[lead] = time.monotonic()
            await publish_confirmed(channel, exchange, "lead.hot", body, message_id=lead)

        for start in range(0, events, 50):
            await asyncio.gather(*(publish(i) for i in range(start, min(start + 50, events))))
        fast_total = events * endpoints
        while sum(len(received.get(n, [])) for n in names if n.startswith("fast")) < fast_total:
            await asyncio.sleep(0.02)
        elapsed = time.monotonic() - started
        fast = sorted(t for n in names if n.startswith("fast") for t in received[n])
        slow_done = sum(len(received.get(n, [])) for n in names if n.startswith("slow"))
        print(
            f"webhooks: {events} events x {endpoints} endpoints = {fast_total} deliveries in "
            f"{elapsed:.2f}s ({fast_total / elapsed:.0f}/s); publish→receipt p50 "
            f"{statistics.median(fast) * 1000:.0f} ms, p95 "
            f"{fast[int(len(fast) * 0.95) - 1] * 1000:.0f} ms"
            + (
                f"; {slow} slow endpoint(s) ({slow_seconds:g}s per answer) had "
                f"{slow_done}/{events * slow} by then"
                if slow
                else ""
            )
        )
        outcomes = {
            outcome: int(
                metrics.registry.get_sample_value(
                    "crm_notify_deliveries_total", {"outcome": outcome}
                )
                or 0
            )
            for outcome in ("sent", "failed", "deferred", "duplicate")
        }
        seconds = metrics.registry.get_sample_value("crm_notify_attempt_duration_seconds_sum")
        count = metrics.registry.get_sample_value("crm_notify_attempt_duration_seconds_count")
        mean = (seconds or 0) / (count or 1) * 1000
        print(f"webhooks: outcomes {outcomes}; mean attempt (POST and answer) {mean:.1f} ms")
    finally:
        await workers.stop()
        cleanup = await connection.channel()
        topology = Topology(settings)
        for queue in topology.all_queues():
            await cleanup.queue_delete(queue)
        for exchange_name in topology.all_exchanges():
            await cleanup.exchange_delete(exchange_name)
        await connection.close()
        await store.close()
        await runner.cleanup()
        await drop_database(name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench webhooks")
    parser.add_argument("--events", type=int, default=300)
    parser.add_argument("--endpoints", type=int, default=3)
    parser.add_argument("--slow", type=int, default=1)
    parser.add_argument("--slow-seconds", type=float, default=2.0)
    parser.add_argument("--endpoint-concurrency", type=int)
    args = parser.parse_args(argv or [])
    if args.endpoint_concurrency:
        os.environ["NOTIFY_ENDPOINT_CONCURRENCY"] = str(args.endpoint_concurrency)
    asyncio.run(run(args.events, args.endpoints, args.slow, args.slow_seconds))
    return 0
