"""Choose and open the results store the settings describe."""

from __future__ import annotations

from service.config import Settings
from service.stores.base import ResultsStore


async def open_store(settings: Settings) -> ResultsStore:
    """Supabase REST when SUPABASE_URL/SUPABASE_SERVICE_KEY are set, else direct Postgres.

    Raises StoreUnavailableError when the store cannot be reached.
    """
    if settings.uses_supabase():
        from service.stores.supabase import SupabaseStore

        assert settings.supabase_url and settings.supabase_service_key  # uses_supabase()
        return await SupabaseStore.open(settings.supabase_url, settings.supabase_service_key)

    from service.stores.postgres import PostgresStore

    # Room for every parallel analysis plus REST requests and the readiness probe.
    pool_size = min(settings.analysis_concurrency + 4, 64)
    return await PostgresStore.open(settings.results_database_url, max_size=pool_size)
