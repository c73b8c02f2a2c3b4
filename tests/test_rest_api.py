"""REST endpoints on both results stores: shapes, filters, paging, stats, manual edits.

Every test runs twice (`api` fixture): Postgres store and Supabase store (fake PostgREST
on the real PostgreSQL).
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

from service.domain.lead import LEAD_OUT_FIELDS
from tests.rest_support import (
    BASE_TIME,
    INSTANCE,
    Api,
    api_fixture,  # noqa: F401 - fixture
    fetch_row,
    insert_leads,
    lead_values,
    leads_from_spec,
)

ROW_KEYS = set(LEAD_OUT_FIELDS)


def ids(body: dict[str, Any]) -> list[str]:
    return [r["id"] for r in body["results"]]


async def test_list_shape_and_order(api: Api) -> None:
    rows = [
        lead_values(api.account, 1, score=55, interest_level="warm"),
        lead_values(api.account, 2, score=80, interest_level="hot"),
        lead_values(api.account, 3, score=55, interest_level="warm"),  # newer than #1
        lead_values(api.account, 4, score=None, interest_level=None),
        lead_values(api.account, 5, score=10, last_message=None),
    ]
    await insert_leads(api.results_dsn, rows)
    status, body = await api.leads()
    assert status == 200
    assert body["success"] is True
    assert body["count"] == 5
    # Score first, then the newest last message; NULL scores last.
    assert ids(body) == [rows[1]["id"], rows[2]["id"], rows[0]["id"], rows[4]["id"], rows[3]["id"]]
    first = body["results"][0]
    assert set(first) == ROW_KEYS  # the table's columns in snake_case, without messages
    assert first["contact_phone"] == rows[1]["contact_phone"]
    assert first["contact_name"] == "Клиент 2"
    assert first["user_account_id"] == str(api.account)
    assert first["score"] == 80
    assert first["manual_fields"] == []


async def test_each_filter(api: Api) -> None:
    spec = [
        # (instance, interest, score, stage, qualification_complete)
        (INSTANCE, "hot", 90, "deal_closed", True),
        (INSTANCE, "warm", 70, "consultation_booked", True),
        (INSTANCE, "warm", 45, "qualified", False),
        (INSTANCE, "cold", 20, "not_qualified", None),
        ("other-line", "hot", 75, "deal_closed", True),
        ("other-line", "cold", 5, "new_lead", False),
    ]
    rows = leads_from_spec(api.account, spec)
    await insert_leads(api.results_dsn, rows)

    def expect(pred: Any) -> set[str]:
        return {r["id"] for r in rows if pred(r)}

    cases: list[tuple[dict[str, Any], set[str]]] = [
        ({"instanceName": "other-line"}, expect(lambda r: r["instance_name"] == "other-line")),
        ({"interestLevel": "warm"}, expect(lambda r: r["interest_level"] == "warm")),
        ({"minScore": "70"}, expect(lambda r: r["score"] >= 70)),
        ({"minScore": 0}, expect(lambda r: True)),
        ({"funnelStage": "deal_closed"}, expect(lambda r: r["funnel_stage"] == "deal_closed")),
        ({"qualificationComplete": "true"}, expect(lambda r: r["qualification_complete"])),
        # false = not complete (NULL counts as not complete)
        ({"qualificationComplete": "false"}, expect(lambda r: not r["qualification_complete"])),
        (
            {"instanceName": INSTANCE, "interestLevel": "warm", "minScore": 50},
            expect(
                lambda r: (
                    r["instance_name"] == INSTANCE
                    and r["interest_level"] == "warm"
                    and r["score"] >= 50
                )
            ),
        ),
        ({"instanceName": "nobody"}, set()),
    ]
    for params, expected in cases:
        status, body = await api.leads(**params)
        assert status == 200, params
        assert set(ids(body)) == expected, params
        assert body["count"] == len(expected), params


async def test_pages_over_a_thousand_rows_are_not_cut(api: Api) -> None:
    rows = [lead_values(api.account, i, score=i % 101) for i in range(1205)]
    await insert_leads(api.results_dsn, rows)

    status, body = await api.leads()
    assert status == 200
    assert len(body["results"]) == 100  # default page
    assert body["count"] == 1205

    seen: list[str] = []
    for offset in (0, 1000):
        status, body = await api.leads(limit=1000, offset=offset)
        assert status == 200
        assert body["count"] == 1205
        seen += ids(body)
    assert len(body["results"]) == 205
    assert len(seen) == len(set(seen)) == 1205
    assert set(seen) == {r["id"] for r in rows}

    status, body = await api.leads(limit=10, offset=1200)
    assert len(body["results"]) == 5
    status, body = await api.leads(offset=5000)
    assert body["results"] == [] and body["count"] == 1205


async def test_other_accounts_are_invisible(api: Api) -> None:
    mine = lead_values(api.account, 1, score=50)
    theirs = lead_values(api.other_account, 2, score=99)
    await insert_leads(api.results_dsn, [mine, theirs])

    status, body = await api.leads()
    assert ids(body) == [mine["id"]]
    status, body = await api.get("/dialogs/stats", userAccountId=api.account)
    assert body["stats"]["total"] == 1

    # Neither edit nor delete reaches another account's lead.
    status, body = await api.call(
        "PATCH",
        f"/dialogs/leads/{theirs['id']}",
        json={"userAccountId": str(api.account), "notes": "mine now"},
    )
    assert status == 404 and body["success"] is False
    status, body = await api.call(
        "DELETE", f"/dialogs/analysis/{theirs['id']}", params={"userAccountId": str(api.account)}
    )
    assert status == 404
    row = await fetch_row(api.results_dsn, theirs["id"])
    assert row is not None and row["notes"] is None


async def test_stats(api: Api) -> None:
    old = (BASE_TIME - timedelta(days=30)).isoformat()
    spec = [
        # (score, interest, stage, niche, qualified, in, out, analyzed long ago)
        (90, "hot", "deal_closed", "medicine", True, 10, 5, False),
        (60, "warm", "qualified", "medicine", True, 4, 4, False),
        (41, "warm", "consultation_booked", "infobusiness", False, 3, 1, True),
        (5, "cold", "new_lead", "other", None, 1, 0, True),
    ]
    rows = [
        lead_values(
            api.account,
            i,
            score=score,
            interest_level=interest,
            funnel_stage=stage,
            niche=niche,
            qualification_complete=qual,
            incoming_count=inc,
            outgoing_count=out,
            **({"analyzed_at": old} if stale else {}),
        )
        for i, (score, interest, stage, niche, qual, inc, out, stale) in enumerate(spec)
    ]
    rows.append(
        lead_values(api.account, 9, instance_name="other-line", score=100, interest_level="hot")
    )
    rows.append(lead_values(api.other_account, 10, score=77))
    await insert_leads(api.results_dsn, rows)

    status, body = await api.get("/dialogs/stats", userAccountId=api.account, instanceName=INSTANCE)
    assert status == 200 and body["success"] is True
    stats = body["stats"]
    assert stats["total"] == 4
    assert (stats["hot"], stats["warm"], stats["cold"]) == (1, 2, 1)
    assert stats["avgScore"] == 49  # (90 + 60 + 41 + 5) / 4
    assert stats["totalMessages"] == 28
    assert stats["deal_closed"] == 1
    assert stats["qualified"] == 1
    assert stats["consultation_booked"] == 1
    assert stats["new_lead"] == 1
    assert stats["not_qualified"] == stats["consultation_completed"] == stats["deal_lost"] == 0
    assert stats["qualified_count"] == 2
    assert stats["by_niche"] == {"medicine": 2, "infobusiness": 1, "other": 1}
    assert stats["analyzed_last_24h"] == 2

    status, body = await api.get("/dialogs/stats", userAccountId=api.account)
    assert body["stats"]["total"] == 5  # every instance of the account
    assert body["stats"]["hot"] == 2

    status, body = await api.get("/dialogs/stats", userAccountId=uuid.uuid4())
    assert status == 200
    assert body["stats"]["total"] == 0 and body["stats"]["avgScore"] == 0


async def test_create_lead(api: Api) -> None:
    payload = {
        "phone": "+7 (701) 555-12-34",
        "userAccountId": str(api.account),
        "instanceName": INSTANCE,
        "funnelStage": "consultation_booked",
        "contactName": "Дина",
        "businessType": "стоматология",
        "isMedical": True,
        "notes": "пришла с выставки",
        "isOwner": True,
        "adBudget": "$2000",
    }
    status, body = await api.call("POST", "/dialogs/leads", json=payload)
    assert status == 201, body
    assert body["success"] is True
    lead = body["lead"]
    assert set(lead) == ROW_KEYS
    assert lead["contact_phone"] == "77015551234"
    assert lead["source"] == "manual"
    assert lead["niche"] == "medicine"
    # consultation_booked 40 + medicine 15 + owner 10 + budget 10
    assert lead["score"] == 75 and lead["interest_level"] == "hot"
    assert lead["has_booking"] is True
    assert set(lead["manual_fields"]) == {
        "funnel_stage",
        "contact_name",
        "business_type",
        "is_medical",
        "notes",
        "is_owner",
        "ad_budget",
    }
    status, listed = await api.leads()
    assert ids(listed) == [lead["id"]]

    # The same phone typed differently is the same lead.
    status, body = await api.call(
        "POST", "/dialogs/leads", json={**payload, "phone": "7 701 555 12 34"}
    )
    assert status == 409 and body["success"] is False and "phone" in body["error"]


async def test_create_lead_needs_the_accounts_instance(api: Api) -> None:
    base = {"phone": "77015551234", "funnelStage": "new_lead"}
    status, body = await api.call(
        "POST",
        "/dialogs/leads",
        json={**base, "userAccountId": str(api.account), "instanceName": "unmapped"},
    )
    assert status == 404 and "unmapped" in body["error"]
    status, body = await api.call(
        "POST",
        "/dialogs/leads",
        json={**base, "userAccountId": str(api.other_account), "instanceName": INSTANCE},
    )
    assert status == 404
    status, listed = await api.leads()
    assert listed["count"] == 0


async def test_patch_lead(api: Api) -> None:
    row = lead_values(api.account, 1, score=30, interest_level="cold", funnel_stage="qualified")
    await insert_leads(api.results_dsn, [row])
    path = f"/dialogs/leads/{row['id']}"

    status, body = await api.call(
        "PATCH",
        path,
        json={"userAccountId": str(api.account), "funnelStage": "deal_closed", "notes": "оплатил"},
    )
    assert status == 200, body
    lead = body["lead"]
    assert set(lead) == ROW_KEYS
    assert lead["funnel_stage"] == "deal_closed" and lead["notes"] == "оплатил"
    assert lead["score"] == 75 and lead["interest_level"] == "hot"  # recomputed
    assert lead["has_booking"] is True
    assert set(lead["manual_fields"]) == {"funnel_stage", "notes"}
    assert lead["contact_name"] == row["contact_name"]  # untouched

    # A score set by hand wins; null clears a field.
    status, body = await api.call(
        "PATCH", path, json={"userAccountId": str(api.account), "score": 20, "notes": None}
    )
    lead = body["lead"]
    assert lead["score"] == 20 and lead["interest_level"] == "cold"
    assert lead["notes"] is None
    assert set(lead["manual_fields"]) == {"funnel_stage", "notes", "score"}
    stored = await fetch_row(api.results_dsn, row["id"])
    assert stored is not None and stored["score"] == 20

    status, body = await api.call(
        "PATCH",
        f"/dialogs/leads/{uuid.uuid4()}",
        json={"userAccountId": str(api.account), "score": 1},
    )
    assert status == 404 and body["success"] is False


async def test_delete_lead(api: Api) -> None:
    row = lead_values(api.account, 1)
    await insert_leads(api.results_dsn, [row])
    path = f"/dialogs/analysis/{row['id']}"

    status, body = await api.call("DELETE", path, params={"userAccountId": str(uuid.uuid4())})
    assert status == 404
    status, body = await api.call("DELETE", path, params={"userAccountId": str(api.account)})
    assert status == 200 and body == {"success": True, "id": row["id"]}
    assert await fetch_row(api.results_dsn, row["id"]) is None
    status, body = await api.call("DELETE", path, params={"userAccountId": str(api.account)})
    assert status == 404
