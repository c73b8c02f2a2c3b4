"""End-to-end harness: intake app + broker + consumer on the real services.

Builds webhook bodies shaped like Evolution's, stores each message in the Evolution DB
before posting its webhook (as Evolution does), and waits for rows to appear.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import secrets
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import msgspec
from aiohttp.test_utils import TestClient, TestServer

from service.adapters.broker.connection import connect_once
from service.bootstrap.builders import app_context
from service.bootstrap.context import AppContext
from service.config import Settings, load_settings
from service.domain.lead import LeadRow

WEBHOOK_TOKEN = "test-webhook-token-0123456789abcdef0123"
API_TOKEN = "test-api-token-0123456789abcdef012345678"
INSTANCE = "clinic-sales"
_ids = itertools.count(1)


def free_port_in(ports: range) -> int:
    """A loopback port of `ports` nothing listens on (each suite has its own range)."""
    for port in ports:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {ports.start}-{ports.stop - 1}")


def make_settings(
    *, evolution_dsn: str, results_dsn: str, amqp_url: str, prefix: str, **overrides: Any
) -> Settings:
    env = {
        "EVOLUTION_DATABASE_URL": evolution_dsn,
        "RESULTS_DATABASE_URL": results_dsn,
        "AMQP_URL": amqp_url,
        "AMQP_PREFIX": prefix,
        "WEBHOOK_TOKEN": WEBHOOK_TOKEN,
        "API_TOKEN": API_TOKEN,
        "DEBOUNCE_SECONDS": "1",
        "QUEUE_SHARDS": "2",
        "RETRY_DELAYS": "0.3,0.6",
        "MAX_ATTEMPTS": "3",
        "ANALYZER": "rules",
        "LOG_LEVEL": "WARNING",
    }
    env.update({k.upper(): str(v) for k, v in overrides.items()})
    return load_settings(env, dotenv=None)


def settings_env(settings: Settings) -> dict[str, str]:
    """The settings as environment variables, for a consumer subprocess."""
    env = dict(os.environ)
    for name, value in msgspec.structs.asdict(settings).items():
        if value is None or value == "":
            env.pop(name.upper(), None)
        else:
            env[name.upper()] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


def message_body(
    phone: str,
    text: str,
    *,
    from_me: bool = False,
    ts: int | None = None,
    msg_id: str | None = None,
    event: str = "messages.upsert",
    instance: str = INSTANCE,
    push_name: str = "Клиент",
) -> dict[str, Any]:
    return {
        "event": event,
        "instance": instance,
        "destination": "http://crm/webhooks/evolution",
        "date_time": "2026-10-03T09:14:06.512Z",
        "sender": "77015550101@s.whatsapp.net",
        "server_url": "https://evo.example.com",
        "apikey": None,
        "data": {
            "key": {
                "remoteJid": f"{phone}@s.whatsapp.net",
                "fromMe": from_me,
                "id": msg_id or f"3EB0{next(_ids):06d}{secrets.token_hex(4).upper()}",
            },
            "pushName": "Você" if from_me else push_name,
            "status": "SERVER_ACK" if from_me else "DELIVERY_ACK",
            "message": {"conversation": text},
            "contextInfo": None,
            "messageType": "conversation",
            "messageTimestamp": ts or int(time.time()),
            "instanceId": "inst-1",
            "source": "android",
        },
    }


class Harness:
    """One service (intake + consumer) under test, on fresh databases and queues."""

    def __init__(self, settings: Settings, ctx: AppContext, client: TestClient[Any, Any]):
        self.settings = settings
        self.ctx = ctx
        self.client = client
        self.consumer: Any = None
        self.drainer: Any = None  # the outbox drainer (lead events), as `consume` runs it
        # Tests send dozens of webhooks at once; their own writes and reads take few
        # connections, so the service's pools (warm in consume processes) have room
        # within PostgreSQL's 100.
        self._db_slots = asyncio.Semaphore(8)

    async def evolution_conn(self) -> asyncpg.Connection[Any]:
        return await asyncpg.connect(self.settings.evolution_dsn())

    async def store_message(self, body: dict[str, Any]) -> None:
        """Write the webhook's message to the Evolution DB, as Evolution does."""
        from service.adapters.evolution.seed import insert_webhook_message

        async with self._db_slots:
            conn = await self.evolution_conn()
            try:
                await insert_webhook_message(conn, body)
            finally:
                await conn.close()

    async def send(self, body: dict[str, Any], *, store: bool = True) -> int:
        """Store the message in the Evolution DB (unless told not to), then post it."""
        if store:
            await self.store_message(body)
        resp = await self.client.post(f"/webhooks/evolution?token={WEBHOOK_TOKEN}", json=body)
        await resp.read()
        return resp.status

    async def row(self, phone: str, instance: str = INSTANCE) -> LeadRow | None:
        async with self._db_slots:
            conn = await asyncpg.connect(self.settings.results_database_url)
            try:
                record = await conn.fetchrow(
                    "SELECT id, user_account_id FROM dialog_analysis "
                    "WHERE instance_name = $1 AND contact_phone = $2",
                    instance,
                    phone,
                )
            finally:
                await conn.close()
        if record is None:
            return None
        return await self.ctx.store.get_lead(
            record["user_account_id"], record["id"], include_messages=True
        )

    async def wait_for(
        self, check: Callable[[], Awaitable[bool]], timeout: float = 20.0, what: str = "condition"
    ) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await check():
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")

    async def wait_row(
        self, phone: str, predicate: Callable[[LeadRow], bool] = lambda r: True, timeout: float = 20
    ) -> LeadRow:
        found: list[LeadRow] = []

        async def check() -> bool:
            row = await self.row(phone)
            if row is not None and predicate(row):
                found.append(row)
                return True
            return False

        await self.wait_for(check, timeout, f"row of {phone}")
        return found[0]

    async def wait_idle(self, timeout: float = 20.0) -> None:
        """Queues drained and nothing buffered in the consumer."""

        async def check() -> bool:
            depth = await queue_depth(self.settings)
            return depth == 0 and self.consumer is not None and await self.consumer.idle()

        await self.wait_for(check, timeout, "consumer idle")


