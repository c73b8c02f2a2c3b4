"""GET /dialogs/export-csv on both stores, parsed back with the csv module."""

from __future__ import annotations

import csv
import io
import re
from typing import Any

from service.usecases.csv_export import COLUMNS
from tests.rest_support import (
    AUTH,
    INSTANCE,
    Api,
    api_fixture,  # noqa: F401 - fixture
    insert_leads,
    lead_values,
    leads_from_spec,
)

BOM = b"\xef\xbb\xbf"


async def export(api: Api, **params: Any) -> tuple[dict[str, str], list[dict[str, str]]]:
    query = {"userAccountId": str(api.account), **{k: str(v) for k, v in params.items()}}
    response = await api.client.get("/dialogs/export-csv", params=query, headers=AUTH)
    assert response.status == 200, await response.text()
    raw = await response.read()
    assert raw.startswith(BOM)
    reader = csv.reader(io.StringIO(raw[len(BOM) :].decode("utf-8"), newline=""))
    header, *rows = list(reader)
    assert header == list(COLUMNS)
    return dict(response.headers), [dict(zip(header, r, strict=True)) for r in rows]


async def test_export_cells_quoting_cyrillic_and_injection(api: Api) -> None:
    tricky = lead_values(
        api.account,
        1,
        score=88,
        interest_level="hot",
        contact_name='Анна "Клиника", Алматы',
        business_type="стоматология\nдва филиала",
        objection='=HYPERLINK("http://x","click")',
        next_message="+7 перезвонить",
        ad_budget="-500",
        notes="@SUM(A1:A9)",
        instagram_url="\thttps://instagram.com/x",
        niche="medicine",
        score_breakdown=[{"reason": "stage: deal_closed", "points": 75}],
        qualification_complete=True,
        is_owner=True,
        has_sales_dept=None,
    )
    plain = lead_values(api.account, 2, score=10, interest_level="cold")
    await insert_leads(api.results_dsn, [tricky, plain])

    headers, rows = await export(api)
    assert headers["Content-Type"] == "text/csv; charset=utf-8"
    assert re.fullmatch(
        r'attachment; filename="leads-all-\d{8}\.csv"', headers["Content-Disposition"]
    )
    assert [r["id"] for r in rows] == [tricky["id"], plain["id"]]  # list order
    cells = rows[0]
    assert cells["contact_phone"] == tricky["contact_phone"]
    assert cells["contact_name"] == 'Анна "Клиника", Алматы'
    assert cells["business_type"] == "стоматология\nдва филиала"
    assert cells["objection"] == '\'=HYPERLINK("http://x","click")'
    assert cells["next_message"] == "'+7 перезвонить"
    assert cells["ad_budget"] == "'-500"
    assert cells["notes"] == "'@SUM(A1:A9)"
    assert cells["instagram_url"] == "'\thttps://instagram.com/x"
    assert cells["score"] == "88"
    assert cells["qualification_complete"] == "true"
    assert cells["is_owner"] == "true"
    assert cells["has_sales_dept"] == ""
    assert cells["niche"] == "medicine"
    assert cells["score_breakdown"] == "stage: deal_closed +75"
    # No cell of any row could start a formula.
    for row in rows:
        for value in row.values():
            assert not value.startswith(("=", "+", "-", "@", "\t", "\r")), value


async def test_export_honours_every_filter(api: Api) -> None:
    spec = [
        (INSTANCE, "hot", 90, "deal_closed", True),
        (INSTANCE, "warm", 60, "qualified", False),
        ("other-line", "hot", 80, "deal_closed", True),
        ("other-line", "cold", 10, "new_lead", False),
    ]
    rows = leads_from_spec(api.account, spec)
    rows.append(lead_values(api.other_account, 9, score=99, interest_level="hot"))
    await insert_leads(api.results_dsn, rows)

    def phones(*indexes: int) -> list[str]:
        return [rows[i]["contact_phone"] for i in indexes]

    cases: list[tuple[dict[str, Any], list[str]]] = [
        ({}, phones(0, 2, 1, 3)),
        ({"instanceName": "other-line"}, phones(2, 3)),
        ({"interestLevel": "hot"}, phones(0, 2)),
        ({"minScore": 60}, phones(0, 2, 1)),
        ({"funnelStage": "new_lead"}, phones(3)),
        ({"qualificationComplete": "true"}, phones(0, 2)),
        ({"instanceName": INSTANCE, "interestLevel": "warm"}, phones(1)),
    ]
    for params, expected in cases:
        headers, got = await export(api, **params)
        assert [r["contact_phone"] for r in got] == expected, params
    headers, _ = await export(api, instanceName="other-line")
    assert 'filename="leads-other-line-' in headers["Content-Disposition"]


async def test_empty_export_is_a_header_only_file(api: Api) -> None:
    headers, rows = await export(api, interestLevel="hot")  # header checked in export()
    assert rows == []
    assert headers["Content-Disposition"].startswith("attachment;")


async def test_export_streams_every_row_of_a_large_account(api: Api) -> None:
    rows = [lead_values(api.account, i, score=i % 101) for i in range(2300)]
    await insert_leads(api.results_dsn, rows)
    headers, got = await export(api)
    assert "Content-Length" not in headers  # streamed (chunked), not built in memory
    assert len(got) == 2300
    assert {r["id"] for r in got} == {r["id"] for r in rows}
    scores = [int(r["score"]) for r in got]
    assert scores == sorted(scores, reverse=True)


async def test_export_errors_are_json(api: Api) -> None:
    status, body = await api.get("/dialogs/export-csv", userAccountId="nope")
    assert status == 400 and body["success"] is False and "userAccountId" in body["error"]
    status, body = await api.call(
        "GET", "/dialogs/export-csv", params={"userAccountId": str(api.account)}, auth=False
    )
    assert status == 401 and body["success"] is False
