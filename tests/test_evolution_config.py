"""Evolution as its users configure it: the connection URI, a transaction pooler, RabbitMQ.

- Evolution's `DATABASE_CONNECTION_URI` (src/config/env.config.ts; `.env.example` there:
  `postgresql://user:pass@localhost:5432/evolution?schema=evolution_api`) is pasted into
  EVOLUTION_DATABASE_URL as is;
- the database through PgBouncer in transaction mode (Debian's `pgbouncer`, installed by
  scripts/ensure_services.sh, started here beside the shared PostgreSQL on this project's
  test port range), which refuses startup parameters such as
  `default_transaction_read_only` and shares server connections between transactions;
- `RABBITMQ_EXCHANGE_NAME`'s default in env.config.ts: `evolution_exchange`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from service.adapters.evolution.reader import EvolutionReader
from service.adapters.evolution.seed import insert_webhook_message
from service.bootstrap.builders import read_parts
from service.config import ConfigError, load_settings, parse_database_url
from tests.conftest import (
    PG_HOST,
    PG_PORT,
    PG_USER,
    ROOT,
    create_database,
    drop_database,
    load_evolution_schema,
    pg_dsn,
)
from tests.harness import free_port_in, message_body

INSTANCE = "clinic-sales"
PHONE = "77017003344"
PORTS = range(19000, 19100)  # this suite's port range on the shared machine


@pytest.fixture
async def evolution_api_db() -> AsyncIterator[str]:
    """A database with Evolution's tables in schema `evolution_api` and one dialog."""
    name = await create_database("crmt_evoapi")
    try:
        await load_evolution_schema(pg_dsn(name), "evolution_api")
        conn = await asyncpg.connect(pg_dsn(name), server_settings={"search_path": "evolution_api"})
        try:
            t0 = int(time.time()) - 600
            for i, text in enumerate(["Здравствуйте", "Я владелец клиники", "Сколько стоит?"]):
                body = message_body(PHONE, text, ts=t0 + i, msg_id=f"3EB0CFG{i}")
                await insert_webhook_message(conn, body, schema="evolution_api")
        finally:
            await conn.close()
        yield name
    finally:
        await drop_database(name)


def test_prisma_url_is_split_for_asyncpg() -> None:
    url = parse_database_url(
        "postgresql://evo:p%40ss@db:5432/evolution?schema=evolution_api&connection_limit=5"
        "&sslmode=require&pgbouncer=true"
    )
    assert url.dsn == "postgresql://evo:p%40ss@db:5432/evolution?sslmode=require"
    assert (url.schema, url.pooler) == ("evolution_api", True)
    plain = parse_database_url("postgresql://evo@db/evolution")
    assert (plain.dsn, plain.schema, plain.pooler) == ("postgresql://evo@db/evolution", None, False)
    with pytest.raises(ConfigError, match=r"\?schema="):
        load_settings({"EVOLUTION_DATABASE_URL": "postgresql://x@y/z?schema=a;b"}, dotenv=None)
    # EVOLUTION_DB_SCHEMA, when set, wins over the URL's.
    settings = load_settings(
        {
            "EVOLUTION_DATABASE_URL": "postgresql://x@y/z?schema=evolution_api",
            "EVOLUTION_DB_SCHEMA": "public",
        },
        dotenv=None,
    )
    assert settings.evolution_url().schema == "public"


async def test_evolutions_connection_uri_works_as_is(evolution_api_db: str) -> None:
    uri = f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/{evolution_api_db}?schema=evolution_api"
    # asyncpg alone refuses it: `schema` is no PostgreSQL setting.
    with pytest.raises(asyncpg.PostgresError):
        conn = await asyncpg.connect(uri)
        await conn.close()
    settings = load_settings(
        {"EVOLUTION_DATABASE_URL": uri, "RESULTS_DATABASE_URL": pg_dsn("postgres")}, dotenv=None
    )
    async with read_parts(settings) as ctx:
        assert ctx.reader.schema == "evolution_api"
        dialog = await ctx.reader.dialog(INSTANCE, PHONE, limit=10)
        assert dialog is not None and dialog.incoming_count == 3


# -- through PgBouncer in transaction mode ------------------------------------------------
def _free_port() -> int:
    return free_port_in(PORTS)


def _pgbouncer_binary() -> str:
    found = shutil.which("pgbouncer") or (
        "/usr/sbin/pgbouncer" if Path("/usr/sbin/pgbouncer").exists() else None
    )
    if found is None:
        subprocess.run(["bash", str(ROOT / "scripts" / "ensure_services.sh")], check=True)
        found = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    return found


