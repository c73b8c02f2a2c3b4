"""`crm-backend topology migrate`: move the events held by an older queue layout.

Queue arguments cannot change in place (RabbitMQ refuses a redeclare with other
arguments), so a new layout — quorum retry queues, leader placement, another shard
count — has new queue names (topology.py). This empties the old queues into the new ones:

1. the first layout's classic retry queues `P.retry.<tier>`: unbound from `P.retry` (so
   nothing new arrives), then every message is moved to the quorum retry queue of the
   same tier, re-grouped by the current shard count;
2. the old shard queues — `P.contacts.<i>` of the first layout, or
   `P.contacts.<i>-of-<M>` with `--from-shards M` — moved into the current shard queues.

Each message is acked only after every part of it is confirmed and routed, so a failure
at any point leaves it where it was (a part already moved is analysed twice at most; the
pipeline skips what is stored). Messages still held by a running old consumer are not
visible: the old queue is kept (reported) and the command can run again once those
consumers are stopped. Empty, unused old queues are deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aiormq
import msgspec
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
)

from service.adapters.broker.confirm import publish_confirmed
from service.adapters.broker.connection import connect_once
from service.adapters.broker.envelope import (
    H_ATTEMPT,
    H_ERROR,
    batch_headers,
    by_shard,
    decode_batch,
    encode_batch,
    header_int,
)
from service.adapters.broker.topology import H_LEGACY_RETRY_TIER, Topology
from service.config import Settings

_PREFETCH = 50
_IDLE = 1.5  # seconds without a delivery: the queue is drained (or held by another)


class QueueMove(msgspec.Struct, kw_only=True):
    queue: str
    messages: int = 0  # moved (acked in the old queue)
    dead_lettered: int = 0  # undecodable: sent to the DLQ
    deleted: bool = False
    left: int = 0  # still in the old queue (held by a running consumer)


class MigrationReport(msgspec.Struct, kw_only=True):
    moved: list[QueueMove] = msgspec.field(default_factory=list)

    @property
    def complete(self) -> bool:
        return all(move.deleted for move in self.moved)


async def migrate_topology(settings: Settings, from_shards: int | None = None) -> MigrationReport:
    topology = Topology(settings)
    if from_shards == settings.queue_shards:
        raise ValueError(f"--from-shards {from_shards} is the current QUEUE_SHARDS")
    report = MigrationReport()
    connection = await connect_once(settings, "migrate")
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await topology.declare(channel)
        for tier in range(1024):
            name = topology.legacy_retry_queue(tier)
            if not await _exists(connection, name):
                break
            queue = await channel.get_queue(name, ensure=False)
            await queue.unbind(
                topology.retry_exchange,
                "",
                arguments={"x-match": "all-with-x", H_LEGACY_RETRY_TIER: str(tier)},
            )
            report.moved.append(await _drain(connection, channel, topology, queue, tier + 1))
        if from_shards is None:
            names = []
            for shard in range(1024):
                name = topology.legacy_shard_queue(shard)
                if not await _exists(connection, name):
                    break
                names.append(name)
        else:
            names = [topology.shard_queue(i, from_shards) for i in range(from_shards)]
        for name in names:
            if not await _exists(connection, name):
                continue
            queue = await channel.get_queue(name, ensure=False)
            report.moved.append(await _drain(connection, channel, topology, queue, None))
    finally:
        with contextlib.suppress(Exception):
            await connection.close()
    return report


async def _exists(connection: AbstractConnection, name: str) -> bool:
    # A passive declare of a missing queue closes its channel: a throwaway one.
    channel = await connection.channel()
    try:
        await channel.declare_queue(name, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        return False
    finally:
        with contextlib.suppress(Exception):
            await channel.close()
    return True


async def _drain(
    connection: AbstractConnection,
    channel: AbstractChannel,
    topology: Topology,
    queue: AbstractQueue,
    retry_attempt: int | None,
) -> QueueMove:
    """Move every message of `queue`: to the retry queue of `retry_attempt`'s tier, or
    (None) straight into the shard queues."""
    move = QueueMove(queue=queue.name)
    # Consumed, not fetched: quorum queues with a single active consumer refuse basic.get
    # (rabbit_fifo.erl: `{unsupported, single_active_consumer}`). While an old consumer
    # is active this one is a standby and receives nothing: the queue is left, reported.
    reader = await connection.channel()
    await reader.set_qos(prefetch_count=_PREFETCH)
    inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
    source = await reader.get_queue(queue.name, ensure=False)
    tag = await source.consume(inbox.put, no_ack=False)
    try:
        while True:
            try:
                message = await asyncio.wait_for(inbox.get(), _IDLE)
            except TimeoutError:
                break
            await _move(channel, topology, message, retry_attempt, move)
    finally:
        with contextlib.suppress(Exception):
            await source.cancel(tag)
        with contextlib.suppress(Exception):
            await reader.close()
    move.deleted, move.left = await _delete_if_empty(connection, queue.name)
    return move


async def _move(
    channel: AbstractChannel,
    topology: Topology,
    message: AbstractIncomingMessage,
    retry_attempt: int | None,
    move: QueueMove,
) -> None:
    headers: dict[str, Any] = dict(message.headers or {})
    headers.pop(H_LEGACY_RETRY_TIER, None)
    try:
        batch = decode_batch(message.body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        headers[H_ERROR] = "undecodable (found by topology migrate)"
        await publish_confirmed(
            channel, topology.dlx_exchange, message.routing_key or "", message.body, headers
        )
        await message.ack()
        move.dead_lettered += 1
        return
    for shard, events in by_shard(batch.events, topology.shards).items():
        part = batch_headers(events, {**headers, H_ATTEMPT: header_int(headers.get(H_ATTEMPT))})
        if retry_attempt is None:
            exchange = topology.intake_exchange
        else:
            exchange = topology.retry_exchange
            part.update(topology.retry_headers(retry_attempt))
        await publish_confirmed(
            channel, exchange, topology.shard_key(shard), encode_batch(events), part
        )
    await message.ack()
    move.messages += 1


async def _delete_if_empty(connection: AbstractConnection, name: str) -> tuple[bool, int]:
    """Delete the old queue when nothing uses it and it holds nothing (quorum queues
    refuse `if-unused` and `if-empty` outright — a connection error — so both are checked
    just before; a message published in between would be lost, but nothing routes to an
    old queue any more: its bindings use keys no current publisher sends)."""
    channel = await connection.channel()
    try:
        queue = await channel.declare_queue(name, passive=True)
        left = int(queue.declaration_result.message_count or 0)
        if left or queue.declaration_result.consumer_count:
            return False, left
        await channel.queue_delete(name)
        return True, 0
    finally:
        with contextlib.suppress(Exception):
            await channel.close()
