"""One contract, two results stores.

Every test in the first part runs against PostgresStore (asyncpg, direct, as the
database's non-superuser owner) and against SupabaseStore (supabase-py → HTTP → the
role-enforcing PostgREST-compatible test server → the same real PostgreSQL, as
`service_role`), each on a Supabase-like database (tests/supabase_db.py) migrated fresh and
one upgraded from the original service's tables with rows and their old grants. Both run the
SQL functions of service/sql/ for the write rules.
The last part covers what only one transport has: retries, error mapping, the test
server's own PostgREST semantics.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest

from service.adapters.stores.base import (
    AnalysisWrite,
    DuplicateLeadError,
    InstanceOwnedError,
    LeadQuery,
    LeadRow,
    ResultsStore,
    StoreUnavailableError,
)
from service.adapters.stores.factory import open_store
from service.adapters.stores.postgres import PostgresStore
from service.adapters.stores.supabase import SupabaseStore
from service.config import Settings
from tests.conftest import create_database, drop_database, pg_dsn
from tests.fakes.postgrest_server import (
    SERVICE_KEY,
    PostgrestServer,
    legacy_key,
    running_postgrest,
)
from tests.supabase_db import migrated_database

KEY = SERVICE_KEY
T0 = datetime(2025, 3, 1, 9, 0, tzinfo=UTC)
INSTANCE = "inst-a"


@pytest.fixture(params=["fresh", "upgraded"])
async def results_dsn(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """Every test on a freshly migrated database and on an upgraded original one."""
    async with migrated_database(request.param) as dsn:
        yield dsn


@pytest.fixture(params=["postgres", "supabase"])
async def store(request: pytest.FixtureRequest, results_dsn: str) -> AsyncIterator[ResultsStore]:
    if request.param == "postgres":
        pg = await PostgresStore.open(results_dsn, max_size=25)
        try:
            yield pg
        finally:
            await pg.close()
    else:
        async with running_postgrest(results_dsn) as server:
            sb = await SupabaseStore.open(server.url, KEY, request_timeout=10, backoff=0.01)
            try:
                yield sb
            finally:
                await sb.close()


@pytest.fixture
async def postgrest(results_dsn: str) -> AsyncIterator[PostgrestServer]:
    async with running_postgrest(results_dsn) as server:
        yield server


@pytest.fixture
async def supabase(postgrest: PostgrestServer) -> AsyncIterator[SupabaseStore]:
    sb = await SupabaseStore.open(postgrest.url, KEY, request_timeout=5, backoff=0.01)
    try:
        yield sb
    finally:
        await sb.close()


# A breakdown as analyses store it: each line with its fact and the messages behind it.
BREAKDOWN: list[dict[str, Any]] = [
    {
        "reason": "stage: qualified",
        "points": 30,
        "fact": "funnel_stage",
        "evidence": [{"message_id": "3EB0C4F1A2", "quote": "Готовы вкладывать 500 тыс «тенге»"}],
        "manual": False,
    },
    {"reason": "niche: medicine", "points": 15, "fact": "niche", "evidence": [], "manual": True},
]


def write(
    account: uuid.UUID,
    phone: str = "77010000001",
    *,
    instance: str = INSTANCE,
    at: datetime = T0,
    message_id: str = "m1",
    analyzed: bool = True,
    **facts: Any,
) -> AnalysisWrite:
    """An AnalysisWrite with plausible facts; keyword arguments override any field."""
    values: dict[str, Any] = {
        "instance_name": instance,
        "user_account_id": account,
        "contact_phone": phone,
        "contact_name": "Айгуль",
        "remote_jid": f"{phone}@s.whatsapp.net",
        "incoming_count": 5,
        "outgoing_count": 4,
        "first_message": T0 - timedelta(days=1),
        "last_message": at,
        "last_message_id": message_id,
        "analyzed": analyzed,
        "niche": "medicine",
        "business_type": "стоматология",
        "is_owner": True,
        "has_sales_dept": False,
        "uses_ads_now": True,
        "ad_budget": "500 тыс тенге",
        "instagram_url": None,
        "funnel_stage": "qualified",
        "main_intent": "clinic_lead",
        "objection": None,
        "action": "want_call",
        "next_message": "Когда удобно созвониться?",
        "reasoning": "Owner of a clinic with a budget.",
        "is_medical": True,
        "budget_stated": True,
        "has_booking": False,
        "sent_instagram": False,
        "qualification_complete": True,
        "score": 65,
        "interest_level": "warm",
        "score_breakdown": BREAKDOWN,
        "messages": [{"id": message_id, "from_me": False, "text": "Здравствуйте"}],
        "analyzer": "rules" if analyzed else None,
        "llm_usage": {"prompt_tokens": 10} if analyzed else None,
    }
    values.update(facts)
    return AnalysisWrite(**values)


def new_lead_write(account: uuid.UUID, phone: str = "77010000001", **kw: Any) -> AnalysisWrite:
    defaults: dict[str, Any] = {
        "analyzed": False,
        "niche": "other",
        "business_type": None,
        "is_owner": None,
        "has_sales_dept": None,
        "uses_ads_now": None,
        "ad_budget": None,
        "funnel_stage": "new_lead",
        "main_intent": "other",
        "action": "none",
        "next_message": "",
        "reasoning": None,
        "is_medical": False,
        "budget_stated": False,
        "qualification_complete": False,
        "score": 5,
        "interest_level": "cold",
        "score_breakdown": [{"reason": "stage: new_lead", "points": 5}],
        "incoming_count": 1,
    }
    defaults.update(kw)
    return write(account, phone, **defaults)


def manual_lead(account: uuid.UUID, phone: str, instance: str = INSTANCE, **kw: Any) -> LeadRow:
    values: dict[str, Any] = {
        "id": uuid.uuid4(),
        "instance_name": instance,
        "user_account_id": account,
        "contact_phone": phone,
        "contact_name": "Manual",
        "funnel_stage": "qualified",
        "niche": "infobusiness",
        "score": 40,
        "interest_level": "warm",
        "notes": "met at a conference",
        "manual_fields": ["contact_name", "funnel_stage", "notes", "notes"],
    }
    values.update(kw)
    return LeadRow(**values)


async def seed(
    dsn: str, account: uuid.UUID, count: int, *, instance: str = INSTANCE, first: int = 0
) -> None:
    """`count` rows written straight to the table (fast), with NULLs and ties in the sort."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            """
            INSERT INTO dialog_analysis (instance_name, user_account_id, contact_phone,
                next_message, score, interest_level, funnel_stage, last_message,
                qualification_complete, niche, incoming_count, outgoing_count, analyzed_at,
                analyzer)
            SELECT $1, $2, (77000000000 + $4 + g)::text, '',
                   CASE WHEN g % 17 = 0 THEN NULL ELSE (g * 37) % 101 END,
                   (ARRAY['hot', 'warm', 'cold'])[1 + g % 3],
                   (ARRAY['new_lead', 'qualified', 'deal_closed'])[1 + g % 3],
                   CASE WHEN g % 13 = 0 THEN NULL
                        ELSE timestamptz '2025-01-01' + (g % 40) * interval '1 hour' END,
                   CASE WHEN g % 5 = 0 THEN NULL ELSE g % 2 = 0 END,
                   'other', g % 7, g % 3, now(), 'rules'
            FROM generate_series(1, $3) AS g
            """,
            instance,
            account,
            count,
            first,
        )
    finally:
        await conn.close()


def list_order(rows: list[LeadRow]) -> list[uuid.UUID]:
    """Ids in the contract's order: score DESC NULLS LAST, last_message DESC NULLS LAST, id."""
    never = datetime.min.replace(tzinfo=UTC)

    def key(r: LeadRow) -> tuple[int, datetime, uuid.UUID]:
        return (-1 if r.score is None else r.score, r.last_message or never, r.id)

    return [r.id for r in sorted(rows, key=key, reverse=True)]


