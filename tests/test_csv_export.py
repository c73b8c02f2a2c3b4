"""CSV export encoding: columns, BOM, quoting, Cyrillic, formula neutralisation, chunks."""

from __future__ import annotations

import csv
import io
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest

from service.domain.lead import LeadRow
from service.usecases.csv_export import (
    BOM,
    COLUMNS,
    ORIGINAL_COLUMNS,
    breakdown_text,
    csv_chunks,
    encode_header,
    encode_rows,
    evidence_text,
    neutralise,
)

# The contract's order of the original service's columns.
CONTRACT_ORIGINAL = (
    "contact_phone contact_name interest_level score business_type funnel_stage instagram_url "
    "ad_budget qualification_complete is_owner has_sales_dept uses_ads_now objection "
    "next_message incoming_count outgoing_count last_message"
).split()


def row(**values: object) -> LeadRow:
    base: dict[str, object] = {
        "id": uuid.uuid4(),
        "instance_name": "sales",
        "user_account_id": uuid.uuid4(),
        "contact_phone": "77012345601",
    }
    base.update(values)
    return LeadRow(**base)  # type: ignore[arg-type]


def parse(data: bytes) -> list[list[str]]:
    text = data.decode("utf-8")
    assert text.startswith(BOM)
    return list(csv.reader(io.StringIO(text[len(BOM) :], newline="")))


def test_columns_start_with_the_original_seventeen_in_order() -> None:
    assert list(ORIGINAL_COLUMNS) == CONTRACT_ORIGINAL
    assert len(ORIGINAL_COLUMNS) == 17
    assert COLUMNS[:17] == ORIGINAL_COLUMNS
    assert COLUMNS[17:20] == ("niche", "score_breakdown", "score_evidence")
    assert len(set(COLUMNS)) == len(COLUMNS)
    # Every column is the row's own, but the quotes taken from its breakdown.
    assert set(COLUMNS) - set(LeadRow.__struct_fields__) == {"score_evidence"}


def test_header_only_file_has_bom_and_header() -> None:
    data = encode_header()
    assert data.startswith(b"\xef\xbb\xbf")
    assert parse(data) == [list(COLUMNS)]


@pytest.mark.parametrize("prefix", ["=", "+", "-", "@", "\t", "\r"])
def test_formula_prefixes_are_neutralised(prefix: str) -> None:
    assert neutralise(prefix + "1+1") == "'" + prefix + "1+1"


@pytest.mark.parametrize(
    "cell", ["", "Анна", "1+1", "a=b", "x =y", "'=quoted", "77012345601", "  Анна", "１２"]
)
def test_harmless_cells_stay_as_they_are(cell: str) -> None:
    assert neutralise(cell) == cell


def test_cells_round_trip_through_the_csv_module() -> None:
    last = datetime(2026, 3, 1, 12, 30, tzinfo=UTC)
    lead = row(
        contact_name='Анна "Клиника", Алматы',
        business_type="стоматология\nсеть из 3 филиалов",
        interest_level="hot",
        score=85,
        funnel_stage="deal_closed",
        ad_budget='=HYPERLINK("http://evil")',
        objection="+7 дорого",
        next_message="-скидка",
        notes="@SUM(A1)",
        instagram_url="\t=cmd",
        qualification_complete=True,
        is_owner=False,
        has_sales_dept=None,
        incoming_count=12,
        outgoing_count=3,
        last_message=last,
        niche="medicine",
        score_breakdown=[
            {"reason": "stage: deal_closed", "points": 75},
            {"reason": "niche: medicine", "points": 15},
            {"reason": "clamped to 0-100", "points": -5},
        ],
    )
    header, cells = parse(encode_header() + encode_rows([lead]))
    got = dict(zip(header, cells, strict=True))
    assert got["contact_phone"] == "77012345601"
    assert got["contact_name"] == 'Анна "Клиника", Алматы'
    assert got["business_type"] == "стоматология\nсеть из 3 филиалов"
    assert got["score"] == "85"
    assert got["ad_budget"] == '\'=HYPERLINK("http://evil")'
    assert got["objection"] == "'+7 дорого"
    assert got["next_message"] == "'-скидка"
    assert got["notes"] == "'@SUM(A1)"
    assert got["instagram_url"] == "'\t=cmd"
    assert got["qualification_complete"] == "true"
    assert got["is_owner"] == "false"
    assert got["has_sales_dept"] == ""
    assert got["last_message"] == "2026-03-01T12:30:00+00:00"
    assert (
        got["score_breakdown"] == "stage: deal_closed +75; niche: medicine +15; clamped to 0-100 -5"
    )
    assert got["id"] == str(lead.id)


def test_breakdown_text_of_nothing_is_empty() -> None:
    assert breakdown_text(None) == ""
    assert breakdown_text([]) == ""


async def _aiter(rows: list[LeadRow]) -> AsyncIterator[LeadRow]:
    for r in rows:
        yield r


async def test_chunks_hold_every_row_once_in_order() -> None:
    rows = [row(contact_phone=f"7701000{i:04d}", score=i % 101) for i in range(1203)]
    chunks = [c async for c in csv_chunks(_aiter(rows), rows_per_chunk=500)]
    # header, then ceil(1203 / 500) row chunks
    assert len(chunks) == 4
    parsed = parse(b"".join(chunks))
    assert parsed[0] == list(COLUMNS)
    assert [r[0] for r in parsed[1:]] == [r.contact_phone for r in rows]


async def test_no_rows_gives_the_header_only() -> None:
    chunks = [c async for c in csv_chunks(_aiter([]))]
    assert chunks == [encode_header()]


def test_evidence_shows_one_quote_per_line_and_is_formula_safe() -> None:
    lead = row(
        score_breakdown=[
            {
                "reason": "stage: consultation_booked",
                "points": 40,
                "fact": "funnel_stage",
                "evidence": [
                    {"message_id": "3EB0A1", "quote": "Да, давайте завтра в 15:00"},
                    {"message_id": "3EB0A2", "quote": "second, not shown"},
                ],
                "manual": False,
            },
            {"reason": "decision maker: owner", "points": 10, "fact": "is_owner", "manual": True},
            {"reason": "niche: medicine", "points": 15, "fact": "niche", "evidence": []},
            {"reason": "clamped to 0-100", "points": -5},
        ]
    )
    header, cells = parse(encode_header() + encode_rows([lead]))
    got = dict(zip(header, cells, strict=True))
    assert got["score_evidence"] == (
        "stage: consultation_booked: «Да, давайте завтра в 15:00»\n"
        "decision maker: owner: set by hand"
    )
    # A breakdown written by something else cannot smuggle a formula into the cell.
    forged = row(
        score_breakdown=[{"reason": "=HYPERLINK(1)", "points": 1, "evidence": [{"quote": "x"}]}]
    )
    header, cells = parse(encode_header() + encode_rows([forged]))
    assert dict(zip(header, cells, strict=True))["score_evidence"] == "'=HYPERLINK(1): «x»"
    assert evidence_text(None) == evidence_text([]) == ""
    # Older rows (reason and points only) have no evidence to show.
    assert evidence_text([{"reason": "stage: qualified", "points": 30}]) == ""
