"""The model's evidence read back: message numbers checked against the prompt it was sent.

The model names messages by the numbers the prompt gave them (`#N`); it never writes a
quote. A number counts only when it is an integer naming a line of the dialog block that
request carried, whose message has text; anything else is dropped and counted. The quote
is cut by code from that message's text, so it is always verbatim.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from service.domain.dialog import Dialog
from service.domain.evidence import (
    EVIDENCE_FACTS,
    MAX_PER_FACT,
    Evidence,
    FactEvidence,
    cite_hint,
    fact_evidence,
)
from service.domain.facts import LeadFacts


class LooseAnswer(LeadFacts, kw_only=True, forbid_unknown_fields=True):
    """The answer as decoded: the facts strictly, the evidence as whatever came (servers
    without strict schemas may leave it out or shape it wrongly; it is checked below)."""

    evidence: Any = None


def split_answer(answer: LooseAnswer) -> tuple[LeadFacts, Any]:
    facts = LeadFacts(**{name: getattr(answer, name) for name in LeadFacts.__struct_fields__})
    return facts, answer.evidence


def _hint(facts: LeadFacts, fact: str) -> str | None:
    """Where in a cited message the quote should be cut (the fact's own words)."""
    if fact == "ad_budget":
        return facts.ad_budget
    if fact == "niche":
        return facts.business_type
    return None


def read_evidence(
    raw: Any, facts: LeadFacts, dialog: Dialog, shown: Sequence[int]
) -> tuple[FactEvidence, int]:
    """Evidence from the model's numbers, and how many of them were dropped."""
    if raw is None:
        return fact_evidence({}), 0
    if not isinstance(raw, dict):
        return fact_evidence({}), 1
    cited: dict[str, list[Evidence]] = {}
    dropped = 0
    for fact in EVIDENCE_FACTS:
        numbers = raw.get(fact, [])
        if not isinstance(numbers, list):
            dropped += 1
            continue
        seen: set[int] = set()
        for number in numbers:
            if not isinstance(number, int) or isinstance(number, bool):
                dropped += 1
                continue
            if not 1 <= number <= len(shown):
                dropped += 1  # a message the request did not carry
                continue
            if number in seen or len(seen) >= MAX_PER_FACT:
                continue  # a repeat, or more than is kept: not wrong, just not needed
            message = dialog.messages[shown[number - 1]]
            evidence = cite_hint(message, _hint(facts, fact)) if message.text.strip() else None
            if evidence is None:
                dropped += 1
                continue
            seen.add(number)
            cited.setdefault(fact, []).append(evidence)
    return fact_evidence(cited), dropped


def decode_loose(content: str | bytes) -> LooseAnswer:
    return msgspec.json.decode(content, type=LooseAnswer)