async def all_rows(dsn: str, account: uuid.UUID) -> list[LeadRow]:
    conn = await asyncpg.connect(dsn)
    try:
        records = await conn.fetch(
            "SELECT id, instance_name, user_account_id, contact_phone, score, last_message "
            "FROM dialog_analysis WHERE user_account_id = $1",
            account,
        )
    finally:
        await conn.close()
    return [LeadRow(**dict(r)) for r in records]


# -- the contract, run against both stores ------------------------------------------------


async def test_upsert_then_read_back(store: ResultsStore, account: uuid.UUID) -> None:
    result = await store.upsert_analysis(write(account))
    assert result.applied and result.id is not None
    assert result.previous_interest is None and result.interest_level == "warm"

    state = await store.get_state(account, INSTANCE, "77010000001")
    assert state is not None and state.id == result.id
    assert state.last_message == T0 and state.last_message_id == "m1"
    assert state.analyzer == "rules" and state.analyzed_at is not None
    assert state.funnel_stage == "qualified" and state.manual_fields == []

    lead = await store.get_lead(account, result.id)
    assert lead is not None
    assert lead.messages is None  # large: only when asked for
    assert (lead.contact_name, lead.business_type, lead.score) == ("Айгуль", "стоматология", 65)
    assert lead.score_breakdown == BREAKDOWN  # evidence, Cyrillic quotes and all
    assert lead.llm_usage == {"prompt_tokens": 10}
    assert lead.source == "auto" and lead.niche == "medicine" and lead.is_medical is True
    assert lead.first_message == T0 - timedelta(days=1)
    full = await store.get_lead(account, result.id, include_messages=True)
    assert full is not None and full.messages == [
        {"id": "m1", "from_me": False, "text": "Здравствуйте"}
    ]
    assert await store.get_state(account, INSTANCE, "77019999999") is None
    await store.ping()


async def test_newer_dialog_wins(store: ResultsStore, account: uuid.UUID) -> None:
    later = T0 + timedelta(hours=1)
    first = await store.upsert_analysis(write(account, at=later, message_id="m2", score=80))
    stale = await store.upsert_analysis(
        write(account, at=T0, message_id="m1", score=20, interest_level="cold")
    )
    assert first.applied and not stale.applied
    assert stale.id == first.id and stale.interest_level == "warm"  # the stored row's
    lead = await store.get_lead(account, first.id)  # type: ignore[arg-type]
    assert lead is not None and lead.score == 80 and lead.last_message_id == "m2"

    newest = await store.upsert_analysis(
        write(account, at=later + timedelta(minutes=1), message_id="m3", score=30)
    )
    assert newest.applied
    lead = await store.get_lead(account, first.id)  # type: ignore[arg-type]
    assert lead is not None and lead.score == 30 and lead.last_message_id == "m3"