@pytest.fixture
def pgbouncer() -> Iterator[int]:
    """PgBouncer on a free port of this suite's range, transaction pooling, in front of
    the shared PostgreSQL; stopped (only this process) afterwards."""
    binary = _pgbouncer_binary()
    port = _free_port()
    workdir = Path(tempfile.mkdtemp(prefix="crmt-pgbouncer-"))
    (workdir / "users.txt").write_text(f'"{PG_USER}" ""\n')
    (workdir / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"* = host={PG_HOST} port={PG_PORT}\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = trust\nauth_file = {workdir / 'users.txt'}\n"
        "pool_mode = transaction\ndefault_pool_size = 4\nmax_client_conn = 50\n"
        f"logfile = {workdir / 'pgbouncer.log'}\npidfile = {workdir / 'pgbouncer.pid'}\n"
    )
    command = [binary, str(workdir / "pgbouncer.ini")]
    if os.geteuid() == 0:  # PgBouncer refuses to run as root
        os.chmod(workdir, 0o777)
        for path in workdir.iterdir():
            os.chmod(path, 0o666)
        command = [binary, "-u", "postgres", str(workdir / "pgbouncer.ini")]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while True:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                log = (
                    (workdir / "pgbouncer.log").read_text()
                    if (workdir / "pgbouncer.log").exists()
                    else ""
                )
                errors = process.stderr.read() if process.stderr else b""
                raise RuntimeError(f"pgbouncer did not start: {errors!r} {log}")
            time.sleep(0.1)
        yield port
    finally:
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)
        if process.poll() is None:
            process.kill()
        shutil.rmtree(workdir, ignore_errors=True)


async def test_reader_through_a_transaction_pooler(evolution_api_db: str, pgbouncer: int) -> None:
    uri = f"postgresql://{PG_USER}@127.0.0.1:{pgbouncer}/{evolution_api_db}?schema=evolution_api"
    # The fixture behaves as PgBouncer does: startup settings are refused.
    with pytest.raises(asyncpg.PostgresError, match="startup parameter"):
        conn = await asyncpg.connect(
            uri.split("?")[0], server_settings={"default_transaction_read_only": "on"}
        )
        await conn.close()
    for url in (uri, uri + "&pgbouncer=true"):
        reader = await EvolutionReader.connect(url, max_size=3)
        try:
            assert reader.pooler and reader.schema == "evolution_api"
            # Many reads across few server connections: no cached statement breaks them.
            dialogs = await asyncio.gather(
                *(reader.dialog(INSTANCE, PHONE, limit=10) for _ in range(20))
            )
            assert all(d is not None and d.incoming_count == 3 for d in dialogs)
            (summary,) = await reader.contacts(INSTANCE, min_incoming=1)
            streamed = [s async for s in reader.iter_contacts(INSTANCE, min_incoming=1)]
            assert streamed == [summary]
            assert await reader.instance_exists(INSTANCE)
            # Every read runs read-only, set per transaction.
            assert await reader._fetchval("SELECT current_setting('transaction_read_only')") == "on"
            with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
                await reader._fetchval('DELETE FROM evolution_api."Message" RETURNING 1')
        finally:
            await reader.close()


# -- Evolution's own RabbitMQ exchange ------------------------------------------------------
def test_documented_exchange_default_is_evolutions() -> None:
    """env.config.ts: `RABBITMQ_EXCHANGE_NAME || 'evolution_exchange'`."""
    readme = (ROOT / "README.md").read_text()
    example = (ROOT / ".env.example").read_text()
    assert "`RABBITMQ_EXCHANGE_NAME`, default `evolution_exchange`" in readme
    assert "EVOLUTION_AMQP_EXCHANGE=evolution_exchange" in readme
    assert "evolution_exchange" in example
    assert "default `evolution`," not in readme


async def test_bridge_carries_deletes_and_edits(amqp_url: str, amqp_prefix: str) -> None:
    """rabbitmq.controller.ts, global mode: `publish(exchangeName, event, body)` with the
    dotted event as routing key and the webhook body without `destination`."""
    import json

    import aio_pika

    from consumers.evolution_bridge import EvolutionBridge
    from tests.harness import delete_topology
    from tests.parts import parts_around
    from tests.test_publisher import amqp_settings, drain, events_of

    settings = amqp_settings(amqp_url, amqp_prefix, evolution_amqp_exchange=f"{amqp_prefix}.evo")
    parts = contextlib.AsyncExitStack()
    ctx = await parts.enter_async_context(parts_around(settings))
    bridge = EvolutionBridge(ctx)
    connection = await aio_pika.connect(amqp_url)
    key = {"remoteJid": f"{PHONE}@s.whatsapp.net", "fromMe": False, "id": "3EB0BRDEL"}
    body = {k: v for k, v in message_body(PHONE, "x").items() if k != "destination"}
    try:
        await bridge.start()
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(f"{amqp_prefix}.evo")
        deleted = {**body, "event": "messages.delete", "data": {**key, "status": "DELETED"}}
        await exchange.publish(aio_pika.Message(json.dumps(deleted).encode()), "messages.delete")
        events: list[Any] = []
        deadline = time.monotonic() + 10
        while not events and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            events = events_of(await drain(settings))
        assert [(e.change, e.message_id) for e in events] == [("delete", "3EB0BRDEL")]
    finally:
        await bridge.stop()
        await parts.aclose()
        channel = await connection.channel()
        await channel.exchange_delete(f"{amqp_prefix}.evo")
        await connection.close()
        await delete_topology(settings)
