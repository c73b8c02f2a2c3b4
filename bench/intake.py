"""Intake throughput: the real webhook endpoint against a bare aiohttp handler.

Both servers run in a process of their own (the machine has few cores: the load
generator must not share the server's). The intake server is the real app — auth,
decode, group-committed confirmed publishing to the real RabbitMQ — and the bare one
only reads the body. Load comes from wrk when installed (a Lua script makes every body a
distinct message), else from an aiohttp client with N connections and a fixed number of
requests. The two servers take turns for a few rounds (other load on the machine then
hits both alike) and the median round is reported, with each server's CPU time per
request. Afterwards every event the intake server counted as queued must be found in the
shard queues, which are then deleted.

    python -m bench.intake [--rounds 3] [--duration 5] [--concurrency 64]
                           [--requests 10000] [--tool auto|wrk|python]

Exit status 0 when intake reaches at least 0.6 x the bare rate and no event is missing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.synchronize import Event as EventType
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import msgspec
from aiohttp import web

from bench._databases import dsn
from bench._report import report
from bench._servers import server_process
from service.adapters.broker.envelope import decode_batch
from service.adapters.broker.topology import Topology
from service.config import Settings, load_settings

TOKEN = "bench-webhook-token-0123456789abcdef012345"
API_TOKEN = "bench-api-token-0123456789abcdef01234567"
PATH = "/webhooks/evolution"
TARGET_RATIO = 0.6
TEXT = "Здравствуйте! У нас стоматология в Алматы, хотим больше записей, бюджет 500 тыс"


@dataclass
class LoadResult:
    tool: str
    requests: int  # completed requests
    ok: int  # 200 answers
    errors: int  # other answers and socket errors
    seconds: float
    p50_ms: float
    p99_ms: float

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


# -- servers (each in its own process) --------------------------------------------------------
def _bare_app() -> web.Application:
    async def handler(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=b'{"ok":true}', content_type="application/json")

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post(PATH, handler)
    return app


async def _serve(kind: str, port: int, ready: EventType) -> None:
    from handlers.http_app import make_app
    from service.bootstrap.builders import app_context
    from service.logs import setup_logging

    settings = load_settings(dotenv=None)
    setup_logging(settings)
    stats = None
    async with contextlib.AsyncExitStack() as parts:
        if kind == "intake":
            # Built as `crm-backend serve` builds it (the databases are idle here).
            ctx = await parts.enter_async_context(app_context(settings))
            stats = ctx.publisher.stats
            app = make_app(ctx)
        else:
            app = _bare_app()
        # As `crm-backend serve` runs it: no aiohttp access log.
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        ready.set()
        await stop.wait()
        await runner.cleanup()
    if stats is not None:
        flushes = max(stats.flushes, 1)
        print(
            f"publisher: {stats.requests} requests in {stats.flushes} flushes "
            f"({stats.requests / flushes:.1f} requests, {stats.messages / flushes:.1f} AMQP "
            f"messages per flush, {stats.flush_seconds / flushes * 1000:.1f} ms from write to "
            f"confirm)",
            flush=True,
        )


def _server_main(kind: str, env: dict[str, str], port: int, ready: EventType) -> None:
    os.environ.update(env)
    asyncio.run(_serve(kind, port, ready))


def server(kind: str, env: dict[str, str]) -> Any:
    return server_process(_server_main, kind, env, name=kind)


# -- load ------------------------------------------------------------------------------------
def body(run: str, n: int) -> bytes:
    phone = f"7701{n % 1000:07d}"
    return msgspec.json.encode(
        {
            "event": "messages.upsert",
            "instance": "bench",
            "destination": "http://bench/webhooks/evolution",
            "date_time": "2026-10-03T09:14:06.512Z",
            "sender": "77015550101@s.whatsapp.net",
            "server_url": "https://evo.example.com",
            "apikey": None,
            "data": {
                "key": {"remoteJid": f"{phone}@s.whatsapp.net", "fromMe": False, "id": f"{run}{n}"},
                "pushName": "Клиент",
                "status": "DELIVERY_ACK",
                "message": {"conversation": TEXT},
                "contextInfo": None,
                "messageType": "conversation",
                "messageTimestamp": 1759482845 + n,
                "instanceId": "bench",
                "source": "android",
            },
        }
    )


async def python_load(
    base_url: str, run: str, requests: int, concurrency: int, max_seconds: float
) -> LoadResult:
    bodies = [body(run, n) for n in range(requests)]
    latencies: list[float] = []
    statuses: list[int] = []
    next_index = 0
    headers = {"Content-Type": "application/json", "X-Webhook-Token": TOKEN}
    deadline = time.perf_counter() + max_seconds

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal next_index
        while next_index < requests and time.perf_counter() < deadline:
            data = bodies[next_index]
            next_index += 1
            started = time.perf_counter()
            try:
                async with session.post(base_url + PATH, data=data, headers=headers) as resp:
                    await resp.read()
                    statuses.append(resp.status)
            except aiohttp.ClientError:
                statuses.append(0)
            latencies.append(time.perf_counter() - started)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    ok = statuses.count(200)
    return LoadResult(
        tool=f"python aiohttp client, {concurrency} connections",
        requests=len(statuses),
        ok=ok,
        errors=len(statuses) - ok,
        seconds=seconds,
        p50_ms=_percentile(latencies, 50) * 1000,
        p99_ms=_percentile(latencies, 99) * 1000,
    )


def _percentile(values: list[float], pct: int) -> float:
    if len(values) < 2:
        return values[0] if values else 0.0
    return statistics.quantiles(values, n=100, method="inclusive")[pct - 1]


_WRK_SCRIPT = """
local counter = 0
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-Webhook-Token"] = "%(token)s"
local template = %(template)s
function request()
  counter = counter + 1
  local n = tid * 100000000 + counter
  local phone = string.format("7701%%07d", n %% 1000)
  local body = string.format(template, phone, "%(run)s" .. n, 1759482845 + counter)
  return wrk.format(nil, "%(path)s", nil, body)