async def test_concurrent_writers_converge_on_the_newest(
    store: ResultsStore, account: uuid.UUID
) -> None:
    writes = [
        write(
            account,
            at=T0 + timedelta(seconds=i),
            message_id=f"m{i}",
            business_type=f"business {i}",
            score=i,
            interest_level="cold",
        )
        for i in range(20)
    ]
    random.Random(7).shuffle(writes)
    results = await asyncio.gather(*(store.upsert_analysis(w) for w in writes))
    assert any(r.applied for r in results)
    assert len({r.id for r in results}) == 1  # one row, whoever inserted it
    state = await store.get_state(account, INSTANCE, "77010000001")
    assert state is not None and state.last_message_id == "m19"
    lead = await store.get_lead(account, state.id)
    assert lead is not None
    assert (lead.last_message, lead.business_type, lead.score) == (
        T0 + timedelta(seconds=19),
        "business 19",
        19,
    )


async def test_manual_fields_survive_automatic_analysis(
    store: ResultsStore, account: uuid.UUID
) -> None:
    result = await store.upsert_analysis(write(account))
    assert result.id is not None
    edited = await store.update_lead(
        account, result.id, {"business_type": "клиника эстетики", "score": 90}
    )
    assert edited is not None and edited.manual_fields == ["business_type", "score"]

    again = await store.upsert_analysis(
        write(
            account,
            at=T0 + timedelta(hours=2),
            message_id="m9",
            business_type="салон",
            score=30,
            funnel_stage="consultation_booked",
            interest_level="cold",
        )
    )
    assert again.applied
    lead = await store.get_lead(account, result.id)
    assert lead is not None
    assert lead.business_type == "клиника эстетики" and lead.score == 90  # kept
    assert lead.funnel_stage == "consultation_booked"  # not manual: analysed value
    assert lead.interest_level == "cold" and lead.last_message_id == "m9"
    state = await store.get_state(account, INSTANCE, "77010000001")
    assert state is not None
    assert state.manual_values == {"business_type": "клиника эстетики", "score": 90}


async def test_new_lead_refresh_never_downgrades_an_analysis(
    store: ResultsStore, account: uuid.UUID
) -> None:
    analysed = await store.upsert_analysis(write(account, at=T0, message_id="m1"))
    refresh = await store.upsert_analysis(
        new_lead_write(account, at=T0 + timedelta(minutes=5), message_id="m2", incoming_count=6)
    )
    assert refresh.applied and refresh.id == analysed.id
    lead = await store.get_lead(account, analysed.id, include_messages=True)  # type: ignore[arg-type]
    assert lead is not None
    assert (lead.incoming_count, lead.last_message_id) == (6, "m2")  # identity refreshed
    assert (lead.funnel_stage, lead.score, lead.analyzer) == ("qualified", 65, "rules")
    assert lead.messages == [{"id": "m1", "from_me": False, "text": "Здравствуйте"}]

    # Same dialog again, not an analysis: nothing to change.
    same = await store.upsert_analysis(
        new_lead_write(account, at=T0 + timedelta(minutes=5), message_id="m2")
    )
    assert not same.applied and same.interest_level == "warm"


async def test_new_lead_rows_are_refreshed_until_analysed(
    store: ResultsStore, account: uuid.UUID
) -> None:
    first = await store.upsert_analysis(new_lead_write(account, incoming_count=1))
    assert first.applied and first.interest_level == "cold"
    state = await store.get_state(account, INSTANCE, "77010000001")
    assert state is not None and state.analyzer is None and state.analyzed_at is None

    second = await store.upsert_analysis(
        new_lead_write(
            account, at=T0 + timedelta(minutes=1), message_id="m2", incoming_count=2, score=6
        )
    )
    assert second.applied
    lead = await store.get_lead(account, first.id)  # type: ignore[arg-type]
    assert lead is not None and (lead.incoming_count, lead.score) == (2, 6)
    assert lead.next_message == ""  # NOT NULL column of the original

    analysed = await store.upsert_analysis(
        write(account, at=T0 + timedelta(minutes=2), message_id="m3")
    )
    assert analysed.applied and analysed.previous_interest == "cold"
    lead = await store.get_lead(account, first.id)  # type: ignore[arg-type]
    assert lead is not None and lead.funnel_stage == "qualified" and lead.analyzer == "rules"


