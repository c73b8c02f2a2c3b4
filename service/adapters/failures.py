"""One table: each adapter error, the line the command line prints, the HTTP status.

An error listed here is an operational failure (a dependency down, a wrong credential, a
conflict), not a bug: the CLI prints one line and exits 2, the REST API answers its status
without a traceback. Anything else is a fault of the service itself.
"""

from __future__ import annotations

import socket
from typing import NamedTuple

from service.adapters.analyzers.base import AnalyzerConfigError, AnalyzerUnavailableError
from service.adapters.broker.confirm import BrokerUnavailableError
from service.adapters.broker.topology import TopologyError
from service.adapters.evolution.reader import EvolutionUnavailableError
from service.adapters.stores.base import (
    DuplicateLeadError,
    InstanceOwnedError,
    StoreUnavailableError,
)
from service.adapters.stores.migrations import MigrationConnectionError, PackageDataError


class Failure(NamedTuple):
    kind: type[BaseException]
    cli: bool  # the error's own message is the CLI's line
    http_status: int | None  # None: not expected behind the REST API (a 500 there)
    http_error: str | None = None  # the body's `error`; None: named after the dependency


FAILURES: tuple[Failure, ...] = (
    Failure(StoreUnavailableError, True, 503, "results database unavailable, retry later"),
    Failure(EvolutionUnavailableError, True, 503),
    Failure(BrokerUnavailableError, True, 503),
    Failure(AnalyzerUnavailableError, False, 503),
    Failure(AnalyzerConfigError, True, None),
    Failure(DuplicateLeadError, True, None),
    Failure(InstanceOwnedError, True, None),
    Failure(TopologyError, True, None),
    Failure(PackageDataError, True, None),
    Failure(MigrationConnectionError, True, None),
)


def failure_of(exc: BaseException) -> Failure | None:
    for failure in FAILURES:
        if isinstance(exc, failure.kind):
            return failure
    return None


def http_failure(exc: BaseException) -> tuple[int, str] | None:
    """(status, error) for a dependency failure behind the REST API, None for a bug."""
    failure = failure_of(exc)
    if failure is None or failure.http_status is None:
        return None
    error = failure.http_error or f"service dependency unavailable ({type(exc).__name__})"
    return failure.http_status, error


def cli_line(exc: BaseException) -> str | None:
    """A clear line for an expected operational error, or None for a real bug."""
    failure = failure_of(exc)
    if failure is not None and failure.cli:
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
