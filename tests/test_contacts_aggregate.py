"""The contacts aggregate against its first, plain form (tests/contacts_oracle.py) on a
real PostgreSQL: an instance generated in SQL with messages stored twice (identical
copies, and copies an edit rewrote with a newer time, another push name or a LID added),
deletes for everyone (revokes of both Evolution forms, API deletes), edits, LID-only chats
merged through a phone seen with their LID, groups, reactions and protocol messages.
The two queries must give the same contacts, counts, times, last message ids and names."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from bench.evolution_reader import GENERATE_SQL
from service.adapters.evolution.message_text import SKIPPED_TYPES
from service.adapters.evolution.reader import EvolutionReader, contacts_sql
from service.adapters.evolution.seed import create_instance
from tests.contacts_oracle import oracle_contacts_sql

INSTANCE = "oracle-inst"
MESSAGES = 24_000
CONTACTS = 400
NOT_NAMES = ["", "Você"]

# Copies of 4 % of the messages: half identical (a retried insert), half as an edit
# leaves them (one copy newer, marked EDITED, with another push name; some copies of a
# LID chat gaining or losing the phone).
COPIES_SQL = """
INSERT INTO "Message" (id, "key", "pushName", "messageType", message, source,
                       "messageTimestamp", "instanceId", status)
SELECT id || '-copy',
    CASE WHEN r < 0.01 AND "key" ? 'remoteJidAlt' THEN "key" - 'remoteJidAlt'
         ELSE "key" END,
    CASE WHEN r < 0.02 THEN "pushName" ELSE 'Renamed ' || "pushName" END,
    "messageType", message, source,
    CASE WHEN r < 0.02 THEN "messageTimestamp" ELSE "messageTimestamp" + 1 + (r * 1000)::int END,
    "instanceId",
    CASE WHEN r < 0.02 THEN status ELSE 'EDITED' END
FROM (SELECT *, random() AS r FROM "Message" WHERE "instanceId" = $1) m
WHERE r < 0.04
"""

# Deletes for everyone on 2 % of the received messages, as Evolution writes them: status
# DELETED (up to 2.3.6) or the status-less revoke (SERVER_ACK from 2.3.7 on); and the
# "MessageUpdate" row of an edit on every EDITED copy (it must keep the message).
UPDATES_SQL = """
INSERT INTO "MessageUpdate" (id, "keyId", "remoteJid", "fromMe", status, "messageId", "instanceId")
SELECT m.id || '-u', m."key"->>'id', m."key"->>'remoteJid', fm,
       CASE WHEN m.status = 'EDITED' THEN 'SERVER_ACK'
            WHEN random() < 0.5 THEN 'DELETED' ELSE 'SERVER_ACK' END,
       m.id, m."instanceId"
FROM (SELECT *, COALESCE(("key"->>'fromMe')::boolean, false) AS fm FROM "Message"
      WHERE "instanceId" = $1) m