async def test_every_call_is_scoped_to_the_account(store: ResultsStore, account: uuid.UUID) -> None:
    other = uuid.uuid4()
    mine = await store.upsert_analysis(write(account))
    assert mine.id is not None

    assert await store.get_lead(other, mine.id) is None
    assert await store.get_state(other, INSTANCE, "77010000001") is None
    assert await store.update_lead(other, mine.id, {"notes": "not yours"}) is None
    assert await store.delete_lead(other, mine.id) is False
    rows, total = await store.query_leads(LeadQuery(user_account_id=other))
    assert rows == [] and total == 0
    assert [r async for r in store.iter_leads(LeadQuery(user_account_id=other))] == []
    assert (await store.stats(other, None)).total == 0

    foreign = await store.upsert_analysis(
        write(other, at=T0 + timedelta(hours=1), message_id="m2", score=1)
    )
    assert not foreign.applied and foreign.id is None
    lead = await store.get_lead(account, mine.id)
    assert lead is not None and lead.score == 65 and lead.notes is None

    assert await store.delete_lead(account, mine.id) is True
    assert await store.get_lead(account, mine.id) is None
    assert await store.delete_lead(account, mine.id) is False


async def test_query_filters(store: ResultsStore, account: uuid.UUID, results_dsn: str) -> None:
    specs: list[dict[str, Any]] = [
        {"instance": "inst-a", "interest_level": "hot", "score": 80, "funnel_stage": "deal_closed"},
        {"instance": "inst-a", "interest_level": "warm", "score": 45, "funnel_stage": "qualified"},
        {"instance": "inst-a", "interest_level": "cold", "score": 10, "funnel_stage": "new_lead"},
        {"instance": "inst-b", "interest_level": "hot", "score": 90, "funnel_stage": "deal_closed"},
        {
            "instance": "inst-b",
            "interest_level": "cold",
            "score": 30,
            "funnel_stage": "qualified",
            "qualification_complete": False,
        },
    ]
    ids: list[uuid.UUID] = []
    for n, spec in enumerate(specs):
        result = await store.upsert_analysis(write(account, f"7701000000{n}", **spec))
        assert result.id is not None
        ids.append(result.id)
    await store.upsert_analysis(write(uuid.uuid4(), "77019999999", instance="inst-a"))
    # A row of the original service: qualification_complete unknown counts as not complete.
    conn = await asyncpg.connect(results_dsn)
    try:
        await conn.execute(
            "UPDATE dialog_analysis SET qualification_complete = NULL WHERE id = $1", ids[2]
        )
    finally:
        await conn.close()

    async def found(**filters: Any) -> set[uuid.UUID]:
        query = LeadQuery(user_account_id=account, **filters)
        rows, total = await store.query_leads(query)
        streamed = [r.id async for r in store.iter_leads(query, chunk_size=2)]
        assert total == len(rows) and streamed == [r.id for r in rows]
        return {r.id for r in rows}

    assert await found() == set(ids)
    assert await found(instance_name="inst-b") == {ids[3], ids[4]}
    assert await found(interest_level="hot") == {ids[0], ids[3]}
    assert await found(min_score=45) == {ids[0], ids[1], ids[3]}
    assert await found(funnel_stage="qualified") == {ids[1], ids[4]}
    assert await found(qualification_complete=True) == {ids[0], ids[1], ids[3]}
    assert await found(qualification_complete=False) == {ids[2], ids[4]}
    assert await found(instance_name="inst-a", interest_level="hot", min_score=81) == set()
    assert await found(instance_name="inst-b", funnel_stage="deal_closed", min_score=90) == {ids[3]}


async def test_limit_offset_total_and_order_beyond_1000_rows(
    store: ResultsStore, account: uuid.UUID, results_dsn: str
) -> None:
    await seed(results_dsn, account, 1250)
    await seed(results_dsn, uuid.uuid4(), 30, first=50_000)
    expected = list_order(await all_rows(results_dsn, account))

    rows, total = await store.query_leads(LeadQuery(user_account_id=account, limit=1100))
    assert total == 1250 and len(rows) == 1100  # no silent cut at the server's max-rows
    assert [r.id for r in rows] == expected[:1100]
    assert all(r.messages is None for r in rows)

    rows, total = await store.query_leads(
        LeadQuery(user_account_id=account, limit=100, offset=1200)
    )
    assert total == 1250 and [r.id for r in rows] == expected[1200:]
    rows, total = await store.query_leads(LeadQuery(user_account_id=account, limit=10, offset=7))
    assert [r.id for r in rows] == expected[7:17]
    rows, total = await store.query_leads(LeadQuery(user_account_id=account, limit=10, offset=5000))
    assert rows == [] and total == 1250
    rows, total = await store.query_leads(LeadQuery(user_account_id=account, limit=0))
    assert rows == [] and total == 1250


async def test_iter_leads_streams_every_row_in_list_order(
    store: ResultsStore, account: uuid.UUID, results_dsn: str
) -> None:
    await seed(results_dsn, account, 2600)
    await seed(results_dsn, account, 400, instance="inst-b", first=10_000)
    await seed(results_dsn, uuid.uuid4(), 50, first=50_000)
    everything = await all_rows(results_dsn, account)

    streamed = [r async for r in store.iter_leads(LeadQuery(user_account_id=account), 700)]
    assert [r.id for r in streamed] == list_order(everything)
    assert len({r.id for r in streamed}) == 3000

    query = LeadQuery(user_account_id=account, instance_name="inst-b", min_score=50, limit=1)
    expected = list_order(
        [r for r in everything if r.instance_name == "inst-b" and (r.score or -1) >= 50]
    )
    assert [r.id async for r in store.iter_leads(query, chunk_size=64)] == expected


