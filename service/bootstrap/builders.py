"""Builds a process's parts once at start: the adapters it needs, nothing more.

`serve`, `consume` and `run` get an AppContext (what the HTTP app and the consumers
share, every part present); `backfill` and the admin commands get narrower typed parts.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from service.adapters.analyzers.base import Analyzer
from service.adapters.evolution.reader import EvolutionReader
from service.adapters.stores.base import ResultsStore
from service.adapters.stores.factory import open_store
from service.bootstrap.context import AppContext
from service.config import Settings
from service.metrics import Metrics
from service.usecases.pipeline import Pipeline

if TYPE_CHECKING:
    from service.adapters.analyzers.model_lifecycle import ModelLifecycle
    from service.adapters.broker.publisher import EventPublisher


def make_analyzer(settings: Settings) -> Analyzer:
    from service.adapters.analyzers.rules import RulesAnalyzer

    rules = RulesAnalyzer(timeout=settings.analysis_timeout)
    if settings.analyzer_kind() == "rules":
        return rules
    from service.adapters.analyzers.openai_analyzer import OpenAIAnalyzer

    return OpenAIAnalyzer(settings, fallback=rules)


def assemble(
    settings: Settings,
    store: ResultsStore,
    reader: EvolutionReader,
    analyzer: Analyzer,
    *,
    metrics: Metrics,
    publisher: EventPublisher,
    model_lifecycle: ModelLifecycle | None = None,
) -> AppContext:
    """An AppContext from opened parts (the pipeline is built over them)."""
    return AppContext(
        settings=settings,
        metrics=metrics,
        store=store,
        reader=reader,
        analyzer=analyzer,
        pipeline=Pipeline(settings, reader, store, analyzer, metrics),
        publisher=publisher,
        model_lifecycle=model_lifecycle,
    )


@contextlib.asynccontextmanager
async def app_context(
    settings: Settings,
    *,
    analyzer: Analyzer | None = None,
    metrics: Metrics | None = None,
    lifecycle: bool = False,
    warm: bool = False,
) -> AsyncIterator[AppContext]:
    """Open every part of a serve/consume/run process; close them on exit, newest first.
    `analyzer`: use this one (the caller closes it) instead of ANALYZER's. `lifecycle`:
    watch the OpenAI model's shutdown date. `warm`: database pools with a connection per
    parallel analysis (consuming processes)."""
    from service.adapters.broker.publisher import EventPublisher

    metrics = metrics or Metrics()
    async with contextlib.AsyncExitStack() as stack:
        store, reader = await _databases(settings, stack, warm=warm)
        if analyzer is None:
            analyzer = make_analyzer(settings)
            stack.push_async_callback(analyzer.close)
        watch: ModelLifecycle | None = None
        if lifecycle and settings.analyzer_kind() == "openai":
            from service.adapters.analyzers.model_lifecycle import ModelLifecycle

            watch = ModelLifecycle(settings, metrics)
            stack.push_async_callback(watch.close)
            watch.start()
        publisher = EventPublisher(settings)
        stack.push_async_callback(publisher.close)
        yield assemble(
            settings,
            store,
            reader,
            analyzer,
            metrics=metrics,
            publisher=publisher,
            model_lifecycle=watch,
        )


@dataclass(frozen=True)
class ReadParts:
    """`backfill --dry-run`, `eval --from-edits`: the results store and Evolution's DB."""

    settings: Settings
    store: ResultsStore
    reader: EvolutionReader


@dataclass(frozen=True)
class BackfillParts(ReadParts):
    """`backfill`: the analysis pipeline over the same two databases."""

    metrics: Metrics
    pipeline: Pipeline


@contextlib.asynccontextmanager
async def read_parts(settings: Settings) -> AsyncIterator[ReadParts]:
    async with contextlib.AsyncExitStack() as stack:
        store, reader = await _databases(settings, stack)
        yield ReadParts(settings=settings, store=store, reader=reader)


@contextlib.asynccontextmanager
async def backfill_parts(settings: Settings) -> AsyncIterator[BackfillParts]:
    async with contextlib.AsyncExitStack() as stack:
        store, reader = await _databases(settings, stack)
        analyzer = make_analyzer(settings)
        stack.push_async_callback(analyzer.close)
        metrics = Metrics()
        yield BackfillParts(
            settings=settings,
            store=store,
            reader=reader,
            metrics=metrics,
            pipeline=Pipeline(settings, reader, store, analyzer, metrics),
        )


async def _databases(
    settings: Settings, stack: contextlib.AsyncExitStack, *, warm: bool = False
) -> tuple[ResultsStore, EvolutionReader]:
    """The results store and Evolution's database, closed with `stack`."""
    from service.adapters.evolution.reader import READER_POOL_SIZE
    from service.adapters.stores.factory import warm_pool_size

    store = await open_store(settings, warm=warm)
    stack.push_async_callback(store.close)
    url = settings.evolution_url()
    reader = await EvolutionReader.connect(
        url.dsn,
        url.schema or "auto",
        pooler=url.pooler,
        min_size=warm_pool_size(settings, READER_POOL_SIZE) if warm else 1,
        max_size=READER_POOL_SIZE,
    )
    stack.push_async_callback(reader.close)
    return store, reader
