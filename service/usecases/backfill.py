"""Bulk analysis of an instance's contacts through the one pipeline.

Contacts are selected in SQL and streamed; `concurrency` workers analyse them in parallel.
Per-contact failures are counted in `errors` and logged, never fatal. Cancellation (Ctrl-C)
stops the workers; rows finished so far are kept (each contact's write is its own result).

The contacts come in pages: the stored states and recorded deletes of a page are read in
one query each (not two round trips per contact), and the workers' writes go to the store
together, as many as are waiting while the previous batch is stored (a batch that fails is
written again one by one, so each contact gets its own result or error as before).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime
from typing import Annotated, Protocol, runtime_checkable

import msgspec
from loguru import logger
from msgspec import Meta

from service.adapters.analyzers.base import AnalysisResult, Analyzer, TokenUsage
from service.adapters.analyzers.prices import EST_COMPLETION_TOKENS, PRICES_AS_OF, cost_usd
from service.adapters.stores.base import AnalysisWrite, StoredState, UpsertResult
from service.domain.dialog import ContactSummary, Dialog, jid_of
from service.domain.lead import LeadRow
from service.logs import contact_hash
from service.usecases.pipeline import (
    ContactOutcome,
    Pipeline,
    PipelineStore,
    summary_is_current,
)


class AnalyzeStats(msgspec.Struct, kw_only=True):
    """The counts of a bulk analysis: `POST /dialogs/analyze`'s `stats`."""

    total: Annotated[int, Meta(description="Contacts considered")]
    analyzed: Annotated[int, Meta(description="Contacts analysed now")]
    new_leads: Annotated[int, Meta(description="Stored as new_lead (under minIncoming)")]
    hot: int
    warm: int
    cold: int
    errors: Annotated[int, Meta(description="Contacts whose analysis failed")]


class BackfillStats(AnalyzeStats, kw_only=True):
    """The counts plus what only the backfill's JSON shows."""

    skipped: int = 0  # unchanged since the stored analysis
    # LID-only chats no stored message pairs with a phone: not analysed until a pair
    # appears (a message with both, or a later event)
    unpaired_lid_chats: int = 0

    @classmethod
    def zero(cls) -> BackfillStats:
        return cls(**dict.fromkeys(_COUNTS, 0))

    def counts(self) -> AnalyzeStats:
        return AnalyzeStats(**{name: getattr(self, name) for name in _COUNTS})


_COUNTS = AnalyzeStats.__struct_fields__


class DryRunEstimate(msgspec.Struct, kw_only=True):
    would_analyze: int = 0
    would_store_new_leads: int = 0
    unchanged: int = 0
    estimated_prompt_tokens: int = 0
    estimated_completion_tokens: int = 0
    estimated_cost_usd: float | None = None
    model: str | None = None
    prices_as_of: str | None = None  # date of the price table the cost is from


class ContactLister(Protocol):
    def iter_contacts(
        self,
        instance: str,
        *,
        min_incoming: int,
        limit: int | None = None,
        since: datetime | None = None,
    ) -> AsyncIterator[ContactSummary]: ...

    async def dialog(self, instance: str, phone: str, *, limit: int) -> Dialog | None: ...

    async def unpaired_lid_chats(self, instance: str) -> int: ...


class StateReader(Protocol):
    async def get_state(
        self, account: uuid.UUID, instance: str, phone: str
    ) -> StoredState | None: ...


@runtime_checkable
class BulkStore(PipelineStore, Protocol):
    """A store with the bulk reads and writes (every ResultsStore)."""

    async def get_states(
        self, account: uuid.UUID, instance: str, phones: Sequence[str]
    ) -> dict[str, StoredState]: ...

    async def deleted_ids_of(
        self, account: uuid.UUID, instance: str, remote_jids: Sequence[str]
    ) -> dict[str, set[str]]: ...

    async def upsert_analyses(self, writes: Sequence[AnalysisWrite]) -> list[UpsertResult]: ...


class BackfillOptions(msgspec.Struct, kw_only=True):
    instance: str
    account: uuid.UUID
    min_incoming: int
    max_contacts: int | None = None
    max_dialogs: int | None = None
    concurrency: int = 8
    since: datetime | None = None
    force: bool = False
    # False: the history is recorded but no lead events are raised (a history replay).
    notify: bool = True


