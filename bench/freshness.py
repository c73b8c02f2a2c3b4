"""Freshness: time from the last webhook of a burst to the updated lead row.

Runs the real intake (aiohttp on a local port), RabbitMQ, the contact consumer and the
results store, with an OpenAI-compatible server answering after a fixed latency. Each
burst is 3 messages of one contact sent within ~100 ms; the clock starts when the last
webhook is answered and stops when the row holds that message. Several contacts burst at
once, as on a busy instance.

    python -m bench freshness [-- --bursts 40 --debounce 1 --latency 0.2]

Target: p95 <= DEBOUNCE_SECONDS + analyzer latency + 0.5 s. Printed as ratios against the
floor DEBOUNCE_SECONDS + latency (what no implementation can beat) measured in this run.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._databases import create_database, drop_database
from bench._databases import dsn as _dsn
from service.config import load_settings


def _body(phone: str, text: str, ts: int, msg_id: str) -> dict[str, Any]:
    return {
        "event": "messages.upsert",
        "instance": "bench",
        "data": {
            "key": {"remoteJid": f"{phone}@s.whatsapp.net", "fromMe": False, "id": msg_id},
            "pushName": "Bench",
            "message": {"conversation": text},
            "messageType": "conversation",
            "messageTimestamp": ts,
            "instanceId": "inst-bench",
            "source": "android",
        },
    }


async def _bench(args: argparse.Namespace) -> int:

    from consumers.contacts import ContactConsumer
    from handlers.http_app import make_app
    from handlers.server import start_local
    from service.adapters.evolution.seed import (
        create_instance,
        create_schema,
        insert_webhook_message,
    )
    from service.adapters.stores.migrations import apply_migrations
    from service.bootstrap.builders import app_context
    from service.domain.facts import empty_facts
    from service.logs import setup_logging
    from tests.fakes.openai_server import FakeOpenAI
    from tests.harness import delete_topology

    suffix = secrets.token_hex(4)
    evo, res = f"bench_fr_evo_{suffix}", f"bench_fr_res_{suffix}"
    await create_database(evo)
    await create_database(res)
    answer = msgspec.structs.replace(empty_facts("qualified"), niche="medicine", is_owner=True)
    settings = None
    try:
        await create_schema(_dsn(evo))
        await create_instance(_dsn(evo), "bench", instance_id="inst-bench")
        await apply_migrations(_dsn(res))
        async with FakeOpenAI(latency=args.latency, facts=lambda _d: answer) as fake:
            settings = load_settings(
                {
                    "EVOLUTION_DATABASE_URL": _dsn(evo),
                    "RESULTS_DATABASE_URL": _dsn(res),
                    "AMQP_PREFIX": f"bench.fr.{suffix}",
                    "WEBHOOK_TOKEN": "bench-webhook-token-0123456789abcdef012345",
                    "API_TOKEN": "bench-api-token-0123456789abcdef01234567",
                    "ANALYZER": "openai",
                    "OPENAI_API_KEY": "sk-bench",
                    "OPENAI_BASE_URL": fake.base_url,
                    "DEBOUNCE_SECONDS": str(args.debounce),
                    "LOG_LEVEL": "ERROR",
                },
                dotenv=None,
            )
            setup_logging(settings)
            async with app_context(settings) as ctx:
                await ctx.store.add_instance("bench", uuid.uuid4())
                consumer = ContactConsumer(ctx)
                await consumer.start()
                runner, port = await start_local(make_app(ctx))
                url = f"http://127.0.0.1:{port}/webhooks/evolution?token={settings.webhook_token}"
                evo_conn = await asyncpg.create_pool(_dsn(evo), min_size=1, max_size=args.parallel)
                res_conn = await asyncpg.create_pool(_dsn(res), min_size=1, max_size=args.parallel)
                lags: list[float] = []
                try:
                    async with aiohttp.ClientSession() as http:

                        async def burst(n: int) -> None:
                            phone = f"7703{n:07d}"
                            ts = int(time.time()) - 10
                            last_id = ""
                            for i, text in enumerate(
                                ["Здравствуйте, клиника", "Я владелец", "Бюджет 300к"]
                            ):
                                last_id = f"BENCH{suffix}{n:05d}{i}"
                                body = _body(phone, text, ts + i, last_id)
                                async with evo_conn.acquire() as conn:
                                    await insert_webhook_message(conn, body)
                                async with http.post(url, json=body) as resp:
                                    assert resp.status == 200, await resp.text()
                                await asyncio.sleep(0.03)
                            sent = time.perf_counter()
                            while True:
                                got = await res_conn.fetchval(
                                    "SELECT last_message_id FROM dialog_analysis "
                                    "WHERE contact_phone = $1 AND analyzer IS NOT NULL",
                                    phone,
                                )
                                if got == last_id:
                                    lags.append(time.perf_counter() - sent)
                                    return
                                await asyncio.sleep(0.01)

                        for start in range(0, args.bursts, args.parallel):
                            group = range(start, min(start + args.parallel, args.bursts))
                            await asyncio.wait_for(
                                asyncio.gather(*(burst(n) for n in group)), timeout=120
                            )
                finally:
                    await evo_conn.close()
                    await res_conn.close()
                    await consumer.stop()
                    await runner.cleanup()
        lags.sort()
        p50 = statistics.median(lags)
        p95 = lags[min(len(lags) - 1, int(len(lags) * 0.95))]
        floor = args.debounce + args.latency
        target = floor + 0.5
        print(
            f"freshness over {len(lags)} bursts ({args.parallel} contacts at once), "
            f"DEBOUNCE_SECONDS={args.debounce}, analyzer latency {args.latency}s"
        )
        print(
            f"  p50 {p50:.2f}s ({p50 / floor:.2f}x floor {floor:.2f}s)   "
            f"p95 {p95:.2f}s ({p95 / floor:.2f}x floor)   target p95 <= {target:.2f}s: "
            f"{'met' if p95 <= target else 'NOT met'}"
        )
        return 0
    finally:
        if settings is not None:
            await delete_topology(settings)
        await drop_database(evo)
        await drop_database(res)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench freshness")
    parser.add_argument("--bursts", type=int, default=40)
    parser.add_argument("--parallel", type=int, default=5)
    parser.add_argument("--debounce", type=float, default=1.0)
    parser.add_argument("--latency", type=float, default=0.2)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(_bench(_parse(argv)))


if __name__ == "__main__":
    sys.exit(main())
