"""Bulk analysis of an instance's contacts through the one pipeline.

Contacts are selected in SQL and streamed; `concurrency` workers analyse them in parallel.
Per-contact failures are counted in `errors` and logged, never fatal. Cancellation (Ctrl-C)
stops the workers; rows finished so far are kept (each contact is stored on its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Annotated, Protocol

import msgspec
from loguru import logger
from msgspec import Meta

from service.adapters.analyzers.base import TokenUsage
from service.adapters.analyzers.prices import EST_COMPLETION_TOKENS, PRICES_AS_OF, cost_usd
from service.adapters.stores.base import StoredState
from service.domain.dialog import ContactSummary, Dialog
from service.logs import contact_hash
from service.usecases.pipeline import ContactOutcome, Pipeline, summary_is_current


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
    queue: asyncio.Queue[ContactSummary | None] = asyncio.Queue(maxsize=options.concurrency * 2)
    # Contacts over the threshold, counted as they are handed out (caps --max-dialogs).
    budget = _DialogBudget(options.max_dialogs)

    async def produce() -> None:
        try:
            async for summary in reader.iter_contacts(
                options.instance,
                min_incoming=0,
                limit=options.max_contacts,
                since=options.since,
            ):
                if summary.incoming_count >= options.min_incoming and not budget.take():
                    continue
                stats.total += 1
                await queue.put(summary)
        finally:
            for _ in range(options.concurrency):
                await queue.put(None)

    async def work() -> None:
        while (summary := await queue.get()) is not None:
            await _analyze_one(pipeline, options, summary, stats)
            if progress is not None:
                progress(stats, expected_total)

    producer = asyncio.create_task(produce())
    workers = [asyncio.create_task(work()) for _ in range(options.concurrency)]
    try:
        await asyncio.gather(producer, *workers)
    except asyncio.CancelledError:
        for task in (producer, *workers):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(producer, *workers, return_exceptions=True)
        raise
    stats.unpaired_lid_chats = await reader.unpaired_lid_chats(options.instance)
    if stats.unpaired_lid_chats:
        logger.warning(
            "LID-only chats without a known phone were not analysed: {} (they are once a "
            "message pairs the LID with a phone)",
            stats.unpaired_lid_chats,
            instance=options.instance,
        )
    return stats


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
