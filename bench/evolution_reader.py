"""Evolution reader: contact selection and dialog reads on a large Evolution database.

Builds a throw-away Evolution-shaped database (generated in SQL, so it takes seconds):
an instance of 1,000,000 messages over 20,000 contacts and one of 250,000 messages over
the same number of contacts — incoming and outgoing, 10 % of contacts LID-addressed (some
of their messages carrying no phone at all), group chatter, reactions, protocol messages,
deleted rows and messages stored twice, and a "MessageUpdate" row per sent message (read
receipts) plus revokes of 0.5 % of the received ones. Then measures, against baselines of
the same run:

- selecting the contacts with >= 3 incoming messages (the whole list, streamed) against a
  plain `count(*)` of the instance's messages;
- reading one dialog (median over random contacts) with and without the indexes;
- the benchmark process's peak RSS after streaming the 250k- and the 1M-message instance
  (the selection must not grow with the number of messages).

    python -m bench.evolution_reader [--messages 1000000] [--contacts 20000] [--samples 50]

Targets: selection <= 2 s, one dialog <= 5 ms with the indexes. The database is dropped
at the end. Exit status 1 when the reader returns wrong results, else 0.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource
import secrets
import statistics
import sys
import time
from typing import Any

import asyncpg

from bench._report import report
from service.adapters.evolution.identity import phone_jid_sql
from service.adapters.evolution.index import apply_index
from service.adapters.evolution.reader import EvolutionReader
from service.adapters.evolution.seed import create_instance, create_schema

PG_HOST = os.environ.get("BENCH_PGHOST", os.environ.get("TEST_PGHOST", "127.0.0.1"))
PG_PORT = int(os.environ.get("BENCH_PGPORT", os.environ.get("TEST_PGPORT", "5432")))
PG_USER = os.environ.get("BENCH_PGUSER", os.environ.get("TEST_PGUSER", "postgres"))
SELECTION_TARGET_S = 2.0
DIALOG_TARGET_MS = 5.0
MIN_INCOMING = 3
# Dialog reads without the index scan the instance: cap the time spent on them.
NO_INDEX_BUDGET_S = 20.0

# Rows of one instance, generated server-side. Contact c has phone 77000000000 + c; every
# tenth contact is LID-addressed (LID 100000000000000 + c), a fifth of its messages
# without any phone. 3 % group messages, 45 % outgoing, 1 % reactions, 1 % protocol
# messages, 3 % images, 0.2 % deleted.
GENERATE_SQL = """
INSERT INTO "Message" (id, "key", "pushName", "messageType", message, source,
                       "messageTimestamp", "instanceId", status)
SELECT
    $1 || '-m' || i,
    CASE
        WHEN grp THEN jsonb_build_object('remoteJid', '1203630' || (i % 200) || '@g.us',
            'fromMe', fm, 'id', kid, 'participant', phone || '@s.whatsapp.net')
        WHEN lid AND lid_only THEN jsonb_build_object('remoteJid', lid_jid, 'fromMe', fm,
            'id', kid, 'addressingMode', 'lid')
        WHEN lid THEN jsonb_build_object('remoteJid', lid_jid, 'fromMe', fm, 'id', kid,
            'addressingMode', 'lid', 'remoteJidAlt', phone || '@s.whatsapp.net')
        WHEN deleted THEN jsonb_build_object('remoteJid', phone || '@s.whatsapp.net',
            'fromMe', fm, 'id', kid, 'deleted', true)
        ELSE jsonb_build_object('remoteJid', phone || '@s.whatsapp.net', 'fromMe', fm, 'id', kid)
    END,
    CASE WHEN fm THEN 'Você' ELSE 'Contact ' || c END,
    kind,
    CASE kind
        WHEN 'conversation' THEN jsonb_build_object('conversation',
            'Message ' || i || ': about the clinic, the monthly ad budget and a call tomorrow')
        WHEN 'imageMessage' THEN jsonb_build_object('imageMessage', jsonb_build_object(
            'caption', 'price list ' || i, 'mimetype', 'image/jpeg', 'fileLength', '183244'))
        ELSE jsonb_build_object(kind, jsonb_build_object('key', jsonb_build_object('id', 'X')))
    END,
    CASE WHEN fm THEN 'web' ELSE 'android' END::"DeviceMessage",
    ts,
    $2,
    CASE WHEN deleted THEN 'DELETED' WHEN fm THEN 'SERVER_ACK' ELSE 'DELIVERY_ACK' END
