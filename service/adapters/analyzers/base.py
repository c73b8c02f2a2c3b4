"""Analyzer interface shared by the rules and OpenAI analyzers."""

from __future__ import annotations

from typing import Protocol

import msgspec

from service.domain.dialog import Dialog
from service.domain.evidence import NO_EVIDENCE, FactEvidence
from service.domain.facts import LeadFacts


class TokenUsage(msgspec.Struct, kw_only=True):
    """Usage of every call an analysis made, failed and unusable ones included."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    calls: int = 0
    # Calls that reported no usage (errors, timeouts): what the server spent on them is
    # unknown, at most the completion-token limit each.
    calls_without_usage: int = 0


class AnalysisResult(msgspec.Struct, kw_only=True):
    facts: LeadFacts
    # "rules", "openai" or "rules-fallback" (the model's answer was unusable).
    analyzer: str
    model: str | None = None
    usage: TokenUsage | None = None
    # The messages behind the facts the score stands on, from the dialog analysed.
    evidence: FactEvidence = NO_EVIDENCE
    # Citations the analyzer was given but could not trust (a model's index outside the
    # dialog it was sent, or at a message without text): left out, counted.
    evidence_dropped: int = 0


class AnalyzerUnavailableError(Exception):
    """Transient failure (rate limit, 5xx, timeout) after bounded retries: retry later."""

    def __init__(self, message: str, usage: TokenUsage | None = None) -> None:
        super().__init__(message)
        self.usage = usage  # what the failed analysis spent, to be counted all the same


class AnalyzerConfigError(Exception):
    """Permanent misconfiguration (bad key, unknown model): retrying will not help."""


class Analyzer(Protocol):
    name: str

    async def analyze(self, dialog: Dialog) -> AnalysisResult: ...

    async def close(self) -> None: ...
