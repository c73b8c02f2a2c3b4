"""How long the migration holds up the writers of a big original `dialog_analysis`.

Two copies of the original's table (tests/data/original_tables.sql) get N rows each; one is
upgraded by the printed SQL in one transaction (as Supabase's SQL editor runs it), the other
by `apply_migrations` (`crm-backend migrate`: short locks, indexes CONCURRENTLY, batched
update). Meanwhile a writer inserts one row at a time, as the original service would; the
figure is the writer's longest wait, against its median wait before the migration (the
baseline, same run).

    python -m bench migrate_big -- --rows 500000
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import time
from pathlib import Path

import asyncpg

from bench._databases import create_database, drop_database
from service.adapters.stores.migrations import apply_migrations, migration_sql

ORIGINAL = Path(__file__).parent.parent / "tests" / "data" / "original_tables.sql"
FILL = """
INSERT INTO dialog_analysis (instance_name, user_account_id, contact_phone, next_message,
                             interest_level, score, funnel_stage, last_message)
SELECT 'inst-' || (g % 50), md5((g % 1000)::text)::uuid, (77000000000 + g)::text, 'hi',
       (ARRAY['hot', 'warm', 'cold'])[1 + g % 3], g % 101,
       (ARRAY['new_lead', 'qualified', 'consultation_booked'])[1 + g % 3],
       now() - (g || ' seconds')::interval
FROM generate_series(1, $1::int) AS g
"""
WRITE = (
    "INSERT INTO dialog_analysis (instance_name, user_account_id, contact_phone, "
    "next_message) VALUES ('live', gen_random_uuid(), $1, '')"
)


async def writer(dsn: str, stop: asyncio.Event, waits: list[float]) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        n = 0
        while not stop.is_set():
            n += 1
            started = time.perf_counter()
            await conn.execute(WRITE, f"live-{secrets.token_hex(6)}-{n}")
            waits.append(time.perf_counter() - started)
            await asyncio.sleep(0.01)
    finally:
        await conn.close()


async def measure(dsn: str, how: str) -> tuple[float, float, float]:
    """(baseline median wait, longest wait during the migration, migration seconds)."""
    stop, before, during = asyncio.Event(), [], []  # type: ignore[var-annotated]
    task = asyncio.create_task(writer(dsn, stop, before))
    await asyncio.sleep(2)
    stop.set()
    await task
    stop = asyncio.Event()
    task = asyncio.create_task(writer(dsn, stop, during))
    await asyncio.sleep(0.5)
    started = time.perf_counter()
    if how == "printed":
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(migration_sql())  # one simple query: one transaction
        finally:
            await conn.close()
    else:
        await apply_migrations(dsn)
    took = time.perf_counter() - started
    await asyncio.sleep(0.5)
    stop.set()
    await task
    return statistics.median(before), max(during), took


async def run(rows: int) -> int:
    results = {}
    for how in ("printed", "migrate"):
        name = f"crmb_mig_{secrets.token_hex(4)}"
        dsn = await create_database(name)
        try:
            conn = await asyncpg.connect(dsn)
            try:
                await conn.execute(ORIGINAL.read_text())
                await conn.execute(FILL, rows)
                await conn.execute("VACUUM ANALYZE dialog_analysis")
            finally:
                await conn.close()
            results[how] = await measure(dsn, how)
        finally:
            await drop_database(name)
    for how, (base, worst, took) in results.items():
        print(
            f"migrate_big {how:8s} rows={rows}: migration {took:6.1f} s, writer's longest wait "
            f"{worst * 1000:8.1f} ms = {worst / base:7.0f}x its median before "
            f"({base * 1000:.2f} ms)"
        )
    printed, online = results["printed"][1], results["migrate"][1]
    print(f"migrate_big: longest writer wait, pasted SQL vs migrate: {printed / online:.0f}x")
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench migrate_big")
    parser.add_argument("--rows", type=int, default=300_000)
    args = parser.parse_args(argv)
    return asyncio.run(run(args.rows))