WHERE NOT fm AND (m.status = 'EDITED' OR (m.id NOT LIKE '%-copy' AND random() < 0.02))
"""


@pytest.fixture
async def generated(evolution_dsn: str) -> AsyncIterator[str]:
    conn: asyncpg.Connection[Any] = await asyncpg.connect(evolution_dsn)
    try:
        instance_id = await create_instance(conn, INSTANCE)
        await conn.execute(
            'UPDATE "Instance" SET "ownerJid" = $2 WHERE id = $1',
            instance_id,
            "77000000007@s.whatsapp.net",  # contact 7's number: never a contact
        )
        await conn.execute("SELECT setseed(0.17)")
        await conn.execute(GENERATE_SQL, INSTANCE, instance_id, MESSAGES, CONTACTS)
        await conn.execute(COPIES_SQL, instance_id)
        await conn.execute(UPDATES_SQL, instance_id)
        await conn.execute('ANALYZE "Message"; ANALYZE "MessageUpdate"')
    finally:
        await conn.close()
    yield evolution_dsn


async def _rows(dsn: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    conn: asyncpg.Connection[Any] = await asyncpg.connect(dsn, server_settings={"jit": "off"})
    try:
        await conn.execute("SET work_mem = '64MB'; SET max_parallel_workers_per_gather = 2")
        return [tuple(row) for row in await conn.fetch(sql, *args)]
    finally:
        await conn.close()


@pytest.mark.parametrize(
    ("min_incoming", "since", "limit"),
    [(0, None, None), (3, None, None), (3, 1715000000, None), (1, None, 37)],
)
async def test_same_contacts_as_the_plain_query(
    generated: str, min_incoming: int, since: int | None, limit: int | None
) -> None:
    args = (INSTANCE, sorted(SKIPPED_TYPES), min_incoming, since, limit, NOT_NAMES)
    expected = await _rows(generated, oracle_contacts_sql("public"), *args)
    got = await _rows(generated, contacts_sql("public"), *args)
    assert len(expected) > (30 if limit else 300)
    assert got == expected


async def test_data_holds_what_the_comparison_needs(generated: str) -> None:
    """The generated instance really has copies that differ, deletes, edits and LID-only
    chats (else the comparison above would prove little)."""
    conn: asyncpg.Connection[Any] = await asyncpg.connect(generated)
    try:
        found = await conn.fetchrow(
            """SELECT
                count(*) FILTER (WHERE m.id LIKE '%-copy' AND m.status = 'EDITED') AS edited,
                count(*) FILTER (WHERE m.id LIKE '%-copy' AND m.status <> 'EDITED') AS same,
                count(*) FILTER (WHERE m."key"->>'addressingMode' = 'lid'
                                 AND NOT m."key" ? 'remoteJidAlt') AS lid_only
            FROM "Message" m"""
        )
        deletes = await conn.fetchval(
            """SELECT count(*) FROM "MessageUpdate" u JOIN "Message" m ON m.id = u."messageId"
               WHERE m.status IS DISTINCT FROM 'EDITED'"""
        )
    finally:
        await conn.close()
    assert found["edited"] > 300 and found["same"] > 300 and found["lid_only"] > 300
    assert deletes > 100


async def test_reader_streams_what_the_plain_query_lists(generated: str) -> None:
    """Through the reader (its session settings, the held cursor, small pages)."""
    args = (INSTANCE, sorted(SKIPPED_TYPES), 3, None, None, NOT_NAMES)
    expected = await _rows(generated, oracle_contacts_sql("public"), *args)
    reader = await EvolutionReader.connect(generated)
    try:
        streamed = [s async for s in reader.iter_contacts(INSTANCE, min_incoming=3, page_size=64)]
    finally:
        await reader.close()
    assert [
        (
            s.contact.remote_jid,
            s.incoming_count,
            s.outgoing_count,
            s.last_message_id,
            s.contact.name,
        )
        for s in streamed
    ] == [(row[0], row[1], row[2], row[5], row[6]) for row in expected]


async def test_streamed_names_and_ids_survive_the_copy_format(evolution_dsn: str) -> None:
    """The stream reads COPY's text format back: tabs, newlines, backslashes and a literal
    `\\N` in a name or a message id come back as they were, and no name stays None."""
    names = ["Tab\there", "Line\nbreak", "Back\\slash", "\\N", "Crlf\r\n", "Ünï 名字"]
    conn: asyncpg.Connection[Any] = await asyncpg.connect(evolution_dsn)
    try:
        instance_id = await create_instance(conn, "copy-inst")
        rows = [
            (
                f"copy-{i}-{j}",
                f'{{"remoteJid": "7900000000{i}@s.whatsapp.net", "fromMe": false, '
                f'"id": "ID\\\\t{i}\\t{j}"}}',
                name,
                1715000000 + i * 10 + j,
                instance_id,
            )
            for i, name in enumerate([*names, None])
            for j in range(2)
        ]
        await conn.executemany(
            """INSERT INTO "Message" (id, "key", "pushName", "messageType", message, source,
                   "messageTimestamp", "instanceId")
               VALUES ($1, $2::jsonb, $3, 'conversation', '{"conversation": "hi"}', 'android',
                   $4, $5)""",
            rows,
        )
    finally:
        await conn.close()
    reader = await EvolutionReader.connect(evolution_dsn)
    try:
        listed = await reader.contacts("copy-inst", min_incoming=1)
        streamed = [s async for s in reader.iter_contacts("copy-inst", min_incoming=1)]
    finally:
        await reader.close()
    assert streamed == listed
    assert sorted(s.contact.name or "<none>" for s in streamed) == sorted([*names, "<none>"])
    assert {s.last_message_id for s in streamed} == {f"ID\\t{i}\t1" for i in range(7)}
