"""Per-analysis costs of a consume process: no reset round trip per statement, no log line
per model request, the stored state and the dialog read at once."""

from __future__ import annotations

import logging
import sys
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
from loguru import logger

from service.adapters.stores.postgres import PostgresStore
from service.bootstrap.builders import app_context
from service.config import load_settings
from service.logs import setup_logging


@pytest.fixture
async def one_connection(results_dsn: str) -> AsyncIterator[tuple[PostgresStore, Any]]:
    """The store on a pool of one connection: every acquire gets the same one back."""
    store = await PostgresStore.open(results_dsn, min_size=1, max_size=1)
    try:
        yield store, store._pool
    finally:
        await store.close()


@pytest.mark.parametrize(
    ("left", "check", "expected"),
    [
        # asyncpg's default release sends `... RESET ALL` (pool.py,
        # PoolConnectionHolder.release): this setting would not survive it.
        ("SET application_name = 'kept-session'", "SHOW application_name", "kept-session"),
        # An open transaction is still rolled back.
        ("BEGIN; CREATE TABLE left_open (x int)", "SELECT to_regclass('left_open')::text", None),
    ],
    ids=["no-reset-query", "rolled-back"],
)
async def test_a_released_store_connection(
    one_connection: tuple[PostgresStore, Any], left: str, check: str, expected: str | None
) -> None:
    store, pool = one_connection
    async with pool.acquire() as conn:
        await conn.execute(left)
    await store.ping()  # a store call acquires and releases it too
    async with pool.acquire() as conn:
        assert await conn.fetchval(check) == expected


def test_openai_http_client_logs_no_line_per_request(capsys: pytest.CaptureFixture[str]) -> None:
    # openai's client is httpx2, which logs every request at INFO on the stdlib logger
    # "httpx2" (httpx2/_client.py: `logger.info('HTTP Request: ...')`).
    setup_logging(load_settings({"LOG_LEVEL": "INFO", "LOG_FORMAT": "json"}, dotenv=None))
    try:
        logging.getLogger("httpx2").info('HTTP Request: POST http://x/v1 "HTTP/1.1 200 OK"')
        logging.getLogger("httpcore2.http11").info("send_request_headers.complete")
        logger.info("still logged")
        lines = capsys.readouterr().out.strip().splitlines()
        assert [msgspec.json.decode(line)["message"] for line in lines] == ["still logged"]
    finally:
        logger.remove()
        logger.add(sys.stderr, level="WARNING")


class _Timed:
    """Wraps a real adapter; records when each named read starts and ends."""

    def __init__(self, inner: Any, name: str, log: list[str]) -> None:
        self._inner, self._name, self._log = inner, name, log

    def __getattr__(self, attr: str) -> Any:
        method = getattr(self._inner, attr)
        if attr not in ("get_state", "deleted_ids", "dialog"):
            return method

        async def timed(*args: Any, **kwargs: Any) -> Any:
            self._log.append(f"{attr} start")
            try:
                return await method(*args, **kwargs)
            finally:
                self._log.append(f"{attr} end")

        return timed


async def test_an_event_reads_stored_state_and_dialog_at_once(
    service_settings: Any, account: Any
) -> None:
    from service.usecases.pipeline import Pipeline
    from tests.harness import INSTANCE

    log: list[str] = []
    async with app_context(service_settings) as ctx:
        assert ctx.reader is not None and ctx.store is not None and ctx.analyzer is not None
        pipeline = Pipeline(
            service_settings,
            _Timed(ctx.reader, "reader", log),
            _Timed(ctx.store, "store", log),
            ctx.analyzer,
            ctx.metrics,
        )
        outcome = await pipeline.analyze_contact(INSTANCE, "77010000001", account)
    assert outcome.outcome == "no_messages"
    # The stored state and the recorded deletes are read at once (neither waits for the
    # other); the dialog read needs the deletes, so it starts once they are known.
    assert log[:2] == ["get_state start", "deleted_ids start"], log
    assert log.index("dialog start") > log.index("deleted_ids end"), log
