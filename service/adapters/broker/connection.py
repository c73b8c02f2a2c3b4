"""Robust connections to a RabbitMQ cluster: any live node, failing over on loss.

aio-pika's `RobustConnection` reconnects to the one URL it was given. Here every connect
attempt — the first ones and each reconnect after a drop — takes the next node of
AMQP_URL's list, so the connection (and the channels, queues and consumers aio-pika
restores on it) moves to a live node within about one `reconnect_interval`.

aio-pika starts each attempt by clearing `transport` (robust_connection.py,
`__connect_transport`), then opens `self.url` (connection.py, `Connection.connect`);
that moment is where the next node is chosen.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
from typing import Any

import aio_pika
from aio_pika.abc import AbstractConnection, AbstractRobustConnection
from aio_pika.robust_connection import RobustConnection
from loguru import logger
from yarl import URL

from service.amqp_urls import redact
from service.config import Settings


def connection_name(role: str) -> str:
    """Shown by `rabbitmqctl list_connections client_properties` and the management UI."""
    return f"crm-{role} {socket.gethostname()} pid {os.getpid()}"


class MultiNodeConnection(RobustConnection):
    """A robust connection that tries the cluster's nodes in turn."""

    def __init__(self, url: URL, nodes: list[str] | None = None, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        # Set after the base __init__ (which clears `transport` too): attempt one opens
        # the first node.
        self._nodes = [URL(node) for node in (nodes or [str(url)])]
        self._next = 0
        self._tries = 0  # connect attempts since the last success

    @property  # type: ignore[override]
    def transport(self) -> Any:
        return self.__dict__.get("_transport")

    @transport.setter
    def transport(self, value: Any) -> None:
        if value is None and "_nodes" in self.__dict__:
            self._advance()
        self.__dict__["_transport"] = value

    def _advance(self) -> None:
        node = self._nodes[self._next % len(self._nodes)]
        self._next += 1
        self._tries += 1
        logger.debug("RabbitMQ: connecting to node {}", redact(str(node)))
        self.url = node

    async def _on_connected(self) -> None:
        self._tries = 0
        await super()._on_connected()

    @property
    def unreachable(self) -> bool:
        """Not connected, and every node refused an attempt since the connection was
        lost: callers should fail at once rather than wait for the next round."""
        return not self.connected.is_set() and self._tries > len(self._nodes)

    @property
    def node(self) -> str:
        """The node currently (or last) connected to, without its password."""
        return redact(str(self.url))


async def connect_cluster(
    settings: Settings,
    role: str,
    *,
    timeout: float = 5.0,  # noqa: ASYNC109 - per connect attempt, as aio-pika takes it
    reconnect_interval: float = 1.0,
) -> AbstractRobustConnection:
    """Connect to the first live node of AMQP_URL (starting at a random one, so processes
    spread over the nodes); later drops fail over to the other nodes.

    Raises the last node's error when none answers (like `connect_robust`)."""
    nodes = settings.amqp_node_urls()
    start = random.randrange(len(nodes))
    order = nodes[start:] + nodes[:start]
    last: BaseException | None = None
    for first in range(len(order)):
        rotated = order[first:] + order[:first]
        try:
            connection = await aio_pika.connect_robust(
                rotated[0],
                connection_class=MultiNodeConnection,
                nodes=rotated,
                client_properties={"connection_name": connection_name(role)},
                timeout=timeout,
                reconnect_interval=reconnect_interval,
            )
        except (OSError, aio_pika.exceptions.AMQPError, TimeoutError) as exc:
            last = exc
            if len(order) > 1:
                logger.warning(
                    "RabbitMQ node {} unreachable: {}", redact(rotated[0]), type(exc).__name__
                )
            continue
        return connection
    assert last is not None
    raise last


async def connect_until_up(
    settings: Settings, role: str, stop: asyncio.Event | None = None
) -> AbstractRobustConnection:
    """connect_cluster, retried with backoff (0.5 s doubling to 15 s) while no node
    answers; gives up with the error once `stop` is set. Only this first connect can
    fail: later drops are recovered (on any node) by the robust connection itself."""
    delay = 0.5
    while True:
        try:
            return await connect_cluster(settings, role)
        except (OSError, aio_pika.exceptions.AMQPError, TimeoutError) as exc:
            logger.warning("broker unreachable, retrying in {:.1f}s: {}", delay, exc)
            if stop is not None and stop.is_set():
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 15.0)


async def connect_once(
    settings: Settings,
    role: str,
    *,
    timeout: float = 5.0,  # noqa: ASYNC109 - per node, as aio-pika takes it
) -> AbstractConnection:
    """A plain (not robust) connection to the first node of AMQP_URL that answers, for
    short jobs (`dlq`, `topology migrate`, `/ready`); raises the last node's error."""
    last: BaseException | None = None
    for url in settings.amqp_node_urls():
        try:
            return await aio_pika.connect(
                url,
                client_properties={"connection_name": connection_name(role)},
                timeout=timeout,
            )
        except (OSError, aio_pika.exceptions.AMQPError, TimeoutError) as exc:
            last = exc
    assert last is not None
    raise last
