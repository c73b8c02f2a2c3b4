"""What an asyncpg pool does when a connection is handed back."""

from __future__ import annotations

from typing import Any


async def keep_session(connection: Any) -> None:
    """Release without the session reset query.

    asyncpg's default reset sends `SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *;
    RESET ALL` on every release: one more round trip per statement. These pools never set
    session state (only `SET LOCAL`, which ends with its transaction) and take no advisory
    locks, cursors or LISTENs; asyncpg still rolls back an open transaction and drops
    listeners before calling this (pool.py, `PoolConnectionHolder.release`).
    """
