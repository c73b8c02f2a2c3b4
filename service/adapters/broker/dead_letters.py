"""The dead-letter queue: its depth, its letters (`crm-backend dlq list`), their replay."""

from __future__ import annotations

import contextlib
from typing import Any

import msgspec
from aio_pika.abc import AbstractIncomingMessage

from service.adapters.broker.confirm import publish_confirmed
from service.adapters.broker.connection import connect_once
from service.adapters.broker.envelope import (
    H_ATTEMPT,
    H_DEATH,
    H_ERROR,
    batch_headers,
    by_shard,
    decode_batch,
    encode_batch,
    header_int,
)
from service.adapters.broker.topology import Topology
from service.config import Settings
from service.logs import contact_hash_key, keyed_contact_hash


class DeadLetter(msgspec.Struct, kw_only=True):
    position: int
    error: str | None
    attempts: int
    decodable: bool
    events: int
    instances: list[str]
    contacts: list[str]  # contact hashes, not phone numbers
    first_event_at: int | None  # Unix seconds of the oldest event


class ReplayResult(msgspec.Struct, kw_only=True):
    replayed: int = 0  # messages re-queued for analysis
    events: int = 0  # events they carried
    kept: int = 0  # left in the DLQ (undecodable)


def _describe(position: int, message: AbstractIncomingMessage, key: bytes) -> DeadLetter:
    headers = dict(message.headers or {})
    error = headers.get(H_ERROR)
    try:
        batch = decode_batch(message.body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return DeadLetter(
            position=position,
            error=str(error) if error is not None else None,
            attempts=header_int(headers.get(H_ATTEMPT)),
            decodable=False,
            events=0,
            instances=[],
            contacts=[],
            first_event_at=None,
        )
    return DeadLetter(
        position=position,
        error=str(error) if error is not None else _death_reason(headers),
        attempts=header_int(headers.get(H_ATTEMPT)),
        decodable=True,
        events=len(batch.events),
        instances=sorted({e.instance for e in batch.events}),
        contacts=sorted(
            {keyed_contact_hash(key, e.contact_key.split("@", 1)[0]) for e in batch.events}
        ),
        first_event_at=min((e.timestamp for e in batch.events), default=None),
    )


def _death_reason(headers: dict[str, Any]) -> str | None:
    """Messages dead-lettered by the broker itself (delivery limit) carry x-death."""
    deaths = headers.get(H_DEATH)
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], dict):
        return f"broker: {deaths[0].get('reason')}"
    return None


async def list_dead(settings: Settings, limit: int = 100) -> tuple[int, list[DeadLetter]]:
    """(queue depth, the first `limit` dead letters); nothing is removed."""
    topology = Topology(settings)
    key = contact_hash_key(settings)
    connection = await connect_once(settings, "dlq")
    held: list[AbstractIncomingMessage] = []
    try:
        channel = await connection.channel()
        await topology.declare(channel)
        queue = await channel.get_queue(topology.dead_queue, ensure=True)
        depth = queue.declaration_result.message_count or 0
        letters: list[DeadLetter] = []
        while len(letters) < limit:
            message = await queue.get(no_ack=False, fail=False)
            if message is None:
                break
            held.append(message)
            letters.append(_describe(len(letters) + 1, message, key))
        for message in held:
            await message.nack(requeue=True)
        return depth, letters
    finally:
        with contextlib.suppress(Exception):
            await connection.close()


async def dead_queue_depth(settings: Settings, timeout: float) -> int:  # noqa: ASYNC109
    """Messages in the dead-letter queue (passive declare: nothing is created)."""
    connection = await connect_once(settings, "ready", timeout=timeout)
    try:
        channel = await connection.channel()
        queue = await channel.declare_queue(Topology(settings).dead_queue, passive=True)
        return int(queue.declaration_result.message_count or 0)
    finally:
        with contextlib.suppress(Exception):
            await connection.close()


async def replay_dead(settings: Settings, limit: int | None = None) -> ReplayResult:
    """Re-queue dead letters for analysis (attempts reset); undecodable ones stay."""
    topology = Topology(settings)
    result = ReplayResult()
    connection = await connect_once(settings, "dlq")
    kept: list[AbstractIncomingMessage] = []
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await topology.declare(channel)
        queue = await channel.get_queue(topology.dead_queue, ensure=True)
        while limit is None or result.replayed < limit:
            message = await queue.get(no_ack=False, fail=False)
            if message is None:
                break
            try:
                batch = decode_batch(message.body)
            except (msgspec.DecodeError, msgspec.ValidationError):
                kept.append(message)
                continue
            # Group by shard again: the shard count may have changed since. Each part
            # confirmed and routed before the dead letter is acked: a failure leaves it in
            # the DLQ (a part already sent is then analysed twice at most).
            for shard, events in by_shard(batch.events, settings.queue_shards).items():
                await publish_confirmed(
                    channel,
                    topology.intake_exchange,
                    topology.shard_key(shard),
                    encode_batch(events),
                    batch_headers(events, {H_ATTEMPT: 0}),
                )
            await message.ack()
            result.replayed += 1
            result.events += len(batch.events)
        for message in kept:
            await message.nack(requeue=True)
        result.kept = len(kept)
        return result
    finally:
        with contextlib.suppress(Exception):
            await connection.close()