async def test_stats(store: ResultsStore, account: uuid.UUID, results_dsn: str) -> None:
    await store.upsert_analysis(
        write(account, "1", score=80, interest_level="hot", funnel_stage="deal_closed")
    )
    await store.upsert_analysis(
        write(account, "2", score=45, interest_level="warm", niche="infobusiness")
    )
    await store.upsert_analysis(
        write(
            account,
            "3",
            score=10,
            interest_level="cold",
            funnel_stage="not_qualified",
            qualification_complete=False,
            incoming_count=1,
            outgoing_count=0,
        )
    )
    await store.upsert_analysis(new_lead_write(account, "4", instance="inst-b", outgoing_count=2))
    await store.upsert_analysis(write(uuid.uuid4(), "5", score=100, interest_level="hot"))
    conn = await asyncpg.connect(results_dsn)
    try:  # one analysis from two days ago
        await conn.execute(
            "UPDATE dialog_analysis SET analyzed_at = now() - interval '2 days' "
            "WHERE contact_phone = '3'"
        )
    finally:
        await conn.close()

    stats = await store.stats(account, None)
    assert (stats.total, stats.hot, stats.warm, stats.cold) == (4, 1, 1, 2)
    assert stats.avgScore == 35.0  # (80 + 45 + 10 + 5) / 4
    assert stats.totalMessages == (5 + 4) * 2 + 1 + (1 + 2)
    assert (stats.new_lead, stats.not_qualified, stats.qualified, stats.deal_closed) == (
        1,
        1,
        1,
        1,
    )
    assert stats.consultation_booked == stats.consultation_completed == stats.deal_lost == 0
    assert stats.qualified_count == 2
    assert stats.by_niche == {"medicine": 2, "infobusiness": 1, "other": 1}
    assert stats.analyzed_last_24h == 2  # the new_lead row has no analysis

    only_a = await store.stats(account, INSTANCE)
    assert only_a.total == 3 and only_a.avgScore == 45.0
    assert only_a.by_niche == {"medicine": 2, "infobusiness": 1}
    await store.upsert_analysis(write(account, "6", score=33, interest_level="cold"))
    assert (await store.stats(account, INSTANCE)).avgScore == 42.0  # 168 / 4
    await store.upsert_analysis(write(account, "7", score=1, interest_level="cold"))
    assert (await store.stats(account, INSTANCE)).avgScore == 33.8  # 169 / 5, one decimal


async def test_create_lead_and_duplicates(store: ResultsStore, account: uuid.UUID) -> None:
    created = await store.create_lead(manual_lead(account, "77020000001"))
    assert created.source == "manual" and created.created_at is not None
    assert created.manual_fields == ["contact_name", "funnel_stage", "notes"]
    assert created.next_message == "" and created.analyzer is None
    fetched = await store.get_lead(account, created.id)
    assert fetched is not None and fetched.notes == "met at a conference"

    with pytest.raises(DuplicateLeadError):
        await store.create_lead(manual_lead(account, "77020000001"))
    with pytest.raises(DuplicateLeadError):  # whoever's it is
        await store.create_lead(manual_lead(uuid.uuid4(), "77020000001"))
    other_instance = await store.create_lead(manual_lead(account, "77020000001", "inst-b"))
    assert other_instance.id != created.id

    # The analysis that comes later keeps what the person typed.
    result = await store.upsert_analysis(write(account, "77020000001", contact_name="Pushname"))
    assert result.applied and result.id == created.id
    lead = await store.get_lead(account, created.id)
    assert lead is not None
    assert (lead.contact_name, lead.funnel_stage, lead.notes) == (
        "Manual",
        "qualified",
        "met at a conference",
    )
    assert lead.business_type == "стоматология" and lead.source == "manual"


async def test_new_lead_write_keeps_a_manual_leads_facts(
    store: ResultsStore, account: uuid.UUID
) -> None:
    created = await store.create_lead(manual_lead(account, "77020000002"))
    refresh = await store.upsert_analysis(new_lead_write(account, "77020000002"))
    assert refresh.applied
    lead = await store.get_lead(account, created.id)
    assert lead is not None
    assert (lead.funnel_stage, lead.score, lead.niche) == ("qualified", 40, "infobusiness")
    assert lead.incoming_count == 1 and lead.last_message == T0


