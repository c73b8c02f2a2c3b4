"""Scale-out: a backlog drained by 1, 2 and 4 `consume` processes sharing the shards.

Each run starts N real `crm-backend consume` processes (own queues, QUEUE_SHARDS=32),
waits until they have split the shards between them (each reports its share), then
publishes a backlog of contacts at once and times until every contact's row is stored.
The analyzer is an OpenAI-compatible server answering after 200 ms, so the work is I/O
bound, as with a real model. Speed-ups are against the 1-process run of the same call.

    python -m bench scaleout [-- --contacts 1600 --latency 0.2 --amqp-url URL]

Targets: >= 1.8x with 2 processes, >= 3x with 4. The backlog is large enough (about 45 s
for one process) that the speed-up is the drain rate's, not the first half second of a
burst: the timeline printed under each run shows the ramp and the tail apart.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import secrets
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import asyncpg
import msgspec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._databases import create_database, drop_database  # noqa: E402
from bench._databases import dsn as _dsn  # noqa: E402
from service.config import Settings, load_settings  # noqa: E402

_SHARE = re.compile(r"consuming (\d+) of (\d+) shard queues \((\d+) consume processes\)")
TARGETS = {2: 1.8, 4: 3.0}
# Shares of the backlog stored, reported as a timeline: a ramp or a tail shows there.
_MARKS = (0.01, 0.25, 0.5, 0.75, 0.9, 1.0)


class _Process:
    """One `consume` process, with its latest reported share of the shards."""

    def __init__(self, env: dict[str, str]) -> None:
        self.share = (0, 0)  # (shards, processes it knows of)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service", "consume"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            match = _SHARE.search(line)
            if match:
                self.share = (int(match.group(1)), int(match.group(3)))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _env(settings: Settings) -> dict[str, str]:
    from tests.harness import settings_env

    env = settings_env(settings)
    env["LOG_LEVEL"] = "INFO"  # each process reports its share of the shards
    env["LOG_FORMAT"] = "json"
    return env


async def _run(
    base: Settings, processes: int, contacts: int, res_dsn: str, timeline: dict[float, float]
) -> float:
    from service.adapters.broker.envelope import QueuedEvent
    from service.adapters.broker.publisher import EventPublisher
    from tests.harness import declare_topology, delete_topology

    settings = msgspec.structs.replace(base, amqp_prefix=f"bench.so.{secrets.token_hex(4)}")
    await declare_topology(settings)
    procs = [_Process(_env(settings)) for _ in range(processes)]
    try:
        deadline = time.monotonic() + 90
        while not (
            all(p.share[1] == processes for p in procs)
            and sum(p.share[0] for p in procs) == settings.queue_shards
        ):
            if time.monotonic() > deadline:
                raise RuntimeError(f"no fair split: {[p.share for p in procs]}")
            if any(p.proc.poll() is not None for p in procs):
                raise RuntimeError("a consume process exited")
            await asyncio.sleep(0.2)
        run = secrets.token_hex(3)
        events = [
            QueuedEvent(
                event="messages.upsert",
                instance="bench",
                message_id=f"BENCHSO{run}{n:06d}",
                remote_jid=f"7705{processes}{n:06d}@s.whatsapp.net",
                phone_jid=f"7705{processes}{n:06d}@s.whatsapp.net",
                from_me=False,
                timestamp=int(time.time()) - 60,
                message_type="conversation",
                text="Здравствуйте, у нас клиника, я владелец",
                push_name="Bench",
            )
            for n in range(contacts)
        ]
        publisher = EventPublisher(settings)
        pool = await asyncpg.create_pool(res_dsn, min_size=1, max_size=2)
        try:
            # Connected before the clock starts: the drain is timed, not the bench's own
            # publisher connecting.
            if not await publisher.ping():
                raise RuntimeError("RabbitMQ is not reachable for publishing")
            started = time.perf_counter()
            await asyncio.gather(
                *(publisher.publish(events[i : i + 50]) for i in range(0, contacts, 50))
            )
            prefix = f"7705{processes}%"
            marks: dict[float, float] = {}
            while True:
                done = await pool.fetchval(
                    "SELECT count(*) FROM dialog_analysis WHERE contact_phone LIKE $1 "
                    "AND analyzer IS NOT NULL",
                    prefix,
                )
                elapsed = time.perf_counter() - started
                for share in _MARKS:
                    if done >= share * contacts and share not in marks:
                        marks[share] = elapsed
                if done >= contacts:
                    timeline.update(marks)
                    return elapsed
                if time.perf_counter() - started > 300:
                    raise RuntimeError(f"only {done} of {contacts} stored")
                await asyncio.sleep(0.05)
        finally:
            await publisher.close()
            await pool.close()
    finally:
        for p in procs:
            p.stop()
        await delete_topology(settings)


async def _bench(args: argparse.Namespace) -> int:
    from service.adapters.evolution.seed import create_instance, create_schema
    from service.adapters.stores.factory import open_store
    from service.adapters.stores.migrations import apply_migrations
    from service.domain.facts import empty_facts
    from tests.fakes.openai_server import FakeOpenAI

    suffix = secrets.token_hex(4)
    evo, res = f"bench_so_evo_{suffix}", f"bench_so_res_{suffix}"
    await create_database(evo)
    await create_database(res)
    answer = msgspec.structs.replace(empty_facts("qualified"), niche="medicine", is_owner=True)
    try:
        await create_schema(_dsn(evo))
        await create_instance(_dsn(evo), "bench", instance_id="inst-bench")
        await apply_migrations(_dsn(res))
        async with FakeOpenAI(latency=args.latency, facts=lambda _d: answer) as fake:
            env = {
                "EVOLUTION_DATABASE_URL": _dsn(evo),
                "RESULTS_DATABASE_URL": _dsn(res),
                "AMQP_PREFIX": "bench.so",
                "ANALYZER": "openai",
                "OPENAI_API_KEY": "sk-bench",
                "OPENAI_BASE_URL": fake.base_url,
                "OPENAI_MAX_RETRIES": "0",
                "DEBOUNCE_SECONDS": "0",
                "MIN_INCOMING": "1",
                "QUEUE_SHARDS": "32",
                "ANALYSIS_CONCURRENCY": str(args.concurrency),
            }
            if args.amqp_url:
                env["AMQP_URL"] = args.amqp_url
            settings = load_settings(env, dotenv=None)
            store = await open_store(settings)
            try:
                await store.add_instance("bench", uuid.uuid4())
            finally:
                await store.close()
            print(
                f"scale-out: {args.contacts} contacts backlog, analyzer latency "
                f"{args.latency * 1000:.0f} ms, ANALYSIS_CONCURRENCY={args.concurrency}, "
                f"QUEUE_SHARDS=32"
            )
            baseline = 0.0
            failed = False
            for n in (1, 2, 4):
                timeline: dict[float, float] = {}
                seconds = await _run(settings, n, args.contacts, _dsn(res), timeline)
                if n == 1:
                    baseline = seconds
                speedup = baseline / seconds
                verdict = ""
                if n in TARGETS:
                    met = speedup >= TARGETS[n]
                    failed = failed or not met
                    verdict = f"  target >= {TARGETS[n]}x: {'met' if met else 'NOT met'}"
                print(
                    f"  {n} process{'es' if n > 1 else '  '}: {seconds:6.2f} s  "
                    f"{args.contacts / seconds:6.1f} contacts/s  {speedup:4.2f}x{verdict}"
                )
                print(
                    "      stored: "
                    + "  ".join(f"{share:.0%} at {timeline[share]:.2f}s" for share in _MARKS)
                )
        return 1 if failed and args.strict else 0
    finally:
        await drop_database(evo)
        await drop_database(res)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench scaleout")
    parser.add_argument("--contacts", type=int, default=1600)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--amqp-url", default=os.environ.get("BENCH_AMQP_URL", ""))
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(_bench(_parse(argv)))


if __name__ == "__main__":
    sys.exit(main())
