"""A results store that is down gives 503 JSON answers (list, export, stats, /ready), never a
500, and the API recovers by itself once the store answers again.

The Supabase store over the fake PostgREST server lets the test switch the store "down"
(gateway 503s) without stopping the machine's PostgreSQL.
"""

from __future__ import annotations

import uuid

from service.adapters.stores.supabase import SupabaseStore
from tests.fakes.postgrest_server import running_postgrest
from tests.parts import parts_around
from tests.rest_support import (
    INSTANCE,
    SERVICE_KEY,
    Api,
    insert_leads,
    lead_values,
    rest_settings,
    serve,
)


async def test_store_outage_is_503_and_passes(results_dsn: str, account: uuid.UUID) -> None:
    async with running_postgrest(results_dsn) as server:
        store = await SupabaseStore.open(server.url, SERVICE_KEY, attempts=2, backoff=0.01)
        try:
            await store.add_instance(INSTANCE, account)
            await insert_leads(results_dsn, [lead_values(account, 1)])
            async with (
                parts_around(rest_settings(results_dsn), store) as ctx,
                serve(ctx) as client,
            ):
                api = Api(client=client, ctx=ctx, results_dsn=results_dsn, account=account)
                checks = [
                    ("GET", "/dialogs/analysis", {"userAccountId": str(account)}),
                    ("GET", "/dialogs/stats", {"userAccountId": str(account)}),
                    ("GET", "/dialogs/export-csv", {"userAccountId": str(account)}),
                ]
                for method, path, params in checks:
                    server.fail_next(2, status=503)  # both attempts of the store fail
                    status, body = await api.call(method, path, params=params)
                    assert status == 503, (path, body)
                    assert body == {
                        "success": False,
                        "error": "results database unavailable, retry later",
                    }
                # The readiness check sends six requests (the key's access check), each tried
                # twice by this store.
                server.fail_next(12, status=503)
                status, body = await api.call("GET", "/ready")
                assert status == 503
                assert body["checks"]["results_db"].startswith("down")

                # The outage is over: the same requests succeed.
                for method, path, params in checks:
                    status, _ = await api.call(method, path, params=params)
                    assert status == 200, path
        finally:
            await store.close()