end
"""


def _wrk_template() -> str:
    sample = body("RUN", 0).decode()
    sample = sample.replace('"77010000000@s.whatsapp.net"', '"%s@s.whatsapp.net"')
    sample = sample.replace('"RUN0"', '"%s"').replace("1759482845", "%d", 1)
    return "[[" + sample + "]]"


def wrk_load(base_url: str, run: str, concurrency: int, seconds: float) -> LoadResult:
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "intake.lua"
        script.write_text(
            _WRK_SCRIPT % {"token": TOKEN, "template": _wrk_template(), "run": run, "path": PATH}
        )
        out = subprocess.run(
            [
                "wrk",
                "-t1",
                f"-c{concurrency}",
                f"-d{max(1, round(seconds))}s",
                "--latency",
                "-s",
                str(script),
                base_url,
            ],
            capture_output=True,
            text=True,
            timeout=seconds + 60,
            check=True,
        ).stdout
    total = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    if total is None:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    requests = int(total.group(1))
    elapsed = float(total.group(2)) * {"ms": 0.001, "s": 1.0, "m": 60.0}[total.group(3)]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    )
    errors = int(bad.group(1)) if bad else 0
    if socket_errors:
        errors += sum(int(g) for g in socket_errors.groups())
    return LoadResult(
        tool=f"wrk, 1 thread, {concurrency} connections",
        requests=requests,
        ok=requests - (int(bad.group(1)) if bad else 0),
        errors=errors,
        seconds=elapsed,
        p50_ms=_wrk_latency(out, "50%"),
        p99_ms=_wrk_latency(out, "99%"),
    )


def _wrk_latency(out: str, pct: str) -> float:
    match = re.search(rf"^\s+{re.escape(pct)}\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE)
    if match is None:
        return float("nan")
    return float(match.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[match.group(2)]


async def run_load(tool: str, base_url: str, run: str, args: argparse.Namespace) -> LoadResult:
    if tool == "wrk":
        return await asyncio.to_thread(wrk_load, base_url, run, args.concurrency, args.duration)
    return await python_load(base_url, run, args.requests, args.concurrency, args.max_seconds)


# -- the queue check ---------------------------------------------------------------------------
async def queued_metric(base_url: str) -> int:
    headers = {"Authorization": f"Bearer {API_TOKEN}"}
    async with (
        aiohttp.ClientSession() as session,
        session.get(base_url + "/metrics", headers=headers) as resp,
    ):
        text = await resp.text()
    match = re.search(
        r'^crm_webhook_events_total\{event="messages.upsert",outcome="queued"\} ([\d.e+]+)$',
        text,
        re.MULTILINE,
    )
    return int(float(match.group(1))) if match else 0


async def _take_all(channel: aio_pika.abc.AbstractChannel, name: str) -> list[bytes]:
    """Bodies of every message in a queue (shard queues refuse basic.get)."""
    queue = await channel.declare_queue(name, passive=True)
    expected = queue.declaration_result.message_count or 0
    bodies: list[bytes] = []
    if not expected:
        return bodies
    done = asyncio.Event()

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        bodies.append(message.body)
        if len(bodies) >= expected:
            done.set()

    tag = await queue.consume(on_message, no_ack=True)
    await asyncio.wait_for(done.wait(), 60)
    await queue.cancel(tag)
    return bodies


async def count_and_delete(settings: Settings) -> tuple[int, int, int]:
    """(events, distinct message ids, AMQP messages) in the shard queues; then delete all."""
    topology = Topology(settings)
    connection = await aio_pika.connect(settings.amqp_url)
    ids: set[str] = set()
    events = messages = 0
    try:
        channel = await connection.channel()
        for shard in range(settings.queue_shards):
            for raw in await _take_all(channel, topology.shard_queue(shard)):
                batch = decode_batch(raw)
                events += len(batch.events)
                ids.update(e.idempotency_key for e in batch.events)
                messages += 1
    finally:
        channel = await connection.channel()
        for name in topology.all_queues():
            await channel.queue_delete(name)
        for name in topology.all_exchanges():
            await channel.exchange_delete(name)
        await connection.close()
    return events, len(ids), messages


# -- main ------------------------------------------------------------------------------------
def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.intake", description=__doc__)
    parser.add_argument(
        "--requests", type=int, default=10_000, help="python load: requests per round"
    )
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--duration", type=float, default=5.0, help="wrk: seconds per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per server")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="python load: cap")
    parser.add_argument("--tool", choices=("auto", "wrk", "python"), default="auto")
    return parser.parse_args(argv)


async def _bench(args: argparse.Namespace) -> int:
    tool = args.tool
    if tool == "auto":
        tool = "wrk" if shutil.which("wrk") else "python"
    prefix = f"crmbench.{secrets.token_hex(4)}"
    env = {
        "AMQP_URL": os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"),
        "AMQP_PREFIX": prefix,
        "WEBHOOK_TOKEN": TOKEN,
        "API_TOKEN": API_TOKEN,
        "LOG_LEVEL": "INFO",
        "LOG_FORMAT": "json",
        # The intake touches no database; the process opens its pools as `serve` does.
        "RESULTS_DATABASE_URL": dsn("postgres"),
        "EVOLUTION_DATABASE_URL": dsn("postgres"),
        "ANALYZER": "rules",
    }
    settings = load_settings(env, dotenv=None)
    run = secrets.token_hex(3).upper()
    results: dict[str, list[LoadResult]] = {"bare": [], "intake": []}
    cpu: dict[str, list[float]] = {"bare": [], "intake": [], "broker": []}
    system: dict[str, list[float]] = {"bare": [], "intake": []}  # kernel part of `cpu`
    broker_pid = _pid_of("beam.smp")
    try:
        with (
            server("bare", env) as (bare_url, bare_pid),
            server("intake", env) as (
                intake_url,
                intake_pid,
            ),
        ):
            urls = {"bare": (bare_url, bare_pid), "intake": (intake_url, intake_pid)}
            for name, (url, _) in urls.items():
                await run_load(tool, url, f"{run}W{name[0]}", _warmup(args))
            # Alternating rounds: load from elsewhere on the machine hits both alike.
            for round_ in range(args.rounds):
                for name, (url, pid) in urls.items():
                    before = (_cpu_seconds(pid), _cpu_seconds(broker_pid))
                    sys_before = _cpu_seconds(pid, system_only=True)
                    result = await run_load(tool, url, f"{run}{name[0]}{round_}", args)
                    after = (_cpu_seconds(pid), _cpu_seconds(broker_pid))
                    system[name].append(
                        (_cpu_seconds(pid, system_only=True) - sys_before) / max(result.requests, 1)
                    )
                    results[name].append(result)
                    cpu[name].append((after[0] - before[0]) / max(result.requests, 1))
                    if name == "intake":
                        cpu["broker"].append((after[1] - before[1]) / max(result.requests, 1))
            queued = await queued_metric(intake_url)
    finally:
        events, distinct, messages = await count_and_delete(settings)

    bare, intake = _median(results["bare"]), _median(results["intake"])
    ratio = intake.rate / bare.rate if bare.rate else 0.0
    print(f"load: {intake.tool}; {args.rounds} alternating rounds, median round shown")
    print(
        f"{'server':<8} {'req/s':>9} {'requests':>9} {'non-200':>8} {'p50 ms':>8} "
        f"{'p99 ms':>8} {'cpu us/req':>11} {'of it kernel':>13}"
    )
    for name, result in (("bare", bare), ("intake", intake)):
        print(
            f"{name:<8} {result.rate:>9.0f} {result.requests:>9} {result.errors:>8} "
            f"{result.p50_ms:>8.2f} {result.p99_ms:>8.2f} "
            f"{statistics.median(cpu[name]) * 1e6:>11.0f} "
            f"{statistics.median(system[name]) * 1e6:>13.0f}"
        )
    if broker_pid is not None:
        print(f"broker CPU per intake request: {statistics.median(cpu['broker']) * 1e6:.0f} us")
    print(
        "rounds req/s: "
        + "; ".join(
            f"{name} " + " ".join(f"{r.rate:.0f}" for r in rs) for name, rs in results.items()
        )
    )
    print(f"ratio intake/bare: {ratio:.2f} (target >= {TARGET_RATIO})")
    report(
        "intake",
        "confirmed webhooks/s",
        value=f"{intake.rate:,.0f} req/s",
        baseline=f"bare aiohttp handler {bare.rate:,.0f} req/s",
        ratio=ratio,
        target=f">= {TARGET_RATIO}x",
        met=ratio >= TARGET_RATIO,
    )
    accepted = sum(r.ok for r in results["intake"])
    print(
        f"queue check: server queued {queued} events, shard queues held {events} "
        f"({distinct} distinct) in {messages} AMQP messages "
        f"({events / messages if messages else 0:.1f} events per message)"
    )
    complete = events == queued and distinct == queued and queued >= accepted
    print("every accepted event is in the queue" if complete else "EVENTS MISSING OR EXTRA")
    errors = sum(r.errors for r in results["intake"])
    summary = {
        "tool": tool,
        "bare_rps": round(bare.rate),
        "intake_rps": round(intake.rate),
        "ratio": round(ratio, 3),
        "intake_p50_ms": round(intake.p50_ms, 2),
        "intake_p99_ms": round(intake.p99_ms, 2),
        "bare_p50_ms": round(bare.p50_ms, 2),
        "bare_p99_ms": round(bare.p99_ms, 2),
        "intake_errors": errors,
        "queued": queued,
        "in_queue": events,
        "amqp_messages": messages,
    }
    print(msgspec.json.encode(summary).decode())
    # Speed is reported, not enforced; a lost or duplicated event is a failure.
    return 0 if complete and errors == 0 else 1


def _median(results: list[LoadResult]) -> LoadResult:
    return sorted(results, key=lambda r: r.rate)[len(results) // 2]


def _cpu_seconds(pid: int | None, *, system_only: bool = False) -> float:
    """User + system (or system only) CPU time of a process (Linux /proc; 0 elsewhere)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = int(fields[12]) if system_only else int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def _pid_of(command: str) -> int | None:
    """A local process by name (the broker, to report its CPU share), if visible."""
    with contextlib.suppress(OSError):
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    if (entry / "comm").read_text().strip() == command:
                        return int(entry.name)
    return None


def _warmup(args: argparse.Namespace) -> argparse.Namespace:
    return argparse.Namespace(
        requests=min(2000, args.requests),
        concurrency=args.concurrency,
        duration=1.0,
        max_seconds=10.0,
    )


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(_bench(_parse(argv)))


if __name__ == "__main__":
    sys.exit(main())
