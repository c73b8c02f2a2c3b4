"""The webhook rules of 0007 through both stores (direct Postgres, and Supabase's REST API
via the role-enforcing PostgREST test server): endpoints scoped to their account, event
filters, and one accepted delivery per webhook id whatever the senders do."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from service.adapters.stores.postgres import PostgresStore
from service.adapters.stores.supabase import SupabaseStore
from service.adapters.stores.webhooks import WebhookStore, webhook_store
from service.adapters.webhooks_out.signing import new_secret
from tests.fakes.postgrest_server import SERVICE_KEY, running_postgrest


@pytest.fixture(params=["postgres", "supabase"])
async def store(request: pytest.FixtureRequest, results_dsn: str) -> AsyncIterator[WebhookStore]:
    if request.param == "postgres":
        pg = await PostgresStore.open(results_dsn)
        try:
            yield webhook_store(pg)
        finally:
            await pg.close()
    else:
        async with running_postgrest(results_dsn) as server:
            sb = await SupabaseStore.open(server.url, SERVICE_KEY, backoff=0.01)
            try:
                yield webhook_store(sb)
            finally:
                await sb.close()


async def test_endpoints_are_scoped_and_filtered(store: WebhookStore, account: uuid.UUID) -> None:
    other = uuid.uuid4()
    every = await store.add_webhook_endpoint(account, "http://h/a", new_secret(), None)
    hot = await store.add_webhook_endpoint(account, "http://h/b", new_secret(), ["lead.hot"])
    await store.add_webhook_endpoint(other, "http://h/c", new_secret(), None)
    assert every.events is None and hot.events == ["lead.hot"] and hot.account == account
    assert [e.id for e in await store.webhook_endpoints_for(account, "lead.hot")] == [
        every.id,
        hot.id,
    ]
    assert [e.id for e in await store.webhook_endpoints_for(account, "lead.stage_changed")] == [
        every.id
    ]
    assert [e.id for e in await store.list_webhook_endpoints(account)] == [every.id, hot.id]
    assert len(await store.list_webhook_endpoints(None)) == 3
    assert await store.remove_webhook_endpoint(hot.id)
    assert not await store.remove_webhook_endpoint(hot.id)
    assert [e.id for e in await store.webhook_endpoints_for(account, "lead.hot")] == [every.id]


async def test_a_delivery_is_accepted_once(store: WebhookStore, account: uuid.UUID) -> None:
    endpoint = await store.add_webhook_endpoint(account, "http://h/a", new_secret(), None)
    first, second = uuid.uuid4(), uuid.uuid4()

    async def claim(token: uuid.UUID, lease: float = 30.0, who: uuid.UUID = account) -> str:
        result = await store.claim_webhook_delivery("msg_1", who, endpoint.id, token, lease)
        return result.state

    claimed = await store.claim_webhook_delivery("msg_1", account, endpoint.id, first, 30.0)
    assert claimed.state == "claimed" and claimed.endpoint == endpoint
    assert await claim(first) == "claimed"  # the same sender asking again (a lost answer)
    assert await claim(second) == "busy"  # another sender while the lease holds
    assert await claim(second, who=uuid.uuid4()) == "gone"  # another account sees nothing
    # A failed attempt ends the lease: the next sender may try.
    assert await store.finish_webhook_delivery("msg_1", account, first, False, 500)
    assert await claim(second) == "claimed"
    assert not await store.finish_webhook_delivery("msg_1", account, first, True, 200)
    assert await store.finish_webhook_delivery("msg_1", account, second, True, 200)
    assert await claim(first) == "done" and await claim(uuid.uuid4()) == "done"
    # Concurrent senders of a fresh delivery: exactly one gets it.
    states = await asyncio.gather(*(claim_fresh(store, account, endpoint.id) for _ in range(8)))
    assert sorted(states) == ["busy"] * 7 + ["claimed"]
    # An expired lease is free again; a removed endpoint's deliveries are gone.
    assert await claim_fresh(store, account, endpoint.id, "msg_3", lease=0.01) == "claimed"
    await asyncio.sleep(0.05)
    assert await claim_fresh(store, account, endpoint.id, "msg_3") == "claimed"
    assert await store.remove_webhook_endpoint(endpoint.id)
    assert await claim_fresh(store, account, endpoint.id, "msg_3") == "gone"


async def claim_fresh(
    store: WebhookStore,
    account: uuid.UUID,
    endpoint: uuid.UUID,
    webhook_id: str = "msg_2",
    lease: float = 30.0,
) -> str:
    result = await store.claim_webhook_delivery(webhook_id, account, endpoint, uuid.uuid4(), lease)
    return result.state
