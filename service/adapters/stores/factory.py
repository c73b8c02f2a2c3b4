"""Choose and open the results store the settings describe."""

from __future__ import annotations

from typing import TYPE_CHECKING

from loguru import logger

from service.adapters.stores.base import ResultsStore, StoreAccessError, StoreUnavailableError
from service.config import Settings

if TYPE_CHECKING:
    from service.adapters.stores.supabase import SupabaseStore


async def open_store(settings: Settings, *, warm: bool = False) -> ResultsStore:
    """Supabase REST when SUPABASE_URL/SUPABASE_SERVICE_KEY are set, else direct Postgres.

    Raises StoreUnavailableError when the store cannot be reached, StoreAccessError when
    the Supabase key cannot do the store's work (checked at once: an anon key would
    otherwise pass for a working store that reads nothing). `warm` opens a connection per
    parallel analysis up front (see `warm_pool_size`).
    """
    if settings.uses_supabase():
        from service.adapters.stores.supabase import SupabaseStore

        assert settings.supabase_url and settings.supabase_service_key  # uses_supabase()
        store = await SupabaseStore.open(settings.supabase_url, settings.supabase_service_key)
        await _check_access(store)
        return store

    from service.adapters.stores.postgres import PostgresStore

    # Room for every parallel analysis plus REST requests and the readiness probe.
    pool_size = min(settings.analysis_concurrency + 4, 64)
    return await PostgresStore.open(
        settings.results_database_url,
        min_size=warm_pool_size(settings, pool_size) if warm else 1,
        max_size=pool_size,
    )


def warm_pool_size(settings: Settings, max_size: int) -> int:
    """Connections a consuming process opens at start: one per parallel analysis.

    Opened lazily, the first burst of a backlog opens them all at once, in every process
    at the same moment, and the drain starts late (bench scaleout: first rows after
    0.67 s instead of 0.34 s with 4 processes on two cores).
    """
    return min(settings.analysis_concurrency, max_size)


async def _check_access(store: SupabaseStore) -> None:
    try:
        await store.check_access()
    except StoreAccessError:
        await store.close()
        raise
    except StoreUnavailableError as exc:
        # Unreachable for now: start anyway (intake answers, /ready says what is down).
        logger.warning("results store not reachable at start: {}", exc)
