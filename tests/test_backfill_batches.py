"""The backfill's bulk paths: page reads, batched writes, the limit on analyses in flight,
`--workers N`. Each must store exactly what the one-contact-at-a-time path stores (real
PostgreSQL; both results stores for the store methods)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import asyncpg
import msgspec
import pytest

from service.adapters.evolution.seed import load_dialogs
from service.adapters.stores.base import ResultsStore
from service.adapters.stores.postgres import PostgresStore
from service.usecases.backfill import BulkStore, _WriteBatcher
from service.usecases.backfill_workers import shares
from tests.fakes.openai_server import FakeOpenAI
from tests.rest_support import open_store
from tests.test_backfill import _env, backfill
from tests.test_store_contract import INSTANCE, T0, write

# What a lead row holds that does not depend on when or by which process it was written.
_COMPARED = (
    "contact_phone",
    "contact_name",
    "incoming_count",
    "outgoing_count",
    "last_message_id",
    "funnel_stage",
    "score",
    "interest_level",
    "niche",
    "analyzer",
    "score_breakdown",
    "messages",
)


@pytest.fixture(params=["postgres", "supabase"])
async def store(request: pytest.FixtureRequest, results_dsn: str) -> AsyncIterator[ResultsStore]:
    async with open_store(request.param, results_dsn) as opened:
        yield opened


async def test_bulk_reads_match_the_single_reads(store: ResultsStore) -> None:
    account, other = uuid.uuid4(), uuid.uuid4()
    phones = [f"7701000000{i}" for i in range(5)]
    for i, phone in enumerate(phones[:3]):
        await store.upsert_analysis(write(account, phone, message_id=f"m{i}"))
    await store.upsert_analysis(write(other, "77019999999"))
    await store.record_deletes(account, INSTANCE, f"{phones[0]}@s.whatsapp.net", ["b", "a"])
    await store.record_deletes(account, INSTANCE, f"{phones[4]}@s.whatsapp.net", ["c"])
    await store.record_deletes(other, INSTANCE, f"{phones[1]}@s.whatsapp.net", ["x"])

    asked = [*phones, "77019999999"]  # the last is another account's
    states = await store.get_states(account, INSTANCE, asked)
    for phone in asked:
        single = await store.get_state(account, INSTANCE, phone)
        assert states.get(phone) == single
    assert set(states) == set(phones[:3])

    jids = [f"{p}@s.whatsapp.net" for p in asked]
    deleted = await store.deleted_ids_of(account, INSTANCE, jids)
    for jid in jids:
        assert deleted.get(jid, set()) == await store.deleted_ids(account, INSTANCE, jid)
    assert set(deleted) == {jids[0], jids[4]}
    assert await store.get_states(account, INSTANCE, []) == {}
    assert await store.deleted_ids_of(account, INSTANCE, []) == {}


async def test_batched_writes_match_the_single_writes(store: ResultsStore) -> None:
    """The same writes, one by one for one account and in one batch for another, leave
    the same rows and return the same results (newer wins, older dropped, new rows)."""
    results: dict[str, list[Any]] = {}
    rows: dict[str, list[dict[str, Any]]] = {}
    for mode, instance in (("single", "inst-single"), ("batch", "inst-batch")):
        account = uuid.uuid4()
        first = [write(account, f"7702000000{i}", instance=instance) for i in range(3)]
        if mode == "batch":
            await store.upsert_analyses(first)
        else:
            for w in first:
                await store.upsert_analysis(w)
        second = [
            # newer: applied
            write(account, "77020000000", instance=instance, at=T0 + timedelta(hours=1),
                  message_id="m2", score=90, interest_level="hot"),
            # older: not applied
            write(account, "77020000001", instance=instance, at=T0 - timedelta(hours=1),
                  message_id="m0"),
            # a new contact
            write(account, "77020000009", instance=instance),
        ]  # fmt: skip
        if mode == "batch":
            got = await store.upsert_analyses(second)
        else:
            got = [await store.upsert_analysis(w) for w in second]
        results[mode] = [(r.applied, r.previous_interest, r.interest_level) for r in got]
        assert all(r.id is not None for r in got)
        found, _ = await _leads(store, account, instance)
        rows[mode] = found
    assert results["batch"] == results["single"]
    assert results["single"] == [
        (True, "warm", "hot"),
        (False, "warm", "warm"),
        (True, None, "warm"),
    ]
    assert rows["batch"] == rows["single"]


async def _leads(
    store: ResultsStore, account: uuid.UUID, instance: str
) -> tuple[list[dict[str, Any]], int]:
    from service.adapters.stores.base import LeadQuery

    leads, total = await store.query_leads(
        LeadQuery(user_account_id=account, instance_name=instance, include_messages=True)
    )
    picked = [
        {k: v for k, v in msgspec.to_builtins(lead).items() if k in _COMPARED} for lead in leads
    ]
    return sorted(picked, key=lambda r: r["contact_phone"]), total


async def test_a_bad_write_in_a_batch_fails_alone(results_dsn: str) -> None:
    pg = await PostgresStore.open(results_dsn, max_size=4)
    try:
        assert isinstance(pg, BulkStore)
        batcher = _WriteBatcher(pg)
        account = uuid.uuid4()
        writes = [
            write(account, "77030000001"),
            write(account, "77030000002", score=1000),  # breaks the score check
            write(account, "77030000003"),
        ]
        got = await asyncio.gather(*(batcher.upsert(w) for w in writes), return_exceptions=True)
        await batcher.close()
        assert isinstance(got[1], ValueError)
        assert not isinstance(got[0], BaseException) and got[0].applied
        assert not isinstance(got[2], BaseException) and got[2].applied
        conn = await asyncpg.connect(results_dsn)
        try:
            stored = await conn.fetch(
                "SELECT contact_phone FROM dialog_analysis WHERE user_account_id = $1 ORDER BY 1",
                account,
            )
        finally:
            await conn.close()
        assert [r["contact_phone"] for r in stored] == ["77030000001", "77030000003"]
    finally:
        await pg.close()


def test_concurrency_is_shared_by_the_workers() -> None:
    assert shares(32, 2) == [16, 16]
    assert shares(5, 2) == [3, 2]
    assert shares(2, 4) == [1, 1]  # never a worker without a slot
    assert sum(shares(33, 4)) == 33


async def test_concurrency_bounds_the_model_calls_in_flight(
    evolution_dsn: str, results_dsn: str, dialogs: list[dict[str, Any]]
) -> None:
    """Twice as many contacts are worked on as `--concurrency`, never more analyses."""
    await load_dialogs(evolution_dsn, "dev", dialogs)
    async with FakeOpenAI(latency=0.05) as fake:
        env = _env(evolution_dsn, results_dsn, fake.base_url)
        stats, _ = await backfill(
            env, "--instance", "dev", "--account", str(uuid.uuid4()), "--concurrency", "3"
        )
        assert stats["analyzed"] == fake.calls > 3
        assert fake.max_concurrency == 3


async def test_workers_store_what_one_process_stores(
    evolution_dsn: str, results_dsn: str, dialogs: list[dict[str, Any]]
) -> None:
    """The same dialogs under two instances: one backfilled in one process, the other by
    three worker processes; the stored leads are the same row for row."""
    await load_dialogs(evolution_dsn, "one", dialogs)
    await load_dialogs(evolution_dsn, "many", dialogs)
    accounts = {"one": uuid.uuid4(), "many": uuid.uuid4()}
    async with FakeOpenAI() as fake:
        env = _env(evolution_dsn, results_dsn, fake.base_url)
        one, _ = await backfill(env, "--instance", "one", "--account", str(accounts["one"]))
        calls = fake.calls
        many, err = await backfill(
            env,
            "--instance",
            "many",
            "--account",
            str(accounts["many"]),
            "--workers",
            "3",
            "--concurrency",
            "6",
        )
        assert fake.calls == 2 * calls
        assert "contacts" in err  # the progress line, from the summed counts
        assert many == one
        assert one["analyzed"] > 0 and one["new_leads"] > 0 and one["errors"] == 0
        # A rerun with workers: every contact unchanged, no analyzer call.
        again, _ = await backfill(
            env, "--instance", "many", "--account", str(accounts["many"]), "--workers", "2"
        )
        assert again["analyzed"] == again["new_leads"] == 0
        assert fake.calls == 2 * calls

    pg = await PostgresStore.open(results_dsn, max_size=2)
    try:
        rows_one, total_one = await _leads(pg, accounts["one"], "one")
        rows_many, total_many = await _leads(pg, accounts["many"], "many")
    finally:
        await pg.close()
    assert total_one == total_many == len(dialogs)
    assert rows_many == rows_one
