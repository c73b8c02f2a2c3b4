"""`backfill --workers N`: one backfill spread over N processes.

One process is bound by its own CPU (the `openai` client's request handling and the
database drivers, per dialog): past that, more concurrency only queues. Here the parent
selects the contacts once (one contacts aggregate, one `--max-dialogs` budget) and hands
them out in pages over one shared queue; each worker process runs `run_backfill` on what
it is given with its own pools and analyzer, with its share of `concurrency` (the model
sees the same number of parallel calls in total). Stats come back while the run goes and
are summed into the caller's `BackfillStats`.

Each contact goes to exactly one worker, and each worker analyses through the same
pipeline, so the rows stored are those of a one-process run. A worker that dies fails the
run (the contacts it held are not analysed: run the backfill again, finished ones are
skipped as unchanged); cancelling the parent stops the workers, keeping finished rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import queue
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from datetime import datetime
from multiprocessing.context import SpawnProcess
from typing import Any, Protocol

import msgspec

from service.config import Settings
from service.domain.dialog import ContactSummary, Dialog
from service.usecases.backfill import (
    BackfillOptions,
    BackfillStats,
    ContactLister,
    ProgressFn,
    _DialogBudget,
    contact_pages,
    note_unpaired,
)
from service.usecases.pipeline import Pipeline


class WorkerParts(Protocol):
    """What a worker process runs its share on (`bootstrap.builders.BackfillParts`)."""

    @property
    def pipeline(self) -> Pipeline: ...

    @property
    def reader(self) -> ContactLister: ...


# Opens a worker's parts from the settings: a module-level function (it is pickled by name
# into the worker processes), e.g. `service.bootstrap.builders.backfill_parts`.
PartsFactory = Callable[[Settings], AbstractAsyncContextManager[WorkerParts]]

# Contacts per page handed to a worker, and pages waiting per worker.
_PAGE = 64
_PAGES_PER_WORKER = 2
# How often a worker reports its counts (seconds).
_REPORT_EVERY = 0.25
_COUNTED = tuple(name for name in BackfillStats.__struct_fields__ if name != "total")

_pages = msgspec.json.Encoder()
_page_decoder = msgspec.json.Decoder(list[ContactSummary])


def shares(concurrency: int, workers: int) -> list[int]:
    """`concurrency` split over the workers (at least one each)."""
    workers = max(1, min(workers, concurrency))
    base, extra = divmod(concurrency, workers)
    return [base + (1 if i < extra else 0) for i in range(workers)]


async def run_backfill_workers(
    settings: Settings,
    reader: ContactLister,
    options: BackfillOptions,
    workers: int,
    open_parts: PartsFactory,
    progress: ProgressFn | None = None,
    expected_total: int | None = None,
    stats: BackfillStats | None = None,
) -> BackfillStats:
    """`run_backfill` over `workers` processes (see the module's doc); each opens its
    pipeline with `open_parts`."""
    stats = stats if stats is not None else BackfillStats.zero()
    ctx = multiprocessing.get_context("spawn")
    parts = shares(options.concurrency, workers)
    inbox: Any = ctx.Queue(maxsize=len(parts) * _PAGES_PER_WORKER)
    outbox: Any = ctx.Queue()
    child_options = [
        msgspec.structs.replace(options, concurrency=n, max_contacts=None, max_dialogs=None)
        for n in parts
    ]
    procs: list[SpawnProcess] = [
        ctx.Process(
            target=_worker_main,
            args=(open_parts, settings, msgspec.json.encode(opts), inbox, outbox, i),
            name=f"crm-backfill-{i}",
            daemon=True,
        )
        for i, opts in enumerate(child_options)
    ]
    for proc in procs:
        proc.start()
    latest: dict[int, BackfillStats] = {}
    done: set[int] = set()
    failures: list[str] = []

    def merge() -> None:
        for name in _COUNTED:
            if name != "unpaired_lid_chats":
                setattr(stats, name, sum(getattr(s, name) for s in latest.values()))

    async def produce() -> None:
        budget = _DialogBudget(options.max_dialogs)
        try:
            async for page in contact_pages(reader, options, budget, stats, _PAGE):
                await _put(inbox, _pages.encode(page), procs)
        finally:
            for _ in procs:
                with contextlib.suppress(Exception):
                    await _put(inbox, None, procs)

    async def collect() -> None:
        while len(done) < len(procs):
            try:
                kind, index, payload = await asyncio.to_thread(outbox.get, True, 0.5)
            except queue.Empty:
                for i, proc in enumerate(procs):
                    if i not in done and not proc.is_alive():
                        done.add(i)
                        failures.append(f"worker {i} exited with code {proc.exitcode}")
                continue
            if kind == "error":
                failures.append(f"worker {index}: {payload}")
                done.add(index)
                continue
            latest[index] = msgspec.json.decode(payload, type=BackfillStats)
            merge()
            if kind == "done":
                done.add(index)
            if progress is not None:
                progress(stats, expected_total)

    producer = asyncio.create_task(produce())
    collector = asyncio.create_task(collect())
    try:
        await asyncio.gather(producer, collector)
    except asyncio.CancelledError:
        producer.cancel()
        for proc in procs:
            if proc.is_alive() and proc.pid is not None:
                proc.terminate()  # SIGTERM: the worker cancels its run, rows done are kept
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(collector, timeout=30)
        raise
    finally:
        for proc in procs:
            await asyncio.to_thread(proc.join, 10)
            if proc.is_alive():
                proc.kill()
        inbox.close()
        outbox.close()
    if failures:
        raise RuntimeError("backfill workers failed: " + "; ".join(failures))
    return await note_unpaired(reader, options, stats)


async def _put(inbox: Any, item: bytes | None, procs: list[SpawnProcess]) -> None:
    """Put a page, waiting while the queue is full (and failing if every worker died)."""
    while True:
        try:
            inbox.put_nowait(item)
            return
        except queue.Full:
            if not any(proc.is_alive() for proc in procs):
                raise RuntimeError("no backfill worker is left") from None
            await asyncio.sleep(0.005)


class _Fed:
    """The contact lister a worker sees: the pages its parent hands out; dialogs are
    read from Evolution's database as usual."""

    def __init__(self, reader: ContactLister, inbox: Any) -> None:
        self._reader = reader
        self._inbox = inbox

    async def iter_contacts(
        self,
        instance: str,
        *,
        min_incoming: int,
        limit: int | None = None,
        since: datetime | None = None,
    ) -> AsyncIterator[ContactSummary]:
        while True:
            try:
                # A timeout, so that a cancelled worker's thread does not wait on forever.
                page = await asyncio.to_thread(self._inbox.get, True, 0.5)
            except queue.Empty:
                continue
            if page is None:
                return
            for summary in _page_decoder.decode(page):
                yield summary

    async def dialog(self, instance: str, phone: str, *, limit: int) -> Dialog | None:
        return await self._reader.dialog(instance, phone, limit=limit)

    async def unpaired_lid_chats(self, instance: str) -> int:
        return 0  # counted once, by the parent


def _worker_main(
    open_parts: PartsFactory,
    settings: Settings,
    options: bytes,
    inbox: Any,
    outbox: Any,
    index: int,
) -> None:
    """A worker process: its own pools, analyzer and event loop."""
    from service.logs import setup_logging

    setup_logging(settings)
    opts = msgspec.json.decode(options, type=BackfillOptions)
    try:
        stats = asyncio.run(_work(open_parts, settings, opts, inbox, outbox, index))
    except BaseException as exc:  # reported, then the process ends with an error
        outbox.put(("error", index, f"{type(exc).__name__}: {exc}"))
        raise SystemExit(1) from None
    outbox.put(("done", index, msgspec.json.encode(stats)))


async def _work(
    open_parts: PartsFactory,
    settings: Settings,
    options: BackfillOptions,
    inbox: Any,
    outbox: Any,
    index: int,
) -> BackfillStats:
    from service.usecases.backfill import run_backfill

    stats = BackfillStats.zero()
    last = 0.0

    def report(current: BackfillStats, _: int | None) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= _REPORT_EVERY:
            last = now
            outbox.put(("stats", index, msgspec.json.encode(current)))

    async with open_parts(settings) as parts:
        task = asyncio.create_task(
            run_backfill(parts.pipeline, _Fed(parts.reader, inbox), options, report, stats=stats)
        )
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        # Ctrl-C reaches the whole process group: the parent decides (it sends SIGTERM).
        loop.add_signal_handler(signal.SIGINT, lambda: None)
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return stats
