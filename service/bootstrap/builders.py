"""Builds a process's parts once at start: the adapters it needs, nothing more.

`serve`, `consume` and `run` get an AppContext (what the HTTP app and the consumers
share); `backfill` and the admin commands get typed parts with every field present.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from service.adapters.analyzers.base import Analyzer
from service.adapters.broker.notifier import HotLeads
from service.adapters.broker.topology import Topology
from service.adapters.evolution.reader import EvolutionReader
from service.adapters.stores.base import ResultsStore
from service.adapters.stores.factory import open_store
from service.bootstrap.context import AppContext
from service.config import Settings
from service.metrics import Metrics
from service.usecases.pipeline import Pipeline


def make_analyzer(settings: Settings) -> Analyzer:
    from service.adapters.analyzers.rules import RulesAnalyzer

    rules = RulesAnalyzer(timeout=settings.analysis_timeout)
    if settings.analyzer_kind() == "rules":
        return rules
    from service.adapters.analyzers.openai_analyzer import OpenAIAnalyzer

    return OpenAIAnalyzer(settings, fallback=rules)


@contextlib.asynccontextmanager
async def app_context(
    settings: Settings,
    *,
    store: bool = True,
    reader: bool = True,
    analyzer: bool = True,
    publisher: bool = False,
    metrics: Metrics | None = None,
    hot_leads: bool = False,
    lifecycle: bool = False,
    warm: bool = False,
) -> AsyncIterator[AppContext]:
    """Open the requested adapters; close them all on exit, newest first. `warm`: open
    the database pools with a connection per parallel analysis (consuming processes)."""
    ctx = AppContext(settings=settings, metrics=metrics or Metrics())
    async with contextlib.AsyncExitStack() as stack:
        if store:
            from service.adapters.stores.factory import open_store

            ctx.store = await open_store(settings, warm=warm)
            stack.push_async_callback(ctx.store.close)
        if reader:
            from service.adapters.evolution.reader import READER_POOL_SIZE, EvolutionReader
            from service.adapters.stores.factory import warm_pool_size

            url = settings.evolution_url()
            ctx.reader = await EvolutionReader.connect(
                url.dsn,
                url.schema or "auto",
                pooler=url.pooler,
                min_size=warm_pool_size(settings, READER_POOL_SIZE) if warm else 1,
                max_size=READER_POOL_SIZE,
            )
            stack.push_async_callback(ctx.reader.close)
        if analyzer:
            ctx.analyzer = make_analyzer(settings)
            stack.push_async_callback(ctx.analyzer.close)
            if lifecycle and settings.analyzer_kind() == "openai":
                from service.adapters.analyzers.model_lifecycle import ModelLifecycle

                ctx.model_lifecycle = ModelLifecycle(settings, ctx.metrics)
                stack.push_async_callback(ctx.model_lifecycle.close)
                ctx.model_lifecycle.start()
        if publisher:
            from service.adapters.broker.publisher import EventPublisher

            ctx.publisher = EventPublisher(settings)
            stack.push_async_callback(ctx.publisher.close)
        if hot_leads:
            ctx.hot_leads = HotLeads(Topology(settings), ctx.metrics)
        if ctx.store is not None and ctx.reader is not None and ctx.analyzer is not None:
            ctx.pipeline = Pipeline(
                settings, ctx.reader, ctx.store, ctx.analyzer, ctx.metrics, on_hot=ctx.hot_leads
            )
        yield ctx


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
    settings: Settings, stack: contextlib.AsyncExitStack
) -> tuple[ResultsStore, EvolutionReader]:
    store = await open_store(settings)
    stack.push_async_callback(store.close)
    url = settings.evolution_url()
    reader = await EvolutionReader.connect(url.dsn, url.schema or "auto", pooler=url.pooler)
    stack.push_async_callback(reader.close)
    return store, reader
