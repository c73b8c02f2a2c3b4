"""A whole AppContext around the parts a test opened itself (the rest opened here).

The HTTP app and the consumers take an AppContext with every part present, as a real
process has. A test that exercises one part (intake, the REST store, /ready) passes what
it built; the parts it does not care about are real too: a store and a reader on the
server's `postgres` database, the rules analyzer, a publisher (it connects on first use).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from service.adapters.analyzers.base import Analyzer
from service.adapters.analyzers.model_lifecycle import ModelLifecycle
from service.adapters.analyzers.rules import RulesAnalyzer
from service.adapters.broker.publisher import EventPublisher
from service.adapters.evolution.reader import EvolutionReader
from service.adapters.stores.base import ResultsStore
from service.adapters.stores.postgres import PostgresStore
from service.bootstrap.builders import assemble
from service.bootstrap.context import AppContext
from service.config import Settings
from service.metrics import Metrics
from tests.conftest import PG_HOST, PG_PORT, PG_USER


def server_dsn() -> str:
    """The test server's maintenance database (always there, holds no table of ours)."""
    return f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/postgres"


@contextlib.asynccontextmanager
async def parts_around(
    settings: Settings,
    store: ResultsStore | None = None,
    *,
    reader: EvolutionReader | None = None,
    analyzer: Analyzer | None = None,
    metrics: Metrics | None = None,
    publisher: EventPublisher | None = None,
    model_lifecycle: ModelLifecycle | None = None,
) -> AsyncIterator[AppContext]:
    """An AppContext of the given parts; those not given are opened here and closed on exit
    (the given ones stay the caller's to close)."""
    async with contextlib.AsyncExitStack() as stack:
        if store is None:
            store = await PostgresStore.open(server_dsn())
            stack.push_async_callback(store.close)
        if reader is None:
            reader = await EvolutionReader.connect(server_dsn())
            stack.push_async_callback(reader.close)
        if analyzer is None:
            analyzer = RulesAnalyzer()
            stack.push_async_callback(analyzer.close)
        if publisher is None:
            publisher = EventPublisher(settings)
            stack.push_async_callback(publisher.close)
        yield assemble(
            settings,
            store,
            reader,
            analyzer,
            metrics=metrics or Metrics(),
            publisher=publisher,
            model_lifecycle=model_lifecycle,
        )
