"""Evidence: the messages behind a fact, each with a short verbatim quote.

A score line points at the messages that earned it (where the budget was named, where
the meeting was agreed). `message_id` is Evolution's `key.id`; `quote` is always a
substring of that message's text, cut by code (never written by a model), at most
`QUOTE_CHARS` long and cut on word boundaries where the text has them. Pure.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import Annotated, Any, Literal, get_args

import msgspec

from service.domain.dialog import Dialog, DialogMessage

QUOTE_CHARS = 120
_WORD = re.compile(r"\S")
# Evidence kept per fact: enough to show why, short enough for a CSV cell.
MAX_PER_FACT = 3

# The facts a score line stands on (see scoring.score).
EvidenceFact = Literal["funnel_stage", "niche", "is_owner", "ad_budget"]
EVIDENCE_FACTS: tuple[str, ...] = get_args(EvidenceFact)


class Evidence(msgspec.Struct, frozen=True):
    """One message behind a fact."""

    message_id: Annotated[str, msgspec.Meta(description="Evolution's key.id of the message")]
    quote: Annotated[
        str,
        msgspec.Meta(
            description=f"Verbatim part of the message's text, at most {QUOTE_CHARS} chars"
        ),
    ]


Citations = tuple[Evidence, ...]


class FactEvidence(msgspec.Struct, frozen=True, kw_only=True):
    """The evidence of each fact a score line stands on (empty: none found)."""

    funnel_stage: Citations = ()
    niche: Citations = ()
    is_owner: Citations = ()
    ad_budget: Citations = ()

    def of(self, fact: str) -> Citations:
        cited: Citations = getattr(self, fact, ())
        return cited

    def count(self) -> int:
        return sum(len(self.of(fact)) for fact in EVIDENCE_FACTS)


NO_EVIDENCE = FactEvidence()


def fact_evidence(cited: Mapping[str, Iterable[Evidence]]) -> FactEvidence:
    """Evidence per fact, each list without repeated messages and at most MAX_PER_FACT."""
    return FactEvidence(**{fact: _distinct(cited.get(fact, ())) for fact in EVIDENCE_FACTS})


def _distinct(items: Iterable[Evidence]) -> Citations:
    seen: set[str] = set()
    kept: list[Evidence] = []
    for item in items:
        if item.message_id in seen:
            continue
        seen.add(item.message_id)
        kept.append(item)
        if len(kept) == MAX_PER_FACT:
            break
    return tuple(kept)


def quote(text: str, start: int = 0, end: int | None = None, limit: int = QUOTE_CHARS) -> str:
    """A verbatim substring of `text` around `text[start:end]`, at most `limit` chars.

    Stays within the line(s) of the span, widens evenly on both sides, and cuts on
    whitespace when there is any (one word longer than `limit` is cut hard). Costs
    O(limit) whatever the length of `text`.
    """
    n = len(text)
    start = min(max(start, 0), n)
    end = start if end is None else min(max(end, start), n)
    if end - start >= limit:
        a, b = start, start + limit
        cut = _trimmed(text, a, _back_to_space(text, start + 1, b))
    else:
        floor = max(0, start - limit)
        newline = text.rfind("\n", floor, start)
        lo = newline + 1 if newline >= 0 else floor
        newline = text.find("\n", end, end + limit)
        hi = newline if newline >= 0 else min(n, end + limit)
        room = limit - (end - start)
        left = min(start - lo, room // 2)
        right = min(hi - end, room - left)
        left = min(start - lo, room - right)
        a, b = start - left, end + right
        wa, wb = a, b
        if a > lo and not text[a - 1].isspace():
            wa = _forward_to_space(text, a, start)
        if b < hi and not text[b].isspace():
            wb = _back_to_space(text, end, b)
        cut = _trimmed(text, wa, wb)
    # Whitespace in the wrong places can leave nothing: then the window is cut hard, and
    # where even that is blank, the quote moves to the nearest words.
    cut = cut or _trimmed(text, a, b)
    if cut:
        return cut
    word = _WORD.search(text, end)
    at = word.start() if word else len(text[:start].rstrip()) - 1
    return "" if at < 0 else quote(text, at, at + 1, limit)


def _forward_to_space(text: str, a: int, limit: int) -> int:
    """The first position after whitespace in text[a:limit] (or `limit`)."""
    for i in range(a, limit):
        if text[i].isspace():
            return i + 1
    return limit


def _back_to_space(text: str, floor: int, b: int) -> int:
    """`b` moved back onto whitespace in text[floor:b] (unchanged if there is none)."""
    if b >= len(text) or text[b].isspace():
        return b
    for i in range(b - 1, floor - 1, -1):
        if text[i].isspace():
            return i
    return b


def _trimmed(text: str, a: int, b: int) -> str:
    while a < b and text[a].isspace():
        a += 1
    while b > a and text[b - 1].isspace():
        b -= 1
    return text[a:b]


def cite(message: DialogMessage, start: int = 0, end: int | None = None) -> Evidence | None:
    """Evidence of `message` quoting around the span; None for a message without text."""
    said = quote(message.text, start, end)
    return Evidence(message.id, said) if said else None


def cite_hint(message: DialogMessage, hint: str | None) -> Evidence | None:
    """Evidence of `message` quoting around `hint` where the text holds it (any case),
    else from the start: the quote is cut from the message, whatever the hint says."""
    text = message.text
    if hint and hint.strip():
        folded = text.lower()
        at = folded.find(hint.strip().lower()) if len(folded) == len(text) else -1
        if at >= 0:
            return cite(message, at, at + len(hint.strip()))
    return cite(message)


def confined(evidence: FactEvidence, dialog: Dialog) -> tuple[FactEvidence, int]:
    """Only the evidence that points into `dialog`: its message exists and the quote is in
    its text. Also the number left out (a safeguard: analyzers cite from the dialog)."""
    texts = {m.id: m.text for m in dialog.messages}
    kept: dict[str, list[Evidence]] = {}
    dropped = 0
    for fact in EVIDENCE_FACTS:
        for item in evidence.of(fact):
            text = texts.get(item.message_id)
            if text is not None and item.quote and item.quote in text:
                kept.setdefault(fact, []).append(item)
            else:
                dropped += 1
    return fact_evidence(kept), dropped


def without(evidence: FactEvidence, facts: AbstractSet[str]) -> FactEvidence:
    """`evidence` with nothing for `facts` (set by hand: no message stands behind them)."""
    if not facts & set(EVIDENCE_FACTS):
        return evidence
    return msgspec.structs.replace(
        evidence, **{fact: () for fact in EVIDENCE_FACTS if fact in facts}
    )


def from_breakdown(lines: Sequence[Mapping[str, Any]] | None) -> FactEvidence:
    """The evidence held by a stored `score_breakdown` (lines of older rows have none)."""
    cited: dict[str, list[Evidence]] = {}
    for line in lines or ():
        fact = line.get("fact") if isinstance(line, Mapping) else None
        if fact not in EVIDENCE_FACTS:
            continue
        try:
            items = msgspec.convert(line.get("evidence") or [], list[Evidence])
        except msgspec.ValidationError:
            continue  # written by something else: no evidence rather than a wrong one
        cited.setdefault(str(fact), []).extend(items)
    return fact_evidence(cited)
