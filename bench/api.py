"""REST API over 100,000 leads: list latency and CSV export rate and memory.

Seeds a fresh results database (one INSERT … SELECT over generate_series), starts the real
app (`crm-backend serve`'s make_app with the Postgres store) in a process of its own, and
measures from this process:

- list: ~200 `GET /dialogs/analysis` requests cycling through the filters and pages, p50
  and p99, against the same pages fetched by a bare asyncpg query (rows + count) — the
  floor any implementation pays;
- export: `GET /dialogs/export-csv` of the largest account (90,000 rows), rows/s and the
  server's RSS before, at its peak (sampled from /proc) and after, against PostgreSQL's
  own `COPY … TO STDOUT (FORMAT csv)` of the same rows.

The database is dropped at the end.

    python -m bench.api [--leads 100000] [--requests 200]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import signal
import statistics
import sys
import time
import uuid
from multiprocessing.synchronize import Event as EventType
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import msgspec

from bench._servers import server_process

ADMIN_DSN = os.environ.get("BENCH_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
API_TOKEN = "bench-api-token-0123456789abcdef01234567"
ACCOUNT = uuid.UUID("00000000-0000-4000-8000-00000000000a")  # 90 % of the leads
OTHER_ACCOUNT = uuid.UUID("00000000-0000-4000-8000-00000000000b")

# Columns of a list row (the table's, without `messages`), as the store returns them.
ROW_COLUMNS = (
    "id, instance_name, user_account_id, contact_phone, contact_name, incoming_count, "
    "outgoing_count, first_message, last_message, business_type, is_medical, is_owner, "
    "uses_ads_now, has_sales_dept, ad_budget, has_booking, sent_instagram, instagram_url, "
    "funnel_stage, qualification_complete, interest_level, main_intent, objection, "
    "next_message, action, score, reasoning, notes, analyzed_at, created_at, updated_at, "
    "niche, budget_stated, score_breakdown, remote_jid, last_message_id, analyzer, "
    "llm_usage, source, manual_fields"
)
EXPORT_COLUMNS = (
    "contact_phone, contact_name, interest_level, score, business_type, funnel_stage, "
    "instagram_url, ad_budget, qualification_complete, is_owner, has_sales_dept, "
    "uses_ads_now, objection, next_message, incoming_count, outgoing_count, last_message, "
    "niche, score_breakdown, main_intent, action, is_medical, has_booking, notes, source, "
    "instance_name, first_message, analyzed_at, id"
)
# The store's order, written as its indexes are (NULL score and time sort last).
ORDER = "COALESCE(score, -1) DESC, COALESCE(last_message, '-infinity'::timestamptz) DESC, id DESC"

SEED_SQL = """
INSERT INTO dialog_analysis (
    instance_name, user_account_id, contact_phone, contact_name, incoming_count,
    outgoing_count, first_message, last_message, business_type, is_medical, is_owner,
    uses_ads_now, has_sales_dept, ad_budget, has_booking, sent_instagram, instagram_url,
    funnel_stage, qualification_complete, interest_level, main_intent, objection,
    next_message, action, score, reasoning, notes, analyzed_at, niche, budget_stated,
    score_breakdown, remote_jid, last_message_id, analyzer, source
)
SELECT
    'bench-' || (i % 4),
    CASE WHEN i % 10 = 0 THEN $2::uuid ELSE $1::uuid END,
    (77000000000 + i)::text,
    'Клиент №' || i || CASE WHEN i % 50 = 0 THEN ', "VIP"' ELSE '' END,
    3 + i % 40,
    1 + i % 20,
    now() - ((i % 20000) + 60) * interval '1 minute',
    now() - (i % 20000) * interval '1 minute',
    (ARRAY['стоматология', 'онлайн-школа', 'салон красоты', NULL])[1 + i % 4],
    i % 4 = 0,
    CASE i % 3 WHEN 0 THEN true WHEN 1 THEN false END,
    i % 2 = 0,
    CASE WHEN i % 5 = 0 THEN NULL ELSE i % 5 > 2 END,
    CASE WHEN i % 3 = 0 THEN (100 + i % 900) || ' тыс тенге' END,
    stage.name IN ('consultation_booked', 'consultation_completed', 'deal_closed'),
    i % 6 = 0,
    CASE WHEN i % 6 = 0 THEN 'https://instagram.com/client' || i END,
    stage.name,
    i % 3 = 0 AND i % 5 <> 0,
    CASE WHEN s.score >= 75 THEN 'hot' WHEN s.score >= 40 THEN 'warm' ELSE 'cold' END,
    'clinic_lead',
    CASE WHEN i % 7 = 0 THEN '=дорого, подумаю' END,
    'Здравствуйте! Удобно созвониться завтра в 15:00?',
    'want_call',
    s.score,
    'Владелец клиники, бюджет назван, интерес к консультации.',
    NULL,
    now() - (i % 20000) * interval '1 minute',
    (ARRAY['medicine', 'infobusiness', 'other', 'targetologist'])[1 + i % 4],
    i % 3 = 0,
    jsonb_build_array(
        jsonb_build_object('reason', 'stage: ' || stage.name, 'points', 30),
        jsonb_build_object('reason', 'decision maker: owner', 'points', 10)
    ),
    (77000000000 + i)::text || '@s.whatsapp.net',
    '3EB0' || md5(i::text),
    'rules',
    'auto'
