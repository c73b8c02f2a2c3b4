"""A benchmark's server in its own process, so load generator and server do not share a
core (module name starts with `_`: not a benchmark)."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import socket
from collections.abc import Callable, Iterator
from typing import Any


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@contextlib.contextmanager
def server_process(
    target: Callable[..., None], *args: Any, name: str = "server"
) -> Iterator[tuple[str, int | None]]:
    """Run `target(*args, port, ready_event)` in a spawned process; yield (base URL, pid)."""
    port = free_port()
    spawn = multiprocessing.get_context("spawn")
    ready = spawn.Event()
    process = spawn.Process(target=target, args=(*args, port, ready), daemon=True)
    process.start()
    try:
        if not ready.wait(30):
            raise RuntimeError(f"{name} server did not start")
        yield f"http://127.0.0.1:{port}", process.pid
    finally:
        if process.pid is not None and process.is_alive():
            os.kill(process.pid, signal.SIGTERM)
        process.join(15)
        if process.is_alive():
            process.kill()