FROM (
    SELECT i, c,
        (77000000000 + c)::text AS phone,
        (100000000000000 + c)::text || '@lid' AS lid_jid,
        c % 10 = 0 AS lid,
        r1 < 0.2 AS lid_only,
        r2 < 0.03 AS grp,
        r2 >= 0.03 AND r2 < 0.032 AS deleted,
        r3 < 0.45 AS fm,
        upper(substr(md5($1 || i), 1, 20)) AS kid,
        CASE WHEN r4 < 0.01 THEN 'reactionMessage' WHEN r4 < 0.02 THEN 'protocolMessage'
             WHEN r4 < 0.05 THEN 'imageMessage' ELSE 'conversation' END AS kind,
        1700000000 + (r5 * 31536000)::int AS ts
    FROM (
        SELECT i, 1 + floor($4::int * random())::int AS c,
            random() AS r1, random() AS r2, random() AS r3, random() AS r4, random() AS r5
        FROM generate_series(1, $3::int) AS i
    ) r
) g
"""

# 0.5 % of the instance's messages stored a second time (same WhatsApp id, new row id).
DUPLICATE_SQL = """
INSERT INTO "Message" (id, "key", "pushName", "messageType", message, source,
                       "messageTimestamp", "instanceId", status)
SELECT id || '-dup', "key", "pushName", "messageType", message, source,
       "messageTimestamp", "instanceId", status
FROM "Message" WHERE "instanceId" = $1 AND random() < 0.005
"""


# "MessageUpdate" rows as Evolution writes them with DATABASE_SAVE_MESSAGE_UPDATE on
# (whatsapp.baileys.service.ts, messages.update): a read receipt for every sent message,
# and for 0.5 % of the received ones the status-less row of a revoke ("delete for
# everyone"; SERVER_ACK from 2.3.7 on). The reader must leave those messages out.
UPDATES_SQL = """
INSERT INTO "MessageUpdate" (id, "keyId", "remoteJid", "fromMe", status, "messageId", "instanceId")
SELECT m.id || '-u', m."key"->>'id', m."key"->>'remoteJid', fm,
       CASE WHEN fm THEN 'READ' ELSE 'SERVER_ACK' END, m.id, m."instanceId"
FROM (SELECT *, COALESCE(("key"->>'fromMe')::boolean, false) AS fm FROM "Message"
      WHERE "instanceId" = $1 AND id NOT LIKE '%-dup') m