ProgressFn = Callable[[BackfillStats, int | None], None]


async def note_unpaired(
    reader: ContactLister, options: BackfillOptions, stats: BackfillStats
) -> BackfillStats:
    """Count (and warn of) the LID-only chats a backfill could not analyse."""
    stats.unpaired_lid_chats = await reader.unpaired_lid_chats(options.instance)
    if stats.unpaired_lid_chats:
        logger.warning(
            "LID-only chats without a known phone were not analysed: {} (they are once a "
            "message pairs the LID with a phone)",
            stats.unpaired_lid_chats,
            instance=options.instance,
        )
    return stats


async def contact_pages(
    reader: ContactLister,
    options: BackfillOptions,
    budget: _DialogBudget,
    stats: BackfillStats,
    page_size: int,
) -> AsyncIterator[list[ContactSummary]]:
    """The contacts a backfill handles, in pages of `page_size`: those over the threshold
    while `budget` lasts (--max-dialogs), and every one under it (its new_lead row);
    each counted in `stats.total` as it is handed out."""
    page: list[ContactSummary] = []
    async for summary in reader.iter_contacts(
        options.instance, min_incoming=0, limit=options.max_contacts, since=options.since
    ):
        if summary.incoming_count >= options.min_incoming and not budget.take():
            continue
        stats.total += 1
        page.append(summary)
        if len(page) >= page_size:
            yield page
            page = []
    if page:
        yield page


async def run_backfill(
    pipeline: Pipeline,
    reader: ContactLister,
    options: BackfillOptions,
    progress: ProgressFn | None = None,
    expected_total: int | None = None,
    stats: BackfillStats | None = None,
) -> BackfillStats:
    """Analyse the instance's contacts. `stats` is filled as it goes, so a caller that
    cancels still has the counts of what finished."""
    stats = stats if stats is not None else BackfillStats.zero()
    # `concurrency` is the number of analyses (model calls) in flight. Twice as many
    # contacts are worked on: while the analyzer's slots are busy the others read their
    # dialogs, store their results, or need no analyzer at all (new_lead rows, unchanged
    # contacts), so no slot waits on the databases.
    workers_count = options.concurrency * 2
    queue: asyncio.Queue[ContactSummary | None] = asyncio.Queue(maxsize=workers_count * 2)
    # Contacts over the threshold, counted as they are handed out (caps --max-dialogs).
    budget = _DialogBudget(options.max_dialogs)
    store = pipeline.store
    paged = PagedStore(store) if isinstance(store, BulkStore) else None
    pipeline = pipeline.with_parts(
        store=paged, analyzer=GatedAnalyzer(pipeline.analyzer, options.concurrency)
    )
    page_size = max(options.concurrency, _MIN_PAGE)

    async def hand_out(page: list[ContactSummary]) -> None:
        if paged is not None:
            await paged.prime(options.account, options.instance, [s.contact.phone for s in page])
        for summary in page:
            await queue.put(summary)
        page.clear()

    async def produce() -> None:
        try:
            async for page in contact_pages(reader, options, budget, stats, page_size):
                await hand_out(page)
        finally:
            for _ in range(workers_count):
                await queue.put(None)

    async def work() -> None:
        while (summary := await queue.get()) is not None:
            try:
                await _analyze_one(pipeline, options, summary, stats)
            finally:
                if paged is not None:
                    paged.forget(options.account, options.instance, summary.contact.phone)
            if progress is not None:
                progress(stats, expected_total)

    producer = asyncio.create_task(produce())
    workers = [asyncio.create_task(work()) for _ in range(workers_count)]
    try:
        await asyncio.gather(producer, *workers)
    except asyncio.CancelledError:
        for task in (producer, *workers):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(producer, *workers, return_exceptions=True)
        raise
    finally:
        if paged is not None:
            await paged.close()
    return await note_unpaired(reader, options, stats)


# Contacts whose stored states are read together (at least; a page is never smaller than
# the concurrency, so every worker has a primed contact waiting).
_MIN_PAGE = 64
# Writes sent in one statement at most, and statements in flight at once.
_MAX_BATCH = 64
_FLUSHERS = 2


