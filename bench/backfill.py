"""Backfill throughput: the real pipeline against an OpenAI-compatible server at 200 ms.

Generates an Evolution database of 20,000 contacts (in SQL, seconds), starts an
OpenAI-compatible test server in a separate process that answers every call after a fixed
latency, and backfills through the real `openai` client and the real results store. Prints:

- dialogs/s against the ideal `concurrency / latency` (the baseline of this run);
- resident memory after a small and after a large part of the run (flat = the contact
  list is streamed, not loaded).

    python -m bench backfill [-- --contacts 20000 --dialogs 6000 --concurrency 32 --workers 1]

Target: >= 0.9 x ideal at concurrency 32. Databases and queues are dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import secrets
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._databases import create_database, drop_database
from bench._databases import dsn as _dsn
from bench._report import report
from bench.evolution_reader import _generate
from service.adapters.stores.migrations import apply_migrations
from service.bootstrap.builders import app_context
from service.config import load_settings
from service.usecases.backfill import BackfillOptions, BackfillStats, run_backfill
from service.usecases.backfill_workers import run_backfill_workers


def _rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        pages = int(statm.read().split()[1])
    return pages * 4096 / 2**20


def _serve_fake(latency: float, port_queue: Any) -> None:
    """Child process: the OpenAI-compatible server, so it does not share our CPU."""
    from service.domain.facts import empty_facts
    from tests.fakes.openai_server import FakeOpenAI

    # A fixed answer: the server's own work stays negligible next to its latency.
    answer = msgspec.structs.replace(
        empty_facts("qualified"), niche="medicine", is_owner=True, ad_budget="300k"
    )

    async def run() -> None:
        async with FakeOpenAI(latency=latency, facts=lambda _dialog: answer) as fake:
            port_queue.put(fake.base_url)
            while True:
                await asyncio.sleep(3600)

    asyncio.run(run())


async def _bench(args: argparse.Namespace, base_url: str) -> int:
    from service.adapters.evolution.seed import create_schema

    suffix = secrets.token_hex(4)
    evo_name, res_name = f"bench_bf_evo_{suffix}", f"bench_bf_res_{suffix}"
    await create_database(evo_name)
    await create_database(res_name)
    try:
        await create_schema(_dsn(evo_name))
        started = time.perf_counter()
        await _generate(_dsn(evo_name), "bench", args.contacts * 10, args.contacts)
        print(
            f"generated {args.contacts * 10:,} messages over {args.contacts:,} contacts "
            f"in {time.perf_counter() - started:.1f}s"
        )
        from service.adapters.evolution.index import apply_index

        # Per-contact reads need the expression index (`crm-backend evolution-index`).
        await apply_index(_dsn(evo_name), "public")
        await apply_migrations(_dsn(res_name))
        settings = load_settings(
            {
                "EVOLUTION_DATABASE_URL": _dsn(evo_name),
                "RESULTS_DATABASE_URL": _dsn(res_name),
                "ANALYZER": "openai",
                "OPENAI_API_KEY": "sk-bench",
                "OPENAI_BASE_URL": base_url,
                "LOG_LEVEL": "ERROR",
            },
            dotenv=None,
        )
        from service.logs import setup_logging

        setup_logging(settings)
        account = uuid.uuid4()
        async with app_context(settings) as ctx:
            pipeline = ctx.pipeline
            small = max(args.concurrency * 4, args.dialogs // 4)
            rss: dict[int, float] = {}
            stats = BackfillStats.zero()

            def progress(s: BackfillStats, _: int | None) -> None:
                done = s.analyzed + s.new_leads + s.errors + s.skipped
                if done in (small, args.dialogs) or done % 500 == 0:
                    rss[done] = _rss_mib()

            options = BackfillOptions(
                instance="bench",
                account=account,
                min_incoming=3,
                max_dialogs=args.dialogs,
                concurrency=args.concurrency,
            )
            t0 = time.perf_counter()
            if args.workers > 1:
                from service.bootstrap.builders import backfill_parts

                await run_backfill_workers(
                    settings,
                    ctx.reader,
                    options,
                    args.workers,
                    backfill_parts,
                    progress,
                    stats=stats,
                )
            else:
                await run_backfill(pipeline, ctx.reader, options, progress, stats=stats)
            elapsed = time.perf_counter() - t0
        ideal = args.concurrency / args.latency
        rate = stats.analyzed / elapsed
        print(
            f"backfill ({args.workers} process{'es' if args.workers > 1 else ''}): "
            f"{stats.analyzed:,} dialogs analysed ({stats.new_leads:,} new_lead rows, "
            f"{stats.errors} errors) in {elapsed:.1f}s"
        )
        print(
            f"  rate {rate:.1f} dialogs/s  vs ideal concurrency/latency = "
            f"{args.concurrency}/{args.latency}s = {ideal:.0f}/s  ->  ratio {rate / ideal:.2f}"
            f"  (target >= 0.90)"
        )
        report(
            "backfill",
            f"dialogs/s at concurrency {args.concurrency}, {args.workers} process(es)",
            value=f"{rate:.1f} dialogs/s",
            baseline=f"ideal concurrency/latency {ideal:.0f}/s",
            ratio=rate / ideal,
            target=">= 0.9x",
            met=rate / ideal >= 0.9,
        )
        points = sorted(rss)
        if len(points) >= 2:
            first, last = points[0], points[-1]
            print(
                f"  RSS {rss[first]:.0f} MiB after {first:,} contacts, {rss[last]:.0f} MiB after "
                f"{last:,}  ->  ratio {rss[last] / rss[first]:.2f} for {last / max(first, 1):.1f}x "
                "the contacts (flat = streamed)"
            )
        return 0 if stats.errors == 0 else 1
    finally:
        await drop_database(evo_name)
        await drop_database(res_name)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench backfill")
    parser.add_argument("--contacts", type=int, default=20_000)
    parser.add_argument("--dialogs", type=int, default=6_000, help="contacts to analyse")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument(
        "--workers", type=int, default=1, help="processes (`backfill --workers`), sharing it"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    ctx = multiprocessing.get_context("spawn")
    port_queue = ctx.Queue()
    server = ctx.Process(target=_serve_fake, args=(args.latency, port_queue), daemon=True)
    server.start()
    try:
        base_url = port_queue.get(timeout=30)
        return asyncio.run(_bench(args, base_url))
    finally:
        server.terminate()
        server.join(5)


if __name__ == "__main__":
    sys.exit(main())
