"""Leads as CSV for Excel: pure functions from rows to encoded chunks, no I/O.

UTF-8 with a BOM (Excel otherwise guesses a legacy code page and garbles Cyrillic), the
original's 17 columns first in its order, then this service's. Cells that a spreadsheet
would evaluate as a formula are prefixed with `'` (formula injection).
"""

from __future__ import annotations

import csv
import io
import unicodedata
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from datetime import datetime
from operator import attrgetter
from typing import Any

import msgspec

from service.domain.lead import LeadRow

BOM = "\ufeff"
ORIGINAL_COLUMNS: tuple[str, ...] = (
    "contact_phone",
    "contact_name",
    "interest_level",
    "score",
    "business_type",
    "funnel_stage",
    "instagram_url",
    "ad_budget",
    "qualification_complete",
    "is_owner",
    "has_sales_dept",
    "uses_ads_now",
    "objection",
    "next_message",
    "incoming_count",
    "outgoing_count",
    "last_message",
)
EXTRA_COLUMNS: tuple[str, ...] = (
    "niche",
    "score_breakdown",
    # Not a column of the row: the first quote behind each score line (see evidence_text).
    "score_evidence",
    "main_intent",
    "action",
    "is_medical",
    "has_booking",
    "notes",
    "source",
    "instance_name",
    "first_message",
    "analyzed_at",
    "id",
)
COLUMNS: tuple[str, ...] = ORIGINAL_COLUMNS + EXTRA_COLUMNS

# Leading characters that make Excel, LibreOffice or Sheets treat a cell as a formula.
_FORMULA_CHARS = frozenset("=+-@\t\r")

# Per-column handling, resolved once: cells are formatted by position (this runs for every
# row of a 100,000-row export).
_EVIDENCE_AT = COLUMNS.index("score_evidence")
_get_cells = attrgetter(*(c for c in COLUMNS if c != "score_evidence"))
_kinds = {f.name: f.type for f in msgspec.structs.fields(LeadRow)} | {"score_evidence": str}
_BOOL_AT = tuple(i for i, c in enumerate(COLUMNS) if _kinds[c] in (bool, bool | None))
_TIME_AT = tuple(i for i, c in enumerate(COLUMNS) if _kinds[c] in (datetime, datetime | None))
_TEXT_AT = tuple(i for i, c in enumerate(COLUMNS) if _kinds[c] in (str, str | None))
_BREAKDOWN_AT = COLUMNS.index("score_breakdown")


# Characters a spreadsheet skips before deciding a cell is a formula: spaces of every
# kind, zero-width and BOM characters, line breaks and other controls.
_INVISIBLE = frozenset("\u200b\u200c\u200d\u2060\ufeff\u180e")


def is_formula(cell: str) -> bool:
    """OWASP's rule, applied to the cell as a spreadsheet reads it: after leading blanks
    and invisible characters, NFKC-normalised (full-width `＝`, small `﹦` → `=`)."""
    first = cell[0]
    if first < "\x80" and first not in _FORMULA_CHARS and not first.isspace() and first >= " ":
        return False  # the common case, decided on one character
    if first in _FORMULA_CHARS or first in "\n\v\f":
        return True
    for ch in cell[:64]:
        if ch.isspace() or ch in _INVISIBLE or unicodedata.category(ch) in ("Cc", "Cf"):
            continue
        return unicodedata.normalize("NFKC", ch)[:1] in _FORMULA_CHARS
    return False


def neutralise(cell: str) -> str:
    """Make a cell inert in spreadsheets (OWASP CSV injection advice: prefix a quote)."""
    return "'" + cell if cell and is_formula(cell) else cell


def cell_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def breakdown_text(lines: list[dict[str, Any]] | None) -> str:
    """`[{"reason": "stage: qualified", "points": 30}, ...]` as `stage: qualified +30; ...`."""
    if not lines:
        return ""
    return "; ".join(f"{line.get('reason', '')} {int(line.get('points', 0)):+d}" for line in lines)


def evidence_text(lines: list[dict[str, Any]] | None) -> str:
    """The first quote behind each score line, one line each, so a salesperson sees why
    without the chat: `stage: consultation_booked: «Да, давайте завтра в 15:00»`. A fact
    set by hand says so; a line without evidence is left out."""
    said: list[str] = []
    for line in lines or ():
        if not isinstance(line, dict):
            continue
        reason = line.get("reason", "")
        evidence = line.get("evidence")
        if line.get("manual"):
            said.append(f"{reason}: set by hand")
        elif isinstance(evidence, list) and evidence and isinstance(evidence[0], dict):
            said.append(f"{reason}: «{evidence[0].get('quote', '')}»")
    return "\n".join(said)


def row_cells(row: LeadRow) -> list[Any]:
    """The row's cells in COLUMNS order (None is written as an empty cell)."""
    cells: list[Any] = list(_get_cells(row))
    cells.insert(_EVIDENCE_AT, neutralise(evidence_text(row.score_breakdown)))
    for i in _TEXT_AT:
        text = cells[i]
        if text and is_formula(text):
            cells[i] = "'" + text
    for i in _BOOL_AT:
        flag = cells[i]
        if flag is not None:
            cells[i] = "true" if flag else "false"
    for i in _TIME_AT:
        moment = cells[i]
        if moment is not None:
            cells[i] = moment.isoformat()
    cells[_BREAKDOWN_AT] = neutralise(breakdown_text(cells[_BREAKDOWN_AT]))
    return cells


def encode_header() -> bytes:
    """The first chunk: BOM and header line (all an empty export contains)."""
    return (BOM + _lines([list(COLUMNS)])).encode("utf-8")


def encode_rows(rows: Iterable[LeadRow]) -> bytes:
    return _lines(row_cells(row) for row in rows).encode("utf-8")


async def csv_chunks(
    rows: AsyncIterable[LeadRow], rows_per_chunk: int = 500
) -> AsyncIterator[bytes]:
    """Header chunk, then one chunk per `rows_per_chunk` rows: memory stays flat."""
    yield encode_header()
    batch: list[LeadRow] = []
    async for row in rows:
        batch.append(row)
        if len(batch) >= rows_per_chunk:
            yield encode_rows(batch)
            batch.clear()
    if batch:
        yield encode_rows(batch)


def _lines(rows: Iterable[list[Any]]) -> str:
    buffer = io.StringIO()
    # Excel's dialect: comma, CRLF, quotes only where needed (commas, quotes, newlines).
    csv.writer(buffer, dialect="excel").writerows(rows)
    return buffer.getvalue()