async def test_update_lead_adds_manual_fields(store: ResultsStore, account: uuid.UUID) -> None:
    result = await store.upsert_analysis(write(account))
    assert result.id is not None
    lead = await store.update_lead(account, result.id, {"notes": "call on Monday"})
    assert lead is not None and lead.manual_fields == ["notes"] and lead.score == 65
    assert lead.updated_at is not None and lead.messages is None

    lead = await store.update_lead(
        account,
        result.id,
        {"notes": "called", "funnel_stage": "consultation_booked"},
        {"score": 70, "interest_level": "warm", "has_booking": True},
    )
    assert lead is not None
    assert lead.manual_fields == ["notes", "funnel_stage"]  # deduplicated, in order
    assert (lead.notes, lead.funnel_stage, lead.score, lead.has_booking) == (
        "called",
        "consultation_booked",
        70,
        True,
    )

    # A score set by hand is not replaced by a recomputed one.
    lead = await store.update_lead(account, result.id, {"score": 99, "interest_level": "hot"})
    assert lead is not None and lead.score == 99
    lead = await store.update_lead(account, result.id, {"is_owner": False}, {"score": 50})
    assert lead is not None and lead.score == 99 and lead.is_owner is False
    assert lead.manual_fields == ["notes", "funnel_stage", "interest_level", "score", "is_owner"]

    with pytest.raises(ValueError, match="reasoning"):
        await store.update_lead(account, result.id, {"reasoning": "no"})
    with pytest.raises(ValueError, match="notes"):
        await store.update_lead(account, result.id, {}, {"notes": "no"})
    with pytest.raises(ValueError):
        await store.update_lead(account, result.id, {"funnel_stage": "bogus"})
    assert await store.update_lead(account, uuid.uuid4(), {"notes": "x"}) is None


async def test_previous_interest_tells_when_a_lead_becomes_hot(
    store: ResultsStore, account: uuid.UUID
) -> None:
    def became_hot(r: Any) -> bool:
        return bool(r.applied and r.interest_level == "hot" and r.previous_interest != "hot")

    steps = [
        (T0, "cold", False),
        (T0 + timedelta(minutes=1), "hot", True),
        (T0 + timedelta(minutes=2), "hot", False),
        (T0 + timedelta(minutes=3), "warm", False),
        (T0 + timedelta(minutes=4), "hot", True),
    ]
    for n, (at, interest, expected) in enumerate(steps):
        result = await store.upsert_analysis(
            write(account, at=at, message_id=f"m{n}", interest_level=interest)
        )
        assert became_hot(result) is expected, (n, result)
    stale = await store.upsert_analysis(
        write(account, at=T0, message_id="m0", interest_level="hot")
    )
    assert not stale.applied and not became_hot(stale) and stale.previous_interest == "hot"


async def test_instance_mapping(store: ResultsStore, account: uuid.UUID) -> None:
    mapping = await store.add_instance("sales-1", account)
    assert mapping.instance_name == "sales-1" and mapping.user_account_id == account
    assert mapping.created_at is not None
    again = await store.add_instance("sales-1", account)  # idempotent
    assert again.created_at == mapping.created_at
    with pytest.raises(InstanceOwnedError, match="sales-1"):
        await store.add_instance("sales-1", uuid.uuid4())
    await store.add_instance("sales-0", account)

    assert await store.instance_account("sales-1") == account
    assert await store.instance_account("nope") is None
    assert [
        m.instance_name for m in await store.list_instances() if m.instance_name != "clinic-main"
    ] == [
        "sales-0",
        "sales-1",
    ]
    assert await store.remove_instance("sales-1") is True
    assert await store.remove_instance("sales-1") is False
    assert await store.instance_account("sales-1") is None
    assert [
        m.instance_name for m in await store.list_instances() if m.instance_name != "clinic-main"
    ] == ["sales-0"]


# -- opening stores ------------------------------------------------------------------------


async def test_factory_picks_the_store_from_settings(
    results_dsn: str, postgrest: PostgrestServer
) -> None:
    direct = await open_store(Settings(results_database_url=results_dsn))
    try:
        assert isinstance(direct, PostgresStore)
        await direct.ping()
    finally:
        await direct.close()
    rest = await open_store(
        Settings(
            results_database_url=results_dsn,
            supabase_url=postgrest.url,
            supabase_service_key=KEY,
        )
    )
    try:
        assert isinstance(rest, SupabaseStore)
        await rest.ping()
    finally:
        await rest.close()
    assert any(r.startswith("GET /rest/v1/dialog_analysis") for r in postgrest.requests)


async def test_postgres_unreachable_is_reported_without_the_password() -> None:
    dsn = "postgresql://crm:s3cr3t-pw@127.0.0.1:1/crm"
    with pytest.raises(StoreUnavailableError) as caught:
        await PostgresStore.open(dsn)
    assert "127.0.0.1:1/crm" in str(caught.value) and "s3cr3t" not in str(caught.value)
    with pytest.raises(StoreUnavailableError, match="does not exist"):
        await PostgresStore.open(pg_dsn("crmt_no_such_database"))


async def test_postgres_store_reports_a_lost_database() -> None:
    name = await create_database("crmt_lost")
    pg = await PostgresStore.open(pg_dsn(name), max_size=1)
    try:
        await pg.ping()
        await drop_database(name)  # terminates the pool's connection, and it cannot return
        with pytest.raises(StoreUnavailableError, match=name):
            await pg.ping()
    finally:
        await pg.close()
        await drop_database(name)


# -- Supabase transport ----------------------------------------------------------------------


