"""What a `serve`, `consume` or `run` process is built from: every part present.

Built once at start by `bootstrap.builders.app_context` and passed explicitly. Commands
that need less (`backfill`, `eval`, admin commands) get narrower typed parts there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from service.config import Settings
from service.metrics import Metrics

if TYPE_CHECKING:
    from service.adapters.analyzers.base import Analyzer
    from service.adapters.analyzers.model_lifecycle import ModelLifecycle
    from service.adapters.broker.publisher import EventPublisher
    from service.adapters.evolution.reader import EvolutionReader
    from service.adapters.stores.base import ResultsStore
    from service.usecases.pipeline import Pipeline


@dataclass(frozen=True)
class AppContext:
    settings: Settings
    metrics: Metrics
    store: ResultsStore
    reader: EvolutionReader
    analyzer: Analyzer
    pipeline: Pipeline
    # Connects on first use: a process that never publishes never opens a channel.
    publisher: EventPublisher
    # The shutdown-date watch of OPENAI_MODEL: present only with the OpenAI analyzer.
    model_lifecycle: ModelLifecycle | None = None
