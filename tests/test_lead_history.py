"""A lead's history and the funnel report, on both results stores (PostgresStore, and
SupabaseStore through the PostgREST test server) over real PostgreSQL.

History rows for the analysis, delete and manual paths, written with the change; events
decided in the same write (outbox rows); GET /dialogs/leads/{id}/history paged and
account-scoped; history kept across re-analysis and removed with the lead; the funnel of a
constructed history.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import msgspec
import pytest

from service.adapters.stores.base import AnalysisWrite
from service.domain.facts import LeadFacts, empty_facts
from service.domain.history import FUNNEL_ORDER, Cause
from service.domain.lead import fact_columns
from service.domain.scoring import score
from service.usecases.api_keys import create_key
from tests.rest_support import (
    INSTANCE,
    Api,
    api_fixture,  # noqa: F401 - fixture
    insert_leads,
    lead_values,
)

PHONE = "77019990001"
T0 = datetime(2026, 9, 1, 9, 0, tzinfo=UTC)
# qualified + medicine + owner: 55 (warm); booked with a budget: 75 (hot)
WARM = msgspec.structs.replace(empty_facts("qualified"), niche="medicine", is_owner=True)
HOT = msgspec.structs.replace(WARM, funnel_stage="consultation_booked", ad_budget="500 тыс")


def write(
    api: Api, minute: int, facts: LeadFacts | None, cause: Cause, *, notify: bool = True
) -> AnalysisWrite:
    """The dialog as it stood at T0+minute; facts=None: a new_lead refresh."""
    analyzed = facts is not None
    facts = facts or empty_facts("new_lead")
    return AnalysisWrite(
        instance_name=INSTANCE,
        user_account_id=api.account,
        contact_phone=PHONE,
        contact_name="Айгерим",
        remote_jid=f"{PHONE}@s.whatsapp.net",
        incoming_count=3 + minute,
        outgoing_count=1,
        first_message=T0,
        last_message=T0 + timedelta(minutes=minute),
        last_message_id=f"m{minute}",
        analyzed=analyzed,
        **fact_columns(facts, score(facts)),
        messages=[],
        analyzer="rules" if analyzed else None,
        llm_usage=None,
        cause=cause,
        notify=notify,
    )


async def rows(dsn: str, sql: str, *args: Any) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(dsn)
    try:
        return [dict(r) for r in await conn.fetch(sql, *args)]
    finally:
        await conn.close()


async def outbox(dsn: str, lead_id: str) -> list[tuple[str, dict[str, Any]]]:
    found = await rows(
        dsn,
        "SELECT event_type, body::text AS body FROM crm_outbox "
        "WHERE body -> 'data' ->> 'lead_id' = $1 ORDER BY seq",
        lead_id,
    )
    return [(r["event_type"], msgspec.json.decode(r["body"])) for r in found]


async def history(api: Api, lead_id: str, **params: Any) -> tuple[int, Any]:
    params.setdefault("userAccountId", api.account)
    return await api.get(f"/dialogs/leads/{lead_id}/history", **params)


async def test_every_path_writes_history_with_its_cause(api: Api) -> None:
    rules = Cause(kind="analysis", analyzer="rules", model=None)
    first = await api.store.upsert_analysis(write(api, 0, None, Cause(kind="analysis")))
    assert first.applied and first.id is not None
    lead = str(first.id)
    await api.store.upsert_analysis(write(api, 1, WARM, rules))
    # Messages deleted in WhatsApp: the re-analysis is recorded as caused by the delete.
    deleted = Cause(kind="delete", analyzer="rules", model="gpt-x")
    await api.store.upsert_analysis(write(api, 2, HOT, deleted))
    # The same dialog again changes nothing, so it records nothing.
    await api.store.upsert_analysis(write(api, 2, HOT, rules))
    # A manual edit through the API, with an account-bound key.
    key, record = await create_key(api.store, api.account, "sales")
    status, body = await api.call(
        "PATCH",
        f"/dialogs/leads/{lead}",
        json={"userAccountId": str(api.account), "funnelStage": "deal_closed"},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert status == 200, body
    assert body["lead"]["stage_changed_at"] is not None

    status, body = await history(api, lead)
    assert status == 200, body
    assert body["success"] is True and body["count"] == 11
    entries = body["history"]
    assert all(set(e) == {"changed_at", "field", "from", "to", "cause"} for e in entries)
    assert all(set(e["cause"]) == {"kind", "analyzer", "model", "key"} for e in entries)
    changes = [(e["field"], e["from"], e["to"], e["cause"]["kind"]) for e in entries]
    # Newest first: the edit (stage, and the score recomputed from it; still hot).
    assert changes == [
        ("score", 75, 100, "manual"),
        ("funnel_stage", "consultation_booked", "deal_closed", "manual"),
        ("interest_level", "warm", "hot", "delete"),
        ("score", 55, 75, "delete"),
        ("funnel_stage", "qualified", "consultation_booked", "delete"),
        ("interest_level", "cold", "warm", "analysis"),
        ("score", 5, 55, "analysis"),
        ("funnel_stage", "new_lead", "qualified", "analysis"),
        ("interest_level", None, "cold", "analysis"),
        ("score", None, 5, "analysis"),
        ("funnel_stage", None, "new_lead", "analysis"),
    ]
    assert entries[0]["cause"] == {
        "kind": "manual",
        "analyzer": None,
        "model": None,
        "key": record.prefix,
    }
    assert key not in msgspec.json.encode(body).decode()  # the prefix, never the key
    assert entries[2]["cause"] == {
        "kind": "delete",
        "analyzer": "rules",
        "model": "gpt-x",
        "key": None,
    }
    assert entries[6]["cause"]["analyzer"] == "rules"
    assert entries[-1]["cause"]["analyzer"] is None  # a new_lead refresh: nothing ran
    times = [datetime.fromisoformat(e["changed_at"]) for e in entries]
    assert times == sorted(times, reverse=True)

    # The events, decided in the same writes: every stage change, one lead.hot.
    events = await outbox(api.results_dsn, lead)
    assert [kind for kind, _ in events] == [
        "lead.stage_changed",
        "lead.stage_changed",
        "lead.stage_changed",
        "lead.hot",
        "lead.stage_changed",
    ]
    hot = events[3][1]
    assert set(hot) == {"type", "timestamp", "data"} and hot["type"] == "lead.hot"
    assert datetime.fromisoformat(hot["timestamp"]).tzinfo is not None
    assert hot["data"] == {
        "lead_id": lead,
        "account": str(api.account),
        "instance": INSTANCE,
        "contact": PHONE,
        "contact_name": "Айгерим",
        "score": 75,
        "interest_level": "hot",
        "from_stage": "qualified",
        "to_stage": "consultation_booked",
        "cause": {"kind": "delete", "analyzer": "rules", "model": "gpt-x", "key": None},
    }

    # List rows carry when the stage last changed: the edit's time.
    status, listed = await api.leads()
    assert status == 200
    (row,) = listed["results"]
    assert datetime.fromisoformat(row["stage_changed_at"]) == times[1]


async def test_history_is_paged_account_scoped_and_goes_with_the_lead(api: Api) -> None:
    first = await api.store.upsert_analysis(write(api, 0, None, Cause(kind="analysis")))
    lead = str(first.id)
    rules = Cause(kind="analysis", analyzer="rules")
    for minute, facts in enumerate([WARM, HOT, WARM, HOT], start=1):
        await api.store.upsert_analysis(write(api, minute, facts, rules))
    status, whole = await history(api, lead, limit=1000)
    assert status == 200 and whole["count"] == 15 == len(whole["history"])
    pages = []
    for offset in range(0, 15, 4):
        status, page = await history(api, lead, limit=4, offset=offset)
        assert status == 200 and page["count"] == 15
        pages.extend(page["history"])
    assert pages == whole["history"]
    status, tail = await history(api, lead, limit=4, offset=14)
    assert len(tail["history"]) == 1
    status, past = await history(api, lead, offset=100)
    assert status == 200 and past["history"] == [] and past["count"] == 15
    assert (await history(api, lead, limit=0))[0] == 400

    # Another account's lead is not found, whoever asks for it.
    status, body = await history(api, lead, userAccountId=api.other_account)
    assert status == 404 and body["success"] is False
    other_key, _ = await create_key(api.store, api.other_account, None)
    status, _ = await api.call(
        "GET",
        f"/dialogs/leads/{lead}/history",
        headers={"Authorization": f"Bearer {other_key}"},
    )
    assert status == 404
    assert (await history(api, str(uuid.uuid4())))[0] == 404

    # Re-analysis keeps what was recorded; deleting the lead removes its history.
    await api.store.upsert_analysis(write(api, 9, WARM, rules, notify=False))
    status, later = await history(api, lead, limit=1000)
    assert later["count"] == 18 and later["history"][3:] == whole["history"]
    assert len(await outbox(api.results_dsn, lead)) == 7  # 5 stage changes, 2 hot; none now
    status, _ = await api.call(
        "DELETE", f"/dialogs/analysis/{lead}", params={"userAccountId": str(api.account)}
    )
    assert status == 200
    left = await rows(
        api.results_dsn, "SELECT 1 FROM crm_lead_history WHERE lead_id = $1", uuid.UUID(lead)
    )
    assert left == []
    assert (await history(api, lead))[0] == 404


async def test_a_lead_created_by_hand_enters_its_first_stage(api: Api) -> None:
    status, body = await api.call(
        "POST",
        "/dialogs/leads",
        json={
            "phone": "+7 701 555 0101",
            "userAccountId": str(api.account),
            "instanceName": INSTANCE,
            "funnelStage": "deal_closed",
            "niche": "medicine",
        },
    )
    assert status == 201, body
    lead = body["lead"]["id"]
    assert body["lead"]["stage_changed_at"] is not None
    status, page = await history(api, lead)
    assert [(e["field"], e["from"], e["to"]) for e in page["history"]] == [
        ("interest_level", None, "hot"),
        ("score", None, 90),
        ("funnel_stage", None, "deal_closed"),
    ]
    assert {e["cause"]["kind"] for e in page["history"]} == {"manual"}
    assert {e["cause"]["key"] for e in page["history"]} == {"admin"}  # API_TOKEN
    assert [kind for kind, _ in await outbox(api.results_dsn, lead)] == [
        "lead.stage_changed",
        "lead.hot",
    ]


# -- the funnel ----------------------------------------------------------------------------
D0 = datetime(2026, 10, 5, 0, 0, tzinfo=UTC)


def at(day: int, hour: int) -> datetime:
    return D0 + timedelta(days=day, hours=hour)


@pytest.fixture
async def funnel_api(api: Api) -> AsyncIterator[Api]:
    """Leads with a constructed stage history (written straight into the table)."""
    moves: dict[str, list[tuple[str, datetime]]] = {
        "a": [
            ("new_lead", at(0, 10)),
            ("qualified", at(0, 12)),
            ("consultation_booked", at(1, 10)),
            ("deal_closed", at(2, 10)),
        ],
        "b": [("new_lead", at(0, 11)), ("qualified", at(0, 15)), ("deal_lost", at(1, 15))],
        "c": [("qualified", at(0, 13))],  # its first stage: counts as entering it
        "d": [("new_lead", at(-3, 9)), ("qualified", at(0, 9))],  # new_lead before the period
        "e": [("new_lead", at(0, 8))],  # on another instance
        "f": [("new_lead", at(0, 8)), ("qualified", at(0, 9))],  # another account's
        "g": [("qualified", at(0, 8)), ("not_qualified", at(0, 9))],  # back down: not "later"
    }
    await api.store.add_instance("second", api.account)
    leads = []
    for index, name in enumerate(moves):
        leads.append(
            lead_values(
                api.other_account if name == "f" else api.account,
                index,
                id=str(uuid.uuid5(uuid.NAMESPACE_DNS, name + str(api.account))),
                instance_name="second" if name == "e" else INSTANCE,
                funnel_stage=moves[name][-1][0],
            )
        )
    ids = await insert_leads(api.results_dsn, leads)
    conn = await asyncpg.connect(api.results_dsn)
    try:
        for lead_id, name in zip(ids, moves, strict=True):
            previous = None
            for stage, when in moves[name]:
                await conn.execute(
                    "INSERT INTO crm_lead_history "
                    "(lead_id, changed_at, field, from_value, to_value, cause) "
                    "VALUES ($1, $2, 'funnel_stage', to_jsonb($3::text), to_jsonb($4::text), "
                    """'{"kind": "analysis"}')""",
                    uuid.UUID(lead_id),
                    when,
                    previous,
                    stage,
                )
                previous = stage
    finally:
        await conn.close()
    yield api


async def funnel(api: Api, **params: Any) -> dict[str, Any]:
    params.setdefault("userAccountId", api.account)
    status, body = await api.get("/dialogs/funnel", **params)
    assert status == 200, body
    assert body["success"] is True
    report: dict[str, Any] = body["funnel"]
    return report


async def test_the_funnel_of_a_constructed_history(funnel_api: Api) -> None:
    api = funnel_api
    report = await funnel(api, since=at(0, 0).isoformat(), until=at(3, 0).isoformat())
    assert list(report) == list(FUNNEL_ORDER)
    assert report["new_lead"] == {
        "entered": 3,  # a, b, e (d entered before the period; f is another account's)
        "moved_to": {
            "not_qualified": 0,
            "qualified": 2,
            "consultation_booked": 1,
            "consultation_completed": 0,
            "deal_closed": 1,
            "deal_lost": 1,
        },
        "median_hours_to": {
            "qualified": 3.0,  # a: 2 h, b: 4 h
            "consultation_booked": 24.0,
            "deal_closed": 48.0,
            "deal_lost": 28.0,
        },
    }
    qualified = report["qualified"]
    assert qualified["entered"] == 5  # a, b, c (its first stage), d, g
    assert qualified["moved_to"] == {
        "consultation_booked": 1,
        "consultation_completed": 0,
        "deal_closed": 1,
        "deal_lost": 1,
    }
    assert qualified["median_hours_to"] == {
        "consultation_booked": 22.0,
        "deal_closed": 46.0,
        "deal_lost": 24.0,
    }
    assert report["not_qualified"]["entered"] == 1  # g, moved back down
    assert report["deal_lost"] == {"entered": 1, "moved_to": {}, "median_hours_to": {}}

    # A shorter period: moves after `until` do not count; one instance alone.
    short = await funnel(api, since=at(0, 0).isoformat(), until=at(1, 12).isoformat())
    assert short["new_lead"]["moved_to"]["consultation_booked"] == 1
    assert short["new_lead"]["moved_to"]["deal_closed"] == 0
    assert short["new_lead"]["moved_to"]["deal_lost"] == 0
    second = await funnel(
        api, since=at(0, 0).isoformat(), until=at(3, 0).isoformat(), instanceName="second"
    )
    assert second["new_lead"] == {
        "entered": 1,
        "moved_to": {stage: 0 for stage in FUNNEL_ORDER[1:]},
        "median_hours_to": {},
    }
    theirs = await funnel(
        api,
        userAccountId=api.other_account,
        since=at(0, 0).isoformat(),
        until=at(3, 0).isoformat(),
    )
    assert theirs["new_lead"]["entered"] == 1 and theirs["qualified"]["entered"] == 1


async def test_the_funnel_refuses_a_bad_period(api: Api) -> None:
    base = {"userAccountId": api.account}
    status, body = await api.get("/dialogs/funnel", **base)
    assert status == 400 and "since" in body["error"]
    status, body = await api.get(
        "/dialogs/funnel", **base, since=at(1, 0).isoformat(), until=at(0, 0).isoformat()
    )
    assert status == 400 and "before" in body["error"]
    status, body = await api.get("/dialogs/funnel", **base, since="yesterday")
    assert status == 400
    # No until: up to now; no history yet: every stage at zero.
    status, body = await api.get("/dialogs/funnel", **base, since="2026-01-01T00:00:00Z")
    assert status == 200 and body["funnel"]["new_lead"]["entered"] == 0


async def test_openapi_describes_history_and_funnel(api: Api) -> None:
    status, doc = await api.call("GET", "/openapi.json")
    assert status == 200
    history_op = doc["paths"]["/dialogs/leads/{id}/history"]["get"]
    assert {p["name"] for p in history_op["parameters"]} >= {"id", "userAccountId", "limit"}
    assert "404" in history_op["responses"]
    funnel_op = doc["paths"]["/dialogs/funnel"]["get"]
    assert {p["name"] for p in funnel_op["parameters"]} >= {"since", "until", "instanceName"}
    entry = doc["components"]["schemas"]["HistoryEntry"]
    assert set(entry["properties"]) == {"changed_at", "field", "from", "to", "cause"}
    cause = doc["components"]["schemas"]["Cause"]
    assert set(cause["properties"]) == {"kind", "analyzer", "model", "key"}
    assert set(doc["components"]["schemas"]["FunnelRow"]["properties"]) == {
        "entered",
        "moved_to",
        "median_hours_to",
    }