async def test_supabase_retries_transient_failures_of_the_upsert(
    supabase: SupabaseStore, postgrest: PostgrestServer, account: uuid.UUID
) -> None:
    postgrest.fail_next(2, 503)
    result = await supabase.upsert_analysis(write(account))
    assert result.applied
    calls = [r for r in postgrest.requests if r.startswith("POST /rest/v1/rpc/crm_upsert")]
    assert len(calls) == 3

    postgrest.drop_next(1)  # connection closed without an answer: the upsert is repeatable
    result = await supabase.upsert_analysis(write(account, at=T0 + timedelta(minutes=1)))
    assert result.applied

    postgrest.fail_next(4, 502)  # as many as the store's attempts
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError, match="storing an analysis"):
        await supabase.upsert_analysis(write(account, at=T0 + timedelta(minutes=2)))
    assert time.monotonic() - started < 5  # bounded backoff
    assert (await supabase.upsert_analysis(write(account, at=T0 + timedelta(minutes=3)))).applied


async def test_supabase_does_not_repeat_an_insert_that_may_have_run(
    supabase: SupabaseStore, postgrest: PostgrestServer, account: uuid.UUID
) -> None:
    postgrest.drop_next(1)
    with pytest.raises(StoreUnavailableError, match="creating a lead"):
        await supabase.create_lead(manual_lead(account, "77030000001"))
    assert sum(r.startswith("POST /rest/v1/rpc/crm_create_lead") for r in postgrest.requests) == 1
    postgrest.fail_next(1, 429)  # rate limited: not processed, retried
    assert (await supabase.create_lead(manual_lead(account, "77030000001"))).source == "manual"


async def test_supabase_explains_key_schema_and_connection_errors(
    postgrest: PostgrestServer, supabase_empty_db: str
) -> None:
    wrong = await SupabaseStore.open(postgrest.url, "not-the-key", backoff=0.01)
    try:
        with pytest.raises(StoreUnavailableError, match="SUPABASE_SERVICE_KEY"):
            await wrong.ping()
    finally:
        await wrong.close()

    async with running_postgrest(supabase_empty_db) as bare:  # migrations never ran
        unmigrated = await SupabaseStore.open(bare.url, KEY, backoff=0.01)
        try:
            with pytest.raises(StoreUnavailableError, match="migrate --print"):
                await unmigrated.stats(uuid.uuid4(), None)
        finally:
            await unmigrated.close()
    gone = await SupabaseStore.open(bare.url, KEY, attempts=2, backoff=0.01)
    try:
        with pytest.raises(StoreUnavailableError, match="unavailable"):
            await gone.ping()
    finally:
        await gone.close()


async def test_supabase_pages_keyset_through_the_rpc(
    supabase: SupabaseStore, postgrest: PostgrestServer, account: uuid.UUID, results_dsn: str
) -> None:
    await seed(results_dsn, account, 450)
    postgrest.max_rows = 100  # a server stricter than the chunk size asked for
    rows = [r async for r in supabase.iter_leads(LeadQuery(user_account_id=account), 1000)]
    assert [r.id for r in rows] == list_order(await all_rows(results_dsn, account))
    pages = [r for r in postgrest.requests if "crm_leads_page" in r]
    assert len(pages) == 6 and not any("offset=" in r for r in pages)
    listed, total = await supabase.query_leads(LeadQuery(user_account_id=account, limit=450))
    assert total == 450 and [r.id for r in listed] == [r.id for r in rows]


# -- the test server itself speaks PostgREST ---------------------------------------------


