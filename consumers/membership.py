"""Presence of the consume processes, so they can share the shards fairly.

Each process binds an exclusive queue to the fanout exchange `P.members` and announces
itself there every `interval` seconds (a newcomer's first message asks everybody to
answer at once). A process not heard from for `expiry` seconds is gone (killed, or its
node lost); one that stops cleanly says so. `members()` is the live list, itself
included; `changed` is set whenever it changes.

These heartbeats carry no event, so they are transient and unconfirmed: losing one only
delays a rebalance by one interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import time

import msgspec
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection
from loguru import logger
from pamqp.commands import Basic

from service.adapters.broker.topology import Topology


class Heartbeat(msgspec.Struct, kw_only=True):
    member: str
    hello: bool = False  # a newcomer: everybody answers at once
    leaving: bool = False


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Heartbeat)


def member_id() -> str:
    """host:pid plus a few random characters (a restarted pid is a new member)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class Membership:
    def __init__(
        self,
        topology: Topology,
        me: str | None = None,
        *,
        interval: float = 2.0,
        expiry: float = 7.0,
    ) -> None:
        self.me = me or member_id()
        self._topology = topology
        self._interval = interval
        self._expiry = expiry
        self._seen: dict[str, float] = {}
        self._channel: AbstractChannel | None = None  # held: aio-pika restores it
        self._task: asyncio.Task[None] | None = None
        self.changed = asyncio.Event()

    async def start(self, connection: AbstractRobustConnection) -> None:
        channel = await connection.channel(publisher_confirms=False)
        self._channel = channel
        queue = await channel.declare_queue(
            f"{self._topology.members_exchange}.{self.me}",
            exclusive=True,
            auto_delete=True,
            arguments={"x-message-ttl": round(self._expiry * 1000)},
        )
        await queue.bind(self._topology.members_exchange)
        await queue.consume(self._on_heartbeat, no_ack=True)
        await self._announce(hello=True)
        self._task = asyncio.create_task(self._beat())

    def members(self) -> list[str]:
        """Live members, sorted, this process included."""
        now = time.monotonic()
        for member, seen in list(self._seen.items()):
            if now - seen > self._expiry:
                del self._seen[member]
                logger.info("consume process {} gone (no heartbeat)", member)
                self.changed.set()
        return sorted({self.me, *self._seen})

    async def leave(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._announce(leaving=True), 2.0)

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            self.members()  # expire the silent ones
            await self._announce()

    async def _announce(self, *, hello: bool = False, leaving: bool = False) -> None:
        if self._channel is None:
            return
        body = _encoder.encode(Heartbeat(member=self.me, hello=hello, leaving=leaving))
        try:
            underlay = await self._channel.get_underlay_channel()
            await underlay.basic_publish(
                body,
                exchange=self._topology.members_exchange,
                routing_key="",
                properties=Basic.Properties(delivery_mode=1),
            )
        except Exception as exc:  # reconnecting: the next beat goes out after it
            logger.debug("heartbeat not sent: {}", exc)

    async def _on_heartbeat(self, message: AbstractIncomingMessage) -> None:
        try:
            beat = _decoder.decode(message.body)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        if beat.member == self.me:
            return
        if beat.leaving:
            if self._seen.pop(beat.member, None) is not None:
                logger.info("consume process {} left", beat.member)
                self.changed.set()
            return
        if beat.member not in self._seen:
            logger.info("consume process {} joined", beat.member)
            self.changed.set()
        self._seen[beat.member] = time.monotonic()
        if beat.hello:
            await self._announce()
