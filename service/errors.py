"""One-line explanations of the failures a user meets at the command line."""

from __future__ import annotations

import socket


def explain(exc: BaseException) -> str | None:
    """A clear line for an expected operational error, or None for a real bug."""
    from service.analyzers.base import AnalyzerConfigError
    from service.stores.base import DuplicateLeadError, StoreUnavailableError

    if isinstance(exc, StoreUnavailableError | AnalyzerConfigError | DuplicateLeadError):
        return str(exc)
    name = type(exc).__name__
    # Typed errors of adapters that may not be importable in every build.
    if name in {
        "EvolutionUnavailableError",
        "BrokerUnavailableError",
        "InstanceOwnedError",
        "TopologyError",
    }:
        return str(exc)
    module = type(exc).__module__
    if module.startswith("asyncpg"):
        return f"database error: {exc}"
    if module.startswith(("aiormq", "aio_pika", "pamqp")):
        return f"RabbitMQ error ({name}): {exc or 'connection failed'} — is AMQP_URL right?"
    if isinstance(exc, ConnectionRefusedError | socket.gaierror | TimeoutError | OSError):
        return f"cannot connect: {exc}"
    return None