async def test_postgrest_server_semantics(
    postgrest: PostgrestServer, account: uuid.UUID, results_dsn: str
) -> None:
    conn = await asyncpg.connect(results_dsn)
    try:  # the upgraded original's instance row would change the counts below
        await conn.execute("DELETE FROM whatsapp_instances")
    finally:
        await conn.close()
    headers = {"apikey": KEY, "Authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(base_url=postgrest.url + "/rest/v1", headers=headers) as http:
        for n in range(3):
            response = await http.post(
                "/whatsapp_instances",
                json={"instance_name": f"i{n}", "user_account_id": str(account)},
                headers={"Prefer": "return=representation"},
            )
            assert response.status_code == 201 and response.json()[0]["instance_name"] == f"i{n}"
        duplicate = await http.post(
            "/whatsapp_instances", json={"instance_name": "i0", "user_account_id": str(account)}
        )
        assert duplicate.status_code == 409 and duplicate.json()["code"] == "23505"
        assert set(duplicate.json()) == {"code", "details", "hint", "message"}

        page = await http.get(
            "/whatsapp_instances",
            params={"select": "instance_name", "order": "instance_name.desc", "offset": "1"},
            headers={"Prefer": "count=exact", "Range": "0-0"},
        )
        assert page.status_code == 206 and page.headers["content-range"] == "1-1/3"
        assert page.json() == [{"instance_name": "i1"}]
        picked = await http.get(
            "/whatsapp_instances",
            params={"select": "instance_name", "instance_name": 'in.(i0,"i,2",i2)', "order": "id"},
        )
        assert sorted(r["instance_name"] for r in picked.json()) == ["i0", "i2"]
        assert picked.headers["content-range"].endswith("/*")
        nulls = await http.get("/whatsapp_instances", params={"status": "is.null"})
        assert len(nulls.json()) == 3
        past = await http.get(
            "/whatsapp_instances", params={"offset": "9"}, headers={"Prefer": "count=exact"}
        )
        assert past.status_code == 416 and past.headers["content-range"] == "*/3"

        postgrest.max_rows = 2
        capped = await http.get("/whatsapp_instances", headers={"Prefer": "count=exact"})
        assert len(capped.json()) == 2 and capped.headers["content-range"] == "0-1/3"

        # service_role may not UPDATE whatsapp_instances (the store never does): PostgreSQL
        # refuses, PostgREST answers 42501 with 403 for a role other than anon.
        changed = await http.patch(
            "/whatsapp_instances",
            params={"instance_name": "eq.i1"},
            json={"status": "connected"},
            headers={"Prefer": "return=representation"},
        )
        assert changed.status_code == 403 and changed.json()["code"] == "42501"
        assert changed.json()["message"] == "permission denied for table whatsapp_instances"
        bad_value = await http.post(
            "/whatsapp_instances",
            json={"instance_name": "i9", "user_account_id": str(account), "status": "asleep"},
        )
        assert bad_value.status_code == 400 and bad_value.json()["code"] == "23514"
        unfiltered = await http.delete("/whatsapp_instances")
        assert unfiltered.status_code == 400
        removed = await http.delete(
            "/whatsapp_instances",
            params={"instance_name": "not.in.(i1,i2)"},
            headers={"Prefer": "return=representation"},
        )
        assert [r["instance_name"] for r in removed.json()] == ["i0"]

        missing = await http.get("/no_such_table")
        assert missing.status_code == 404 and missing.json()["code"] == "PGRST205"
        assert missing.json()["message"] == (
            "Could not find the table 'public.no_such_table' in the schema cache"
        )
        unknown_column = await http.get("/whatsapp_instances", params={"select": "password"})
        assert unknown_column.status_code == 400 and unknown_column.json()["code"] == "42703"
        bad_uuid = await http.get("/whatsapp_instances", params={"user_account_id": "eq.x"})
        assert bad_uuid.status_code == 400 and bad_uuid.json()["code"] == "22P02"
        missing_fn = await http.post("/rpc/crm_nothing", json={})
        assert missing_fn.status_code == 404 and missing_fn.json()["code"] == "PGRST202"
        stats = await http.post("/rpc/crm_lead_stats", json={"p_account": str(account)})
        assert stats.status_code == 200 and stats.json()["total"] == 0

    async with httpx.AsyncClient(base_url=postgrest.url + "/rest/v1") as anonymous:
        denied = await anonymous.get("/whatsapp_instances")
        assert denied.status_code == 401
        assert denied.json()["message"] == "No API key found in request"
        forged = await anonymous.get("/whatsapp_instances", headers={"apikey": "eyJ.not.signed"})
        assert forged.status_code == 401 and forged.json()["message"] == "Invalid API key"
        wrong_bearer = await anonymous.get(
            "/whatsapp_instances", headers={"apikey": KEY, "Authorization": "Bearer other"}
        )
        assert wrong_bearer.status_code == 401 and wrong_bearer.json()["code"] == "PGRST301"
        nobody = legacy_key("nobody")  # signed, but its role does not exist
        unknown_role = await anonymous.get(
            "/whatsapp_instances", headers={"apikey": nobody, "Authorization": f"Bearer {nobody}"}
        )
        assert unknown_role.status_code == 401 and unknown_role.json()["code"] == "22023"


async def test_lead_row_fields_are_the_tables_columns(results_dsn: str) -> None:
    # The stores read LeadRow's fields by name: the migrated table must hold exactly those.
    conn = await asyncpg.connect(results_dsn)
    try:
        columns = await conn.fetch(
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_name = 'dialog_analysis'"
        )
    finally:
        await conn.close()
    fields = {f.name for f in msgspec.structs.fields(LeadRow)}
    assert {c["column_name"] for c in columns} == fields


async def test_event_deletes_and_lid_pairs_are_kept_per_account(
    store: ResultsStore, account: uuid.UUID
) -> None:
    """service/sql/0005_evolution_events.sql through both stores (the Supabase one over
    PostgREST `rpc`): recorded once, read back by the account only."""
    jid = "77010000001@s.whatsapp.net"
    assert await store.record_deletes(account, INSTANCE, jid, ["m2", "m1"]) == 2
    assert await store.record_deletes(account, INSTANCE, jid, ["m1"]) == 0  # once
    assert await store.deleted_ids(account, INSTANCE, jid) == {"m1", "m2"}
    assert await store.deleted_ids(uuid.uuid4(), INSTANCE, jid) == set()
    assert await store.deleted_ids(account, INSTANCE, "77010000002@s.whatsapp.net") == set()

    lid = "181736458731542@lid"
    assert await store.remember_lid(INSTANCE, lid, jid) is False  # instance not mapped
    await store.add_instance(INSTANCE, account)
    assert await store.remember_lid(INSTANCE, lid, jid) is True
    assert await store.remember_lid(INSTANCE, lid, jid) is False  # already held
    assert await store.lid_phone(INSTANCE, lid) == jid
    assert await store.lid_phone(INSTANCE, "999@lid") is None
    # The pair belongs to the account: moved to another, the instance no longer finds it.
    await store.move_instance(INSTANCE, uuid.uuid4())
    assert await store.lid_phone(INSTANCE, lid) is None
