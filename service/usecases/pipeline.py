"""The one analysis pipeline: dialog → facts → score → upsert.

The consumer, the backfill command and `POST /dialogs/analyze` all call
`Pipeline.analyze_contact`; nothing else analyses. Each write carries its cause (which
analyzer and model, or the deletes that caused it); the store's write rules record the
lead's history and decide its events (`lead.hot`, `lead.stage_changed`) in the same
transaction, so no path needs to publish anything itself.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from datetime import datetime
from typing import Any, Literal, Protocol

import msgspec
from loguru import logger

from service.adapters.analyzers.base import (
    AnalysisResult,
    Analyzer,
    AnalyzerUnavailableError,
    TokenUsage,
)
from service.adapters.stores.base import AnalysisWrite, StoredState, UpsertResult
from service.config import Settings
from service.domain.dialog import (
    Contact,
    ContactSummary,
    Dialog,
    DialogMessage,
    apply_changes,
    jid_of,
    merge_messages,
)
from service.domain.evidence import FactEvidence, confined
from service.domain.facts import LeadFacts, empty_facts
from service.domain.history import Cause, CauseKind
from service.domain.lead import LeadRow, fact_columns
from service.domain.scoring import Score, interest_for, score
from service.domain.text_bounds import bounded_dialog
from service.logs import contact_hash
from service.metrics import Metrics

Outcome = Literal["analyzed", "new_lead", "unchanged", "stale", "no_messages"]

# Fact columns a person can override by hand (see stores.base.MANUAL_COLUMNS).
_FACT_FIELDS = frozenset(f.name for f in msgspec.structs.fields(LeadFacts))


class DialogSource(Protocol):
    async def dialog(
        self, instance: str, phone: str, *, limit: int, excluded: AbstractSet[str] = ...
    ) -> Dialog | None: ...

    async def contact_of_message(self, instance: str, message_id: str) -> str | None: ...


class PipelineStore(Protocol):
    """The results store calls the pipeline makes (every ResultsStore has them; a
    backfill puts its page cache and write batches in front of them)."""

    async def get_state(
        self, account: uuid.UUID, instance: str, phone: str
    ) -> StoredState | None: ...

    async def deleted_ids(self, account: uuid.UUID, instance: str, remote_jid: str) -> set[str]: ...

    async def upsert_analysis(self, write: AnalysisWrite) -> UpsertResult: ...

    async def forget_dialog_time(self, account: uuid.UUID, instance: str, phone: str) -> bool: ...

    async def record_deletes(
        self, account: uuid.UUID, instance: str, remote_jid: str, message_ids: Sequence[str]
    ) -> int: ...

    async def get_lead(
        self, account: uuid.UUID, lead_id: uuid.UUID, *, include_messages: bool = False
    ) -> LeadRow | None: ...


class ContactOutcome(msgspec.Struct, kw_only=True):
    outcome: Outcome
    instance: str
    phone: str
    score: int | None = None
    interest_level: str | None = None
    analyzer: str | None = None
    became_hot: bool = False
    lead_id: uuid.UUID | None = None


class Pipeline:
    def __init__(
        self,
        settings: Settings,
        reader: DialogSource,
        store: PipelineStore,
        analyzer: Analyzer,
        metrics: Metrics,
    ) -> None:
        self._settings = settings
        self._reader = reader
        self._store = store
        self._analyzer = analyzer
        self._metrics = metrics

    @property
    def store(self) -> PipelineStore:
        return self._store

    @property
    def analyzer(self) -> Analyzer:
        return self._analyzer

    def with_parts(
        self, *, store: PipelineStore | None = None, analyzer: Analyzer | None = None
    ) -> Pipeline:
        """The same pipeline through another store or analyzer front (the backfill's page
        cache and write batches, its limit on analyses in flight); None keeps the part."""
        return Pipeline(
            self._settings,
            self._reader,
            self._store if store is None else store,
            self._analyzer if analyzer is None else analyzer,
            self._metrics,
        )

    @property
    def analyzer_name(self) -> str:
        return self._analyzer.name

    async def analyze_contact(
        self,
        instance: str,
        phone: str,
        account: uuid.UUID,
        *,
        extra_messages: Sequence[DialogMessage] = (),
        contact_name: str | None = None,
        summary: ContactSummary | None = None,
        min_incoming: int | None = None,
        force: bool = False,
        edits: Mapping[str, str] | None = None,
        deleted: AbstractSet[str] = frozenset(),
        notify: bool = True,
    ) -> ContactOutcome:
        """Bring one contact's stored lead up to date with its dialog.

        `extra_messages` are messages carried by events (merged: the DB may lag the
        webhook). `edits` (message id -> new text) and `deleted` (message ids) come from
        edit/delete events: the dialog is analysed again as WhatsApp now shows it.
        `summary`, from the reader's contact aggregate, lets an unchanged contact be
        skipped without reading its dialog. `notify=False` records the history but raises
        no events (`backfill --no-notify`).
        """
        # A run that carries deletes is caused by them (the history says so).
        kind: CauseKind = "delete" if deleted else "analysis"
        edits = edits or {}
        asked = force
        force = force or bool(edits or deleted)
        started = time.perf_counter()
        threshold = self._settings.min_incoming if min_incoming is None else min_incoming
        limit = self._settings.max_dialog_messages
        jid = jid_of(phone)
        if summary is None:
            # The state is needed whatever the dialog holds: both lookups in one wait.
            state, known_deleted = await asyncio.gather(
                self._store.get_state(account, instance, phone),
                self._store.deleted_ids(account, instance, jid),
            )
        else:
            state = await self._store.get_state(account, instance, phone)
            if not force and not extra_messages and summary_is_current(state, summary, threshold):
                return self._done("unchanged", instance, phone, state=state)
            known_deleted = await self._store.deleted_ids(account, instance, jid)
        dialog = await self._reader.dialog(instance, phone, limit=limit, excluded=known_deleted)
        # Where Evolution's DB has the dialog it is the truth (see `lag_only`): its rows
        # hold the edits, and a delete counts only for a message it holds.
        extra = lag_only(dialog, extra_messages)
        # A delete may also be one the DB already shows (row removed or marked): the
        # dialog changed all the same, so the lead keeps its last activity time.
        changed = bool(edits or deleted)
        if dialog is not None and dialog.messages:
            # The edited rows are already read; an edit of a message the DB does not hold
            # changes nothing (and costs no analysis).
            held = {m.id for m in dialog.messages}
            changed = bool(deleted) or not held.isdisjoint(edits)
            force = asked or changed
            edits = {}
        deleted = await self._confirmed_deletes(account, instance, jid, dialog, deleted)
        if dialog is None or not dialog.messages:
            deleted |= known_deleted  # the events' dialog may hold one deleted before
        if dialog is None and state is not None and (extra or changed):
            # No rows in Evolution's database (DATABASE_SAVE_DATA_NEW_MESSAGE off): the
            # stored lead holds the dialog so far, so a new event adds to it instead of
            # starting the counts and first message over.
            dialog = await self._stored_dialog(account, state, instance, phone)
        if extra:
            base = dialog or _empty_dialog(instance, phone, contact_name)
            dialog = merge_messages(base, extra, self._settings.max_dialog_messages)
        if dialog is not None and changed:
            dialog = apply_changes(dialog, edits, deleted)
            dialog = _keep_last_activity(dialog, state)
        if dialog is None or not dialog.messages:
            return self._done("no_messages", instance, phone)

        enough = dialog.incoming_count >= threshold
        if not force and state is not None and is_current(state, dialog.last_message_id, enough):
            return self._done("unchanged", instance, phone, state=state)

        if force and state is not None:
            # A rebuild from the dialog: a stored time from the future must not win.
            await self._store.forget_dialog_time(account, instance, phone)
        if not enough:
            write = _new_lead_write(dialog, account, Cause(kind=kind), notify)
            result = await self._store.upsert_analysis(write)
            outcome: Outcome = "new_lead" if result.applied else "stale"
            return self._done(outcome, instance, phone, score=write.score, lead_id=result.id)

        return await self._analyze_and_store(
            dialog, state, account, instance, phone, kind, notify, started
        )

    async def _analyze_and_store(
        self,
        dialog: Dialog,
        state: StoredState | None,
        account: uuid.UUID,
        instance: str,
        phone: str,
        kind: CauseKind,
        notify: bool,
        started: float,
    ) -> ContactOutcome:
        """Analyse a dialog over the threshold, score it and store the lead."""
        bounded = bounded_dialog(
            dialog,
            message_chars=self._settings.max_message_chars,
            dialog_chars=self._settings.analysis_max_chars,
        )
        try:
            analysis = await self._analyzer.analyze(bounded)
        except AnalyzerUnavailableError as exc:
            # Tokens spent on a failed analysis are billed all the same.
            self._count_tokens(exc.usage)
            raise
        facts = _apply_manual(analysis.facts, state)
        # Evidence must point into the dialog the analyzer was given; whatever does not
        # is left out and counted with what the analyzer itself could not trust.
        evidence, outside = confined(analysis.evidence, bounded)
        self._count_dropped(analysis.analyzer, analysis.evidence_dropped + outside)
        lead_score = _final_score(facts, state, evidence)
        cause = Cause(kind=kind, analyzer=analysis.analyzer, model=analysis.model)
        write = _analysis_write(dialog, account, facts, lead_score, analysis, cause, notify)
        result = await self._store.upsert_analysis(write)
        self._record(analysis, lead_score, started)
        if not result.applied and result.id is None:
            logger.warning(
                "the stored lead belongs to another account than the instance's; this "
                "analysis dropped (`crm-backend instances move` moves an instance's leads)",
                instance=instance,
                contact_hash=contact_hash(phone),
            )
            return self._done("stale", instance, phone, analyzer=analysis.analyzer)
        if not result.applied:
            logger.info(
                "newer analysis already stored; this one dropped",
                instance=instance,
                contact_hash=contact_hash(phone),
            )
            return self._done("stale", instance, phone, analyzer=analysis.analyzer)

        became_hot = result.interest_level == "hot" and result.previous_interest != "hot"
        return self._done(
            "analyzed",
            instance,
            phone,
            score=lead_score.total,
            interest=lead_score.interest_level,
            analyzer=analysis.analyzer,
            became_hot=became_hot,
            lead_id=result.id,
        )

    async def _confirmed_deletes(
        self,
        account: uuid.UUID,
        instance: str,
        jid: str,
        dialog: Dialog | None,
        deleted: AbstractSet[str],
    ) -> set[str]:
        """The event deletes to believe, recorded for every later read of the dialog.

        A delete event is a claim: where Evolution's DB has this contact's dialog it
        counts only for a message the DB holds in this contact's chat (a forged one can
        hide a real message only by its WhatsApp id); where the DB has no rows for the
        chat (DATABASE_SAVE_DATA_NEW_MESSAGE off) the events are all there is.
        """
        if not deleted:
            return set()
        if dialog is None or not dialog.messages:
            confirmed = set(deleted)
        else:
            confirmed = {
                message_id
                for message_id in sorted(deleted)
                if await self._reader.contact_of_message(instance, message_id) == jid
            }
        if confirmed:
            await self._store.record_deletes(account, instance, jid, sorted(confirmed))
        return confirmed

    async def _stored_dialog(
        self, account: uuid.UUID, state: StoredState, instance: str, phone: str
    ) -> Dialog | None:
        lead = await self._store.get_lead(account, state.id, include_messages=True)
        return None if lead is None else _lead_dialog(lead, instance, phone)

    def _record(self, analysis: AnalysisResult, lead_score: Score, started: float) -> None:
        m = self._metrics
        m.analysis_seconds.observe(time.perf_counter() - started)
        m.lead_score.observe(lead_score.total)
        m.leads_by_interest.labels(lead_score.interest_level).inc()
        self._count_tokens(analysis.usage)

    def _count_dropped(self, analyzer: str, dropped: int) -> None:
        if dropped:
            self._metrics.evidence_dropped.labels(analyzer).inc(dropped)

    def _count_tokens(self, usage: TokenUsage | None) -> None:
        if usage is not None:
            m = self._metrics
            m.llm_tokens.labels("prompt").inc(usage.prompt_tokens)
            m.llm_tokens.labels("cached").inc(usage.cached_tokens)
            m.llm_tokens.labels("completion").inc(usage.completion_tokens)

    def _done(
        self,
        outcome: Outcome,
        instance: str,
        phone: str,
        *,
        state: StoredState | None = None,
        score: int | None = None,
        interest: str | None = None,
        analyzer: str | None = None,
        became_hot: bool = False,
        lead_id: uuid.UUID | None = None,
    ) -> ContactOutcome:
        label = analyzer or (self._analyzer.name if outcome == "analyzed" else "none")
        self._metrics.analyses.labels(outcome, label).inc()
        logger.debug("contact {}: {}", phone, outcome, instance=instance)
        if state is not None:
            interest = interest or state.interest_level
            lead_id = lead_id or state.id
        return ContactOutcome(
            outcome=outcome,
            instance=instance,
            phone=phone,
            score=score,
            interest_level=interest if interest is not None else _interest(score),
            analyzer=analyzer,
            became_hot=became_hot,
            lead_id=lead_id,
        )


def _interest(total: int | None) -> str | None:
    return None if total is None else interest_for(total)


def is_current(state: StoredState, last_message_id: str | None, needs_analysis: bool) -> bool:
    """The stored row already reflects this dialog (same newest message)."""
    if last_message_id is None or state.last_message_id != last_message_id:
        return False
    # A row stored as new_lead must still be analysed once the contact crosses the
    # threshold (the threshold may have been lowered since).
    return not (needs_analysis and state.analyzer is None)


def summary_is_current(
    state: StoredState | None, summary: ContactSummary, min_incoming: int
) -> bool:
    """The one answer to "can this contact be skipped?" from the reader's aggregate alone:
    a real run (`analyze_contact(summary=...)`) and `backfill --dry-run` both ask it."""
    return state is not None and is_current(
        state, summary.last_message_id, summary.incoming_count >= min_incoming
    )


def lag_only(dialog: Dialog | None, extra: Sequence[DialogMessage]) -> list[DialogMessage]:
    """The event messages that may stand in for Evolution's DB; the DB is the truth.

    Evolution writes a message to its DB before it sends the webhook
    (whatsapp.baileys.service.ts: `message.create`, then `sendDataWebhook`), and analysis
    runs DEBOUNCE_SECONDS later: where the DB has the contact's dialog, a message it still
    lacks was never stored by Evolution, and only the DB's messages count. Where the DB
    has no dialog at all (its write lags, or Evolution's SAVE_DATA is off), the events'
    text is all there is and is used.
    """
    if dialog is None or not dialog.messages:
        return list(extra)
    return []


def _empty_dialog(instance: str, phone: str, name: str | None) -> Dialog:
    return Dialog(
        instance=instance,
        contact=Contact(phone=phone, remote_jid=jid_of(phone), name=name),
        messages=[],
        incoming_count=0,
        outgoing_count=0,
        first_message_at=None,
        last_message_at=None,
    )


def _keep_last_activity(dialog: Dialog, state: StoredState | None) -> Dialog:
    """A delete can make the dialog's newest message older than the stored one: the
    lead keeps its last activity time, so the store (newer wins) takes the re-analysis."""
    stored = None if state is None else state.last_message
    if stored is None or dialog.last_message_at is None or dialog.last_message_at >= stored:
        return dialog
    return msgspec.structs.replace(dialog, last_message_at=stored)


def _lead_dialog(lead: LeadRow, instance: str, phone: str) -> Dialog | None:
    """The dialog a stored lead was last analysed on (its `messages`, counts, times)."""
    messages: list[DialogMessage] = []
    for item in lead.messages or ():
        try:
            messages.append(
                DialogMessage(
                    id=str(item["id"]),
                    from_me=bool(item["from_me"]),
                    timestamp=datetime.fromisoformat(str(item["timestamp"])),
                    text=str(item["text"]),
                    type=str(item.get("type") or "conversation"),
                )
            )
        except (KeyError, TypeError, ValueError):
            continue  # a row written by something else: skip what is not a message
    if not messages:
        return None
    return Dialog(
        instance=instance,
        contact=Contact(
            phone=phone,
            remote_jid=lead.remote_jid or jid_of(phone),
            name=lead.contact_name,
        ),
        messages=sorted(messages, key=lambda m: (m.timestamp, m.id)),
        incoming_count=max(lead.incoming_count, sum(1 for m in messages if not m.from_me)),
        outgoing_count=max(lead.outgoing_count, sum(1 for m in messages if m.from_me)),
        first_message_at=lead.first_message or min(m.timestamp for m in messages),
        last_message_at=lead.last_message or max(m.timestamp for m in messages),
    )


def _apply_manual(facts: LeadFacts, state: StoredState | None) -> LeadFacts:
    """Values set by hand win over the analyzer's (they are kept by the store too)."""
    if state is None or not state.manual_values:
        return facts
    overrides: dict[str, Any] = {
        k: v
        for k, v in state.manual_values.items()
        if k in _FACT_FIELDS and k in state.manual_fields
    }
    if not overrides:
        return facts
    try:
        return msgspec.structs.replace(facts, **overrides)
    except (TypeError, msgspec.ValidationError):  # pragma: no cover - store holds checked values
        return facts


def _final_score(facts: LeadFacts, state: StoredState | None, evidence: FactEvidence) -> Score:
    # A fact set by hand is no analyzer's finding: its line shows no messages.
    by_hand = frozenset(state.manual_fields) if state is not None else frozenset()
    computed = score(facts, evidence, by_hand)
    if state is None or "score" not in state.manual_fields:
        return computed
    manual = state.manual_values.get("score")
    if not isinstance(manual, int):
        return computed
    interest = state.manual_values.get("interest_level")
    if "interest_level" not in state.manual_fields or interest not in ("hot", "warm", "cold"):
        interest = interest_for(manual)
    return Score(total=manual, interest_level=interest, breakdown=computed.breakdown)


def _dialog_json(dialog: Dialog) -> list[dict[str, Any]]:
    return [
        {
            "id": m.id,
            "from_me": m.from_me,
            "timestamp": m.timestamp.isoformat(),
            "text": m.text,
            "type": m.type,
        }
        for m in dialog.messages
    ]


def _base_write(dialog: Dialog, account: uuid.UUID) -> dict[str, Any]:
    return {
        "instance_name": dialog.instance,
        "user_account_id": account,
        "contact_phone": dialog.contact.phone,
        "contact_name": dialog.contact.name,
        "remote_jid": dialog.contact.remote_jid,
        "incoming_count": dialog.incoming_count,
        "outgoing_count": dialog.outgoing_count,
        "first_message": dialog.first_message_at,
        "last_message": dialog.last_message_at,
        "last_message_id": dialog.last_message_id,
    }


def _new_lead_write(
    dialog: Dialog, account: uuid.UUID, cause: Cause, notify: bool
) -> AnalysisWrite:
    facts = empty_facts("new_lead")
    return AnalysisWrite(
        **_base_write(dialog, account),
        **fact_columns(facts, score(facts)),
        analyzed=False,
        messages=_dialog_json(dialog),
        analyzer=None,
        llm_usage=None,
        cause=cause,
        notify=notify,
    )


def _analysis_write(
    dialog: Dialog,
    account: uuid.UUID,
    facts: LeadFacts,
    lead_score: Score,
    analysis: AnalysisResult,
    cause: Cause,
    notify: bool,
) -> AnalysisWrite:
    usage = None
    if analysis.usage is not None:
        usage = msgspec.to_builtins(analysis.usage)
        if analysis.model:
            usage["model"] = analysis.model
    return AnalysisWrite(
        **_base_write(dialog, account),
        **fact_columns(facts, lead_score),
        analyzed=True,
        messages=_dialog_json(dialog),
        analyzer=analysis.analyzer,
        llm_usage=usage,
        cause=cause,
        notify=notify,
    )
