"""The app context: every long-lived dependency, built once at start and passed explicitly."""

from __future__ import annotations

from dataclasses import dataclass, field
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


@dataclass
class AppContext:
    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    store: ResultsStore | None = None
    reader: EvolutionReader | None = None
    analyzer: Analyzer | None = None
    publisher: EventPublisher | None = None
    pipeline: Pipeline | None = None
    model_lifecycle: ModelLifecycle | None = None  # shutdown-date watch of OPENAI_MODEL

    def require_store(self) -> ResultsStore:
        if self.store is None:
            raise RuntimeError("results store not configured in this process")
        return self.store

    def require_pipeline(self) -> Pipeline:
        if self.pipeline is None:
            raise RuntimeError("analysis pipeline not configured in this process")
        return self.pipeline

    def require_publisher(self) -> EventPublisher:
        if self.publisher is None:
            raise RuntimeError("event publisher not configured in this process")
        return self.publisher