FROM generate_series(1, $3::int) AS i
CROSS JOIN LATERAL (SELECT (i * 37) % 101 AS score) AS s
CROSS JOIN LATERAL (
    SELECT (ARRAY['new_lead', 'not_qualified', 'qualified', 'consultation_booked',
                  'consultation_completed', 'deal_closed', 'deal_lost'])[1 + i % 7] AS name
) AS stage
"""

# (query parameters, SQL condition, its arguments after the account) — one per kind of
# list request the front end makes.
FILTERS: list[tuple[dict[str, str], str, list[Any]]] = [
    ({}, "", []),
    ({"instanceName": "bench-1"}, "AND instance_name = $2", ["bench-1"]),
    ({"interestLevel": "hot"}, "AND interest_level = $2", ["hot"]),
    ({"minScore": "70"}, "AND score >= $2", [70]),
    ({"funnelStage": "qualified"}, "AND funnel_stage = $2", ["qualified"]),
    ({"qualificationComplete": "true"}, "AND qualification_complete = $2", [True]),
    (
        {"instanceName": "bench-2", "interestLevel": "warm", "minScore": "50"},
        "AND instance_name = $2 AND interest_level = $3 AND score >= $4",
        ["bench-2", "warm", 50],
    ),
]
OFFSETS = (0, 100, 1000, 10000)


# -- server process ---------------------------------------------------------------------------
async def _serve(port: int, ready: EventType) -> None:
    from aiohttp import web

    from handlers.http_app import make_app
    from service.bootstrap.builders import app_context
    from service.config import load_settings
    from service.logs import setup_logging

    settings = load_settings(dotenv=None)
    setup_logging(settings)
    async with app_context(settings) as ctx:
        runner = web.AppRunner(make_app(ctx), access_log=None, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        ready.set()
        await stop.wait()
        await runner.cleanup()


def _server_main(env: dict[str, str], port: int, ready: EventType) -> None:
    os.environ.update(env)
    asyncio.run(_serve(port, ready))


def server(env: dict[str, str]) -> Any:
    return server_process(_server_main, env, name="API")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


# -- database ---------------------------------------------------------------------------------
def _dsn(database: str) -> str:
    return ADMIN_DSN.rsplit("/", 1)[0] + "/" + database


async def create_seeded_db(leads: int) -> str:
    from service.adapters.stores.migrations import apply_migrations

    name = f"crm_bench_api_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(ADMIN_DSN)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    dsn = _dsn(name)
    await apply_migrations(dsn)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(SEED_SQL, ACCOUNT, OTHER_ACCOUNT, leads)
        await conn.execute("ANALYZE dialog_analysis")
    finally:
        await conn.close()
    return name


async def drop_db(name: str) -> None:
    admin = await asyncpg.connect(ADMIN_DSN)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


# -- measurements -----------------------------------------------------------------------------
def _requests(n: int) -> list[tuple[int, int]]:
    """(filter index, offset) pairs cycling through every combination."""
    combos = [(f, o) for f in range(len(FILTERS)) for o in OFFSETS]
    return [combos[i % len(combos)] for i in range(n)]


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def api_list(url: str, plan: list[tuple[int, int]]) -> tuple[list[float], int]:
    headers = {"Authorization": f"Bearer {API_TOKEN}"}
    times: list[float] = []
    bad = 0
    async with aiohttp.ClientSession(headers=headers) as session:
        for f, offset in plan:
            params = {"userAccountId": str(ACCOUNT), "limit": "100", "offset": str(offset)}
            params.update(FILTERS[f][0])
            started = time.perf_counter()
            async with session.get(url + "/dialogs/analysis", params=params) as response:
                body = await response.read()
            times.append((time.perf_counter() - started) * 1000)
            if response.status != 200 or not msgspec.json.decode(body)["success"]:
                bad += 1
    return times, bad


async def sql_list(dsn: str, plan: list[tuple[int, int]]) -> list[float]:
    conn = await asyncpg.connect(dsn, statement_cache_size=0)
    times: list[float] = []
    try:
        for f, offset in plan:
            _, condition, args = FILTERS[f]
            where = f"WHERE user_account_id = $1 {condition}"
            n = 2 + len(args)
            started = time.perf_counter()
            await conn.fetch(
                f"SELECT {ROW_COLUMNS} FROM dialog_analysis {where} ORDER BY {ORDER} "
                f"LIMIT ${n} OFFSET ${n + 1}",
                ACCOUNT,
                *args,
                100,
                offset,
            )
            await conn.fetchval(f"SELECT count(*) FROM dialog_analysis {where}", ACCOUNT, *args)
            times.append((time.perf_counter() - started) * 1000)
    finally:
        await conn.close()
    return times


class _Peak:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = rss_mib(pid)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.peak = max(self.peak, rss_mib(self.pid))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.01)


async def api_export(url: str, pid: int) -> dict[str, float]:
    headers = {"Authorization": f"Bearer {API_TOKEN}"}
    before = rss_mib(pid)
    peak = _Peak(pid)
    stop = asyncio.Event()
    sampler = asyncio.create_task(peak.run(stop))
    size = lines = 0
    started = time.perf_counter()
    async with aiohttp.ClientSession(headers=headers) as session:
        params = {"userAccountId": str(ACCOUNT)}
        async with session.get(url + "/dialogs/export-csv", params=params) as response:
            status = response.status
            async for chunk in response.content.iter_any():
                size += len(chunk)
                lines += chunk.count(b"\r\n")
    seconds = time.perf_counter() - started
    stop.set()
    await sampler
    return {
        "status": status,
        "seconds": seconds,
        "bytes": size,
        "lines": lines,  # header + rows (+ line breaks inside quoted cells, none seeded)
        "rss_before": before,
        "rss_peak": peak.peak,
        "rss_after": rss_mib(pid),
    }


async def sql_export(dsn: str) -> tuple[float, int]:
    conn = await asyncpg.connect(dsn)
    size = 0

    async def sink(chunk: bytes) -> None:
        nonlocal size
        size += len(chunk)

    try:
        started = time.perf_counter()
        await conn.copy_from_query(
            f"SELECT {EXPORT_COLUMNS} FROM dialog_analysis WHERE user_account_id = $1 "
            f"ORDER BY {ORDER}",
            ACCOUNT,
            output=sink,
            format="csv",
            header=True,
        )
        return time.perf_counter() - started, size
    finally:
        await conn.close()


async def _bench(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    name = await create_seeded_db(args.leads)
    dsn = _dsn(name)
    print(f"seeded {args.leads} leads in {time.perf_counter() - started:.1f}s ({name})")
    try:
        env = {
            "RESULTS_DATABASE_URL": dsn,
            "EVOLUTION_DATABASE_URL": dsn,  # opened as `serve` opens it; not read here
            "ANALYZER": "rules",
            "API_TOKEN": API_TOKEN,
            "WEBHOOK_TOKEN": "bench-webhook-token-0123456789abcdef012345",
            "LOG_LEVEL": "WARNING",
        }
        for key in ("SUPABASE_URL", "SUPABASE_SERVICE_KEY", "AUTH_DISABLED"):
            os.environ.pop(key, None)
        plan = _requests(args.requests)
        account_rows = args.leads - args.leads // 10
        with server(env) as (url, pid):
            await api_list(url, plan[:20])  # warm-up: pool, plans, caches
            await sql_list(dsn, plan[:20])
            api_ms, bad = await api_list(url, plan)
            sql_ms = await sql_list(dsn, plan)
            export = await api_export(url, pid)
        copy_seconds, copy_bytes = await sql_export(dsn)
    finally:
        await drop_db(name)

    api_p50, api_p99 = statistics.median(api_ms), _pct(api_ms, 0.99)
    sql_p50, sql_p99 = statistics.median(sql_ms), _pct(sql_ms, 0.99)
    rows = int(export["lines"]) - 1
    export_rate = rows / export["seconds"]
    copy_rate = account_rows / copy_seconds
    print(f"list: {len(api_ms)} requests over {len(FILTERS)} filters x offsets {OFFSETS}")
    print(f"{'':<14} {'p50 ms':>8} {'p99 ms':>8}")
    print(f"{'API':<14} {api_p50:>8.2f} {api_p99:>8.2f}")
    print(f"{'bare asyncpg':<14} {sql_p50:>8.2f} {sql_p99:>8.2f}")
    print(f"ratio API/SQL: p50 {api_p50 / sql_p50:.2f}x, p99 {api_p99 / sql_p99:.2f}x")
    print(
        f"export: {rows} rows, {export['bytes'] / 2**20:.1f} MiB in {export['seconds']:.2f}s "
        f"= {export_rate:,.0f} rows/s; COPY TO STDOUT {copy_rate:,.0f} rows/s "
        f"({copy_bytes / 2**20:.1f} MiB); ratio export/COPY {export_rate / copy_rate:.2f}"
    )
    print(
        f"server RSS: before {export['rss_before']:.1f} MiB, peak {export['rss_peak']:.1f} MiB "
        f"(+{export['rss_peak'] - export['rss_before']:.1f}), after {export['rss_after']:.1f} MiB"
    )
    ok = bad == 0 and export["status"] == 200 and rows == account_rows
    print("all answers complete" if ok else f"ERRORS: {bad} bad list answers, {rows} CSV rows")
    summary = {
        "leads": args.leads,
        "list_api_p50_ms": round(api_p50, 2),
        "list_api_p99_ms": round(api_p99, 2),
        "list_sql_p50_ms": round(sql_p50, 2),
        "list_sql_p99_ms": round(sql_p99, 2),
        "export_rows": rows,
        "export_rows_per_s": round(export_rate),
        "copy_rows_per_s": round(copy_rate),
        "export_rss_before_mib": round(export["rss_before"], 1),
        "export_rss_peak_mib": round(export["rss_peak"], 1),
        "export_rss_after_mib": round(export["rss_after"], 1),
    }
    print(msgspec.json.encode(summary).decode())
    return 0 if ok else 1


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.api", description=__doc__)
    parser.add_argument("--leads", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=200)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    # Defaults when run by `python -m bench` (whose own arguments are not ours).
    return asyncio.run(_bench(_parse([] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