async def queue_depth(settings: Settings, include_unacked: bool = True) -> int:
    """Messages in the shard queues (ready + unacknowledged)."""
    from service.adapters.broker.topology import Topology

    topology = Topology(settings)
    connection = await connect_once(settings, "test")
    try:
        channel = await connection.channel()
        total = 0
        for shard in range(settings.queue_shards):
            queue = await channel.declare_queue(topology.shard_queue(shard), passive=True)
            total += queue.declaration_result.message_count or 0
        return total
    finally:
        await connection.close()


async def declare_topology(settings: Settings) -> None:
    from service.adapters.broker.topology import Topology

    connection = await connect_once(settings, "test")
    try:
        await Topology(settings).declare(await connection.channel())
    finally:
        await connection.close()


async def delete_topology(settings: Settings) -> None:
    """Remove every exchange and queue a test declared (prefix is unique per test)."""
    from service.adapters.broker.topology import Topology

    topology = Topology(settings)
    connection = await connect_once(settings, "test")
    try:
        channel = await connection.channel()
        for name in topology.all_queues():
            with contextlib.suppress(Exception):
                await channel.queue_delete(name)
        for name in topology.all_exchanges():
            with contextlib.suppress(Exception):
                await channel.exchange_delete(name)
    finally:
        await connection.close()


async def map_instance(settings: Settings, account: uuid.UUID, instance: str = INSTANCE) -> None:
    from service.adapters.stores.factory import open_store

    store = await open_store(settings)
    try:
        await store.add_instance(instance, account)
    finally:
        await store.close()


async def ensure_instance_row(settings: Settings, instance: str = INSTANCE) -> None:
    conn = await asyncpg.connect(settings.evolution_dsn())
    try:
        await conn.execute(
            'INSERT INTO "Instance" (id, name, "connectionStatus", "updatedAt") '
            "VALUES ($1, $2, 'open', now()) ON CONFLICT DO NOTHING",
            "inst-" + instance,
            instance,
        )
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def running_service(
    settings: Settings, *, consume: bool = True, analyzer: Any = None, drain: bool | None = None
) -> AsyncIterator[Harness]:
    """Intake (aiohttp test server) + in-process consumer and outbox drainer (as `run`
    starts them; `drain` defaults to `consume`) on the given settings."""
    from consumers.contacts import ContactConsumer
    from consumers.outbox import OutboxDrainer
    from handlers.http_app import make_app

    async with app_context(settings, analyzer=analyzer) as ctx:
        server = TestServer(make_app(ctx))
        client = TestClient(server)
        await client.start_server()
        harness = Harness(settings, ctx, client)
        try:
            if consume:
                harness.consumer = ContactConsumer(ctx)
                await harness.consumer.start()
            if consume if drain is None else drain:
                harness.drainer = OutboxDrainer(ctx)
                await harness.drainer.start()
            yield harness
        finally:
            if harness.drainer is not None:
                await harness.drainer.stop()
            if harness.consumer is not None:
                await harness.consumer.stop()
            await client.close()