class GatedAnalyzer:
    """The analyzer with at most `slots` analyses in flight (a FIFO wait for a slot)."""

    def __init__(self, analyzer: Analyzer, slots: int) -> None:
        self._analyzer = analyzer
        self._slots = asyncio.Semaphore(slots)
        self.name = analyzer.name

    async def analyze(self, dialog: Dialog) -> AnalysisResult:
        async with self._slots:
            return await self._analyzer.analyze(dialog)

    async def close(self) -> None:
        """The analyzer is its owner's to close."""


class PagedStore:
    """The results store as one backfill sees it: states and recorded deletes read per
    page (`prime`), each handed out once; analyses written in batches. Everything else
    goes to the store as it is."""

    def __init__(self, store: BulkStore) -> None:
        self._store = store
        self._states: dict[tuple[uuid.UUID, str, str], StoredState | None] = {}
        self._deleted: dict[tuple[uuid.UUID, str, str], set[str]] = {}
        self._writes = _WriteBatcher(store)

    async def prime(self, account: uuid.UUID, instance: str, phones: Sequence[str]) -> None:
        if not phones:
            return
        jids = [jid_of(phone) for phone in phones]
        states, deleted = await asyncio.gather(
            self._store.get_states(account, instance, phones),
            self._store.deleted_ids_of(account, instance, jids),
        )
        for phone in phones:
            self._states[(account, instance, phone)] = states.get(phone)
        for jid in jids:
            self._deleted[(account, instance, jid)] = deleted.get(jid, set())

    def forget(self, account: uuid.UUID, instance: str, phone: str) -> None:
        """The contact is done: what was read for it is dropped (memory stays flat)."""
        self._states.pop((account, instance, phone), None)
        self._deleted.pop((account, instance, jid_of(phone)), None)

    async def close(self) -> None:
        await self._writes.close()

    async def get_state(self, account: uuid.UUID, instance: str, phone: str) -> StoredState | None:
        key = (account, instance, phone)
        if key in self._states:
            return self._states.pop(key)
        return await self._store.get_state(account, instance, phone)

    async def deleted_ids(self, account: uuid.UUID, instance: str, remote_jid: str) -> set[str]:
        key = (account, instance, remote_jid)
        if key in self._deleted:
            return self._deleted.pop(key)
        return await self._store.deleted_ids(account, instance, remote_jid)

    async def upsert_analysis(self, write: AnalysisWrite) -> UpsertResult:
        return await self._writes.upsert(write)

    async def forget_dialog_time(self, account: uuid.UUID, instance: str, phone: str) -> bool:
        return await self._store.forget_dialog_time(account, instance, phone)

    async def record_deletes(
        self, account: uuid.UUID, instance: str, remote_jid: str, message_ids: Sequence[str]
    ) -> int:
        return await self._store.record_deletes(account, instance, remote_jid, message_ids)

    async def get_lead(
        self, account: uuid.UUID, lead_id: uuid.UUID, *, include_messages: bool = False
    ) -> LeadRow | None:
        return await self._store.get_lead(account, lead_id, include_messages=include_messages)


class _WriteBatcher:
    """Group commit: a write waits only for the batch in flight; all writes that arrive
    meanwhile go out together in the next statement."""

    def __init__(self, store: BulkStore) -> None:
        self._store = store
        self._pending: list[tuple[AnalysisWrite, asyncio.Future[UpsertResult]]] = []
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def upsert(self, write: AnalysisWrite) -> UpsertResult:
        future: asyncio.Future[UpsertResult] = asyncio.get_running_loop().create_future()
        self._pending.append((write, future))
        if not self._tasks:
            self._tasks = [asyncio.create_task(self._flush_loop()) for _ in range(_FLUSHERS)]
        self._wake.set()
        return await future

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for _, future in self._pending:
            future.cancel()
        self._pending = []

    async def _flush_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch = self._pending[:_MAX_BATCH]
                del self._pending[:_MAX_BATCH]
                await self._flush(batch)

    async def _flush(self, batch: list[tuple[AnalysisWrite, asyncio.Future[UpsertResult]]]) -> None:
        try:
            if len(batch) == 1:
                results = [await self._store.upsert_analysis(batch[0][0])]
            else:
                results = await self._store.upsert_analyses([write for write, _ in batch])
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except Exception as exc:
            if len(batch) == 1:
                _settle(batch[0][1], exc)
                return
            # Nothing of the batch is stored: each write again on its own, so one bad
            # contact fails alone.
            for i, (write, future) in enumerate(batch):
                try:
                    result = await self._store.upsert_analysis(write)
                except asyncio.CancelledError:
                    for _, left in batch[i:]:
                        left.cancel()
                    raise
                except Exception as one:
                    _settle(future, one)
                else:
                    _settle(future, result)
            return
        for (_, future), result in zip(batch, results, strict=True):
            _settle(future, result)