WHERE fm OR random() < 0.005
"""


def _dsn(database: str) -> str:
    return f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/{database}"


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


async def _generate(dsn: str, name: str, messages: int, contacts: int) -> None:
    conn: asyncpg.Connection[Any] = await asyncpg.connect(dsn)
    try:
        instance_id = await create_instance(conn, name)
        await conn.execute("SELECT setseed(0.42)")
        await conn.execute(GENERATE_SQL, name, instance_id, messages, contacts)
        await conn.execute(DUPLICATE_SQL, instance_id)
        await conn.execute(UPDATES_SQL, instance_id)
    finally:
        await conn.close()


async def _count_scan(dsn: str, name: str) -> float:
    """Baseline: the plain scan every per-instance query pays at least once."""
    conn: asyncpg.Connection[Any] = await asyncpg.connect(dsn, server_settings={"jit": "off"})
    try:
        started = time.perf_counter()
        await conn.fetchval(
            'SELECT count(*) FROM "Message" m JOIN "Instance" i ON i.id = m."instanceId" '
            "WHERE i.name = $1",
            name,
        )
        return time.perf_counter() - started
    finally:
        await conn.close()


async def _group_scan(dsn: str, name: str) -> float:
    """Second baseline: the cheapest per-contact count (GROUP BY the phone expression, no
    de-duplication, no LID mapping, no names) — what any contact list must pay."""
    conn: asyncpg.Connection[Any] = await asyncpg.connect(dsn, server_settings={"jit": "off"})
    try:
        await conn.execute("SET work_mem = '64MB'; SET max_parallel_workers_per_gather = 2")
        jid = phone_jid_sql('m."key"')
        started = time.perf_counter()
        await conn.fetch(
            f'SELECT {jid} AS jid, count(*) FROM "Message" m '
            'JOIN "Instance" i ON i.id = m."instanceId" WHERE i.name = $1 GROUP BY 1',
            name,
        )
        return time.perf_counter() - started
    finally:
        await conn.close()


async def _select(reader: EvolutionReader, name: str) -> tuple[float, int, list[str], float]:
    """Stream the whole contact list once: seconds, contacts, a few phones to sample, and
    seconds until the first contact arrived."""
    started = time.perf_counter()
    first = 0.0
    count = 0
    phones: list[str] = []
    async for summary in reader.iter_contacts(name, min_incoming=MIN_INCOMING):
        count += 1
        if count == 1:
            first = time.perf_counter() - started
        if count % 97 == 0:
            phones.append(summary.contact.phone)
    return time.perf_counter() - started, count, phones, first


async def _dialog_ms(
    reader: EvolutionReader, name: str, phones: list[str], budget_s: float | None = None
) -> tuple[float, int]:
    """Median milliseconds of one dialog read (and how many were timed)."""
    times: list[float] = []
    started = time.perf_counter()
    for phone in phones:
        t0 = time.perf_counter()
        dialog = await reader.dialog(name, phone, limit=200)
        times.append((time.perf_counter() - t0) * 1000)
        if dialog is None:
            raise AssertionError(f"no dialog for a listed contact {phone}")
        if budget_s is not None and time.perf_counter() - started > budget_s and len(times) >= 3:
            break
    return statistics.median(times), len(times)


async def _bench(args: argparse.Namespace) -> int:
    database = f"crm_bench_evo_{secrets.token_hex(4)}"
    admin: asyncpg.Connection[Any] = await asyncpg.connect(_dsn("postgres"))
    await admin.execute(f'CREATE DATABASE "{database}"')
    dsn = _dsn(database)
    big, small = "bench-1m", "bench-250k"
    failures = 0
    try:
        await create_schema(dsn)
        t0 = time.perf_counter()
        await _generate(dsn, small, args.messages // 4, args.contacts)
        await _generate(dsn, big, args.messages, args.contacts)
        conn: asyncpg.Connection[Any] = await asyncpg.connect(dsn)
        try:
            await conn.execute('ANALYZE "Message"; ANALYZE "MessageUpdate"')
            total = await conn.fetchval('SELECT count(*) FROM "Message"')
        finally:
            await conn.close()
        print(f"generated {total:,} message rows in {time.perf_counter() - t0:.1f} s")

        reader = await EvolutionReader.connect(dsn)
        try:
            rss_start = _rss_mib()
            small_s, small_n, _, _ = await _select(reader, small)
            rss_small = _rss_mib()
            count_s = min([await _count_scan(dsn, big) for _ in range(3)])
            group_s = min([await _group_scan(dsn, big) for _ in range(2)])
            runs = [await _select(reader, big) for _ in range(args.runs)]
            rss_big = _rss_mib()
            select_s = statistics.median(run[0] for run in runs)
            first_s = statistics.median(run[3] for run in runs)
            big_n, phones = runs[0][1], runs[0][2]
            print(
                f"selection (>= {MIN_INCOMING} incoming, whole list): {big_n:,} of "
                f"{args.contacts:,} contacts, {args.messages:,} messages: {select_s:.2f} s "
                f"(median of {args.runs}; target <= {SELECTION_TARGET_S:.0f} s: "
                f"{'met' if select_s <= SELECTION_TARGET_S else 'MISSED'})"
            )
            print(
                f"  baseline count(*) of the instance: {count_s:.2f} s -> "
                f"selection / count(*) = {select_s / count_s:.1f}x"
            )
            print(
                f"  baseline plain GROUP BY phone (no de-duplication): {group_s:.2f} s -> "
                f"selection / GROUP BY = {select_s / group_s:.1f}x"
            )
            print(f"  time to the first contact: {first_s:.2f} s (median of {args.runs})")
            report(
                "evolution_reader",
                f"contact selection, {args.messages:,} messages",
                value=f"{select_s:.2f} s (first contact {first_s:.2f} s)",
                baseline=f"plain GROUP BY {group_s:.2f} s",
                ratio=select_s / group_s,
                target=f"<= {SELECTION_TARGET_S:.0f} s",
                met=select_s <= SELECTION_TARGET_S,
            )
            print(f"  250k-message instance: {small_n:,} contacts in {small_s:.2f} s")
            print(
                f"peak RSS: {rss_start:.0f} MiB before, {rss_small:.0f} MiB after the 250k "
                f"instance, {rss_big:.0f} MiB after the 1M instance -> "
                f"1M / 250k = {rss_big / rss_small:.2f}x for 4x the messages"
            )
            if big_n < args.contacts * 0.9:
                print(f"WRONG: expected ~{args.contacts:,} contacts, got {big_n:,}")
                failures += 1

            sample = random.Random(7).sample(phones, min(args.samples, len(phones)))
            no_index_ms, no_index_n = await _dialog_ms(reader, big, sample, NO_INDEX_BUDGET_S)
            t0 = time.perf_counter()
            created = await apply_index(dsn, reader.schema)
            build_s = time.perf_counter() - t0
            print(f"indexes built in {build_s:.1f} s (created: {created})")
            await _dialog_ms(reader, big, sample[:5])  # warm the plan cache
            index_ms, index_n = await _dialog_ms(reader, big, sample)
            print(
                f"one dialog (newest 200 messages + whole-history counts): without index "
                f"{no_index_ms:.1f} ms (median of {no_index_n}), with index {index_ms:.2f} ms "
                f"(median of {index_n}) -> {no_index_ms / index_ms:.0f}x faster "
                f"(target <= {DIALOG_TARGET_MS:.0f} ms: "
                f"{'met' if index_ms <= DIALOG_TARGET_MS else 'MISSED'})"
            )
            report(
                "evolution_reader",
                "one dialog with the index",
                value=f"{index_ms:.2f} ms",
                baseline=f"without the index {no_index_ms:.0f} ms",
                ratio=index_ms / no_index_ms,
                target=f"<= {DIALOG_TARGET_MS:.0f} ms",
                met=index_ms <= DIALOG_TARGET_MS,
            )
            indexed_s = statistics.median(
                [(await _select(reader, big))[0] for _ in range(args.runs)]
            )
            print(
                f"selection with the indexes: {indexed_s:.2f} s "
                f"({indexed_s / select_s:.2f}x the time without)"
            )
        finally:
            await reader.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await admin.close()
    return 1 if failures else 0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.evolution_reader", description=__doc__)
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--contacts", type=int, default=20_000)
    parser.add_argument("--samples", type=int, default=50, help="dialogs to time")
    parser.add_argument("--runs", type=int, default=3, help="selection runs (median)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(_bench(_parse(argv)))


if __name__ == "__main__":
    sys.exit(main())
