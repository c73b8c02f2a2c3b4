"""One-line explanations of the failures a user meets at the command line."""

from __future__ import annotations

import socket


def explain(exc: BaseException) -> str | None:
    """A clear line for an expected operational error, or None for a real bug."""
    from service.adapters.analyzers.base import AnalyzerConfigError
    from service.adapters.broker.publisher import BrokerUnavailableError
    from service.adapters.broker.topology import TopologyError
    from service.adapters.evolution.reader import EvolutionUnavailableError
    from service.adapters.stores.base import (
        DuplicateLeadError,
        InstanceOwnedError,
        StoreUnavailableError,
    )
    from service.adapters.stores.migrations import MigrationConnectionError, PackageDataError

    explained = (
        StoreUnavailableError,
        AnalyzerConfigError,
        DuplicateLeadError,
        InstanceOwnedError,
        EvolutionUnavailableError,
        BrokerUnavailableError,
        TopologyError,
        PackageDataError,
        MigrationConnectionError,
    )
    if isinstance(exc, explained):
        return str(exc)
    module = type(exc).__module__
    if module.startswith("asyncpg"):
        return f"database error: {exc}"
    if module.startswith(("aiormq", "aio_pika", "pamqp")):
        reason = exc or "connection failed"
        return f"RabbitMQ error ({type(exc).__name__}): {reason} — is AMQP_URL right?"
    if isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError):
        return f"cannot read a file: {exc}"  # not a network failure: no "cannot connect"
    if isinstance(exc, ConnectionRefusedError | socket.gaierror | TimeoutError | OSError):
        return f"cannot connect: {exc}"
    return None