def _settle(future: asyncio.Future[UpsertResult], outcome: UpsertResult | Exception) -> None:
    if future.done():  # its worker was cancelled
        return
    if isinstance(outcome, Exception):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


class _DialogBudget:
    def __init__(self, limit: int | None) -> None:
        self._left = limit

    def take(self) -> bool:
        if self._left is None:
            return True
        if self._left <= 0:
            return False
        self._left -= 1
        return True


async def _analyze_one(
    pipeline: Pipeline, options: BackfillOptions, summary: ContactSummary, stats: BackfillStats
) -> None:
    phone = summary.contact.phone
    try:
        outcome = await pipeline.analyze_contact(
            options.instance,
            phone,
            options.account,
            summary=summary,
            contact_name=summary.contact.name,
            min_incoming=options.min_incoming,
            force=options.force,
            notify=options.notify,
        )
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        stats.errors += 1
        logger.warning(
            "contact analysis failed: {}: {}",
            type(exc).__name__,
            exc,
            instance=options.instance,
            contact_hash=contact_hash(phone),
        )
        return
    count(stats, outcome)


def count(stats: BackfillStats, outcome: ContactOutcome) -> None:
    if outcome.outcome == "analyzed":
        stats.analyzed += 1
        if outcome.interest_level == "hot":
            stats.hot += 1
        elif outcome.interest_level == "warm":
            stats.warm += 1
        else:
            stats.cold += 1
    elif outcome.outcome == "new_lead":
        stats.new_leads += 1
    else:
        stats.skipped += 1


async def dry_run(
    reader: ContactLister,
    options: BackfillOptions,
    estimate_tokens: Callable[[Dialog], int],
    states: StateReader | None,
    max_dialog_messages: int,
    model: str | None,
    emit: Callable[[str], None],
) -> DryRunEstimate:
    """List what a backfill would analyse, with a token and cost estimate; no analyzer."""
    est = DryRunEstimate(model=model)
    budget = _DialogBudget(options.max_dialogs)
    async for summary in reader.iter_contacts(
        options.instance, min_incoming=0, limit=options.max_contacts, since=options.since
    ):
        if summary.incoming_count < options.min_incoming:
            est.would_store_new_leads += 1
            continue
        if not budget.take():
            continue
        if (
            not options.force
            and states is not None
            and summary_is_current(
                await states.get_state(options.account, options.instance, summary.contact.phone),
                summary,
                options.min_incoming,
            )
        ):
            est.unchanged += 1
            continue
        dialog = await reader.dialog(
            options.instance, summary.contact.phone, limit=max_dialog_messages
        )
        tokens = estimate_tokens(dialog) if dialog is not None else 0
        est.would_analyze += 1
        est.estimated_prompt_tokens += tokens
        est.estimated_completion_tokens += EST_COMPLETION_TOKENS
        emit(
            f"would analyze {summary.contact.phone} "
            f"(incoming {summary.incoming_count}, ~{tokens} prompt tokens)"
        )
    cost = cost_usd(
        model,
        TokenUsage(
            prompt_tokens=est.estimated_prompt_tokens,
            completion_tokens=est.estimated_completion_tokens,
        ),
    )
    if cost is not None:
        est.estimated_cost_usd = round(cost, 4)
        est.prices_as_of = PRICES_AS_OF
    return est
