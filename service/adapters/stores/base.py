"""The results store interface: one contract, two implementations (Postgres, Supabase).

Both keep the same rules:
- an analysis never overwrites a newer one (compared on the dialog's `last_message`
  time, then `last_message_id`): concurrent writers converge on the newest;
- columns listed in a row's `manual_fields` survive later automatic analyses;
- every read and write is scoped to `user_account_id`.
The write rules live in one SQL function (`crm_upsert_analysis`, see migrations/) that
both stores call, so they cannot drift apart.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import datetime
from typing import Any, Literal, Protocol

import msgspec

from service.domain.facts import FactFields, FunnelStage, InterestLevel
from service.domain.history import Cause, FunnelRow, HistoryPage
from service.domain.lead import DERIVED_COLUMNS, LEAD_COLUMNS, MANUAL_COLUMNS, LeadRow


class AnalysisWrite(FactFields, kw_only=True):
    """What the pipeline writes for one contact (an analysis or a `new_lead` refresh).

    `analyzed` is False for contacts under the threshold: only identity, counts and times
    change then, plus the new_lead stage/score when the row has no analysis yet.
    """

    instance_name: str
    user_account_id: uuid.UUID
    contact_phone: str
    contact_name: str | None
    remote_jid: str
    incoming_count: int
    outgoing_count: int
    first_message: datetime | None
    last_message: datetime | None
    last_message_id: str | None
    analyzed: bool
    # Score columns (and the facts, from FactFields); for `analyzed=False` they describe
    # a new_lead.
    reasoning: str | None
    is_medical: bool
    budget_stated: bool
    has_booking: bool
    sent_instagram: bool
    qualification_complete: bool
    score: int
    interest_level: InterestLevel
    score_breakdown: list[dict[str, Any]]
    messages: list[dict[str, Any]] | None
    analyzer: str | None
    llm_usage: dict[str, Any] | None
    # Recorded with each change of stage, score or interest (the lead's history).
    cause: Cause = msgspec.field(default_factory=lambda: Cause(kind="analysis"))
    # False: history only, no events (`backfill --no-notify`).
    notify: bool = True


class UpsertResult(msgspec.Struct, kw_only=True):
    applied: bool  # False when the stored row was newer (nothing written)
    id: uuid.UUID | None
    previous_interest: str | None  # interest level before this write (None = no row / none)
    interest_level: str | None  # interest level after this call (stored row's if not applied)


class StoredState(msgspec.Struct, kw_only=True):
    """What the pipeline needs to know of a contact's stored row before analysing."""

    id: uuid.UUID
    last_message: datetime | None
    last_message_id: str | None
    analyzed_at: datetime | None
    analyzer: str | None
    funnel_stage: str | None
    interest_level: str | None
    manual_fields: list[str]
    manual_values: dict[str, Any]  # the current values of the manual_fields columns


SortKey = Literal["score"]


class LeadQuery(msgspec.Struct, kw_only=True):
    """Filters of `GET /dialogs/analysis` (and the CSV export)."""

    user_account_id: uuid.UUID
    instance_name: str | None = None
    interest_level: InterestLevel | None = None
    min_score: int | None = None
    funnel_stage: FunnelStage | None = None
    qualification_complete: bool | None = None
    limit: int = 100
    offset: int = 0
    include_messages: bool = False


class LeadStats(msgspec.Struct, kw_only=True):
    total: int
    hot: int
    warm: int
    cold: int
    avgScore: float
    totalMessages: int
    new_lead: int
    not_qualified: int
    qualified: int
    consultation_booked: int
    consultation_completed: int
    deal_closed: int
    deal_lost: int
    qualified_count: int
    by_niche: dict[str, int]
    analyzed_last_24h: int


class OutboxEvent(msgspec.Struct, kw_only=True):
    """An event claimed from the outbox: `body` is published exactly as stored."""

    id: uuid.UUID  # also the AMQP message_id: the same on every publish of this event
    type: str
    body: dict[str, Any]


class InstanceMapping(msgspec.Struct, kw_only=True):
    instance_name: str
    user_account_id: uuid.UUID
    created_at: datetime | None = None


class ApiKey(msgspec.Struct, kw_only=True):
    """A stored API key (its hash stays in the database)."""

    id: uuid.UUID
    prefix: str
    user_account_id: uuid.UUID
    name: str | None = None
    created_at: datetime | None = None
    revoked_at: datetime | None = None


class InstanceMove(msgspec.Struct, kw_only=True):
    instance_name: str
    user_account_id: uuid.UUID
    previous_account_id: uuid.UUID | None = None
    moved: int = 0  # leads whose account changed


class DuplicateLeadError(Exception):
    """A lead for (instance, phone) exists already."""


class InstanceOwnedError(Exception):
    """The instance is mapped to another user account already."""


class StoreUnavailableError(Exception):
    """The results store cannot be reached (transient: retry later)."""


class StoreAccessError(StoreUnavailableError):
    """The store answers but refuses this service's work: a wrong key, missing grants or
    missing tables. Not cured by retrying; the message says what to fix."""


class ResultsStore(Protocol):
    """Results store operations. Every account-facing call takes the account."""

    async def ping(self) -> None: ...

    async def close(self) -> None: ...

    # pipeline
    async def get_state(
        self, account: uuid.UUID, instance: str, phone: str
    ) -> StoredState | None: ...

    async def upsert_analysis(self, write: AnalysisWrite) -> UpsertResult: ...

    # bulk forms of the above, for a backfill's page of contacts (same rules, same results)
    async def get_states(
        self, account: uuid.UUID, instance: str, phones: Sequence[str]
    ) -> dict[str, StoredState]:
        """`get_state` of each phone in one read; phones without a row are left out."""
        ...

    async def upsert_analyses(self, writes: Sequence[AnalysisWrite]) -> list[UpsertResult]:
        """`upsert_analysis` of each write, in order, with one result per write. All or
        nothing on Postgres (one statement): on an error nothing is stored."""
        ...

    # REST
    async def get_lead(
        self, account: uuid.UUID, lead_id: uuid.UUID, *, include_messages: bool = False
    ) -> LeadRow | None: ...

    async def query_leads(self, query: LeadQuery) -> tuple[list[LeadRow], int]: ...

    def iter_leads(self, query: LeadQuery, chunk_size: int = 1000) -> AsyncIterator[LeadRow]:
        """All rows matching `query` (limit/offset ignored), streamed in chunks."""
        ...

    async def stats(self, account: uuid.UUID, instance: str | None) -> LeadStats: ...

    async def create_lead(self, row: LeadRow, cause: Cause | None = None) -> LeadRow: ...

    async def update_lead(
        self,
        account: uuid.UUID,
        lead_id: uuid.UUID,
        changes: dict[str, Any],
        derived: dict[str, Any] | None = None,
        cause: Cause | None = None,
    ) -> LeadRow | None:
        """Set `changes` (column -> value), add their names to manual_fields.

        `derived` columns (score, interest level, breakdown… recomputed from the changed
        facts) are set in the same write but NOT marked manual, so later analyses still
        recompute them. `cause` (default: a manual edit) goes into the lead's history.
        """
        ...

    # history and the funnel report (service/sql/0006_lead_history.sql)
    async def lead_history(
        self, account: uuid.UUID, lead_id: uuid.UUID, limit: int, offset: int
    ) -> HistoryPage | None:
        """Newest first; None when the lead is not the account's."""
        ...

    async def funnel(
        self,
        account: uuid.UUID,
        since: datetime,
        until: datetime,
        instance: str | None,
        stages: Sequence[str],
    ) -> dict[str, FunnelRow]: ...

    # the outbox of lead events
    async def claim_outbox(self, limit: int, lease_seconds: float) -> list[OutboxEvent]: ...

    async def outbox_published(self, ids: Sequence[uuid.UUID]) -> int: ...

    async def release_outbox(self, ids: Sequence[uuid.UUID]) -> int: ...

    async def outbox_depth(self) -> int: ...

    async def delete_lead(self, account: uuid.UUID, lead_id: uuid.UUID) -> bool: ...

    # instance <-> account mapping
    async def instance_account(self, instance: str) -> uuid.UUID | None: ...

    async def add_instance(self, instance: str, account: uuid.UUID) -> InstanceMapping: ...

    async def list_instances(self) -> list[InstanceMapping]: ...

    async def remove_instance(self, instance: str) -> bool: ...

    async def move_instance(self, instance: str, account: uuid.UUID) -> InstanceMove: ...

    async def foreign_leads(self, instance: str, account: uuid.UUID) -> int: ...

    # `backfill --force`: let a rebuild from the dialog replace the stored row
    async def forget_dialog_time(self, account: uuid.UUID, instance: str, phone: str) -> bool: ...

    # what only Evolution's events tell (see service/sql/0005_evolution_events.sql)
    async def record_deletes(
        self, account: uuid.UUID, instance: str, remote_jid: str, message_ids: Sequence[str]
    ) -> int: ...

    async def deleted_ids(self, account: uuid.UUID, instance: str, remote_jid: str) -> set[str]: ...

    async def deleted_ids_of(
        self, account: uuid.UUID, instance: str, remote_jids: Sequence[str]
    ) -> dict[str, set[str]]:
        """`deleted_ids` of each chat in one read; chats without deletes are left out."""
        ...

    async def remember_lid(self, instance: str, lid: str, phone_jid: str) -> bool: ...

    async def lid_phone(self, instance: str, lid: str) -> str | None: ...

    # account-bound API keys (stored as SHA-256 hashes)
    async def create_api_key(
        self, key_hash: str, prefix: str, account: uuid.UUID, name: str | None
    ) -> ApiKey: ...

    async def list_api_keys(self) -> list[ApiKey]: ...

    async def revoke_api_key(self, ref: str) -> int: ...

    async def api_key_account(self, key_hash: str) -> uuid.UUID | None: ...


# -- helpers shared by the store implementations -----------------------------------------

# What the pipeline reads before analysing: StoredState plus the manual columns' values.
STATE_COLUMNS: tuple[str, ...] = (
    "id",
    "last_message",
    "last_message_id",
    "analyzed_at",
    "analyzer",
    "manual_fields",
    *MANUAL_COLUMNS,
)


def lead_columns(include_messages: bool) -> tuple[str, ...]:
    """The columns of a LeadRow read back; `messages` (large) only when asked for."""
    return LEAD_COLUMNS if include_messages else tuple(c for c in LEAD_COLUMNS if c != "messages")


def lead_from_record(record: Mapping[str, Any]) -> LeadRow:
    """A row as either store returns it (asyncpg record or PostgREST JSON) as a LeadRow."""
    return msgspec.convert(dict(record), LeadRow)


def state_from_record(record: Mapping[str, Any]) -> StoredState:
    """StoredState from a row holding STATE_COLUMNS."""
    manual = [name for name in record["manual_fields"] or () if name in MANUAL_COLUMNS]
    return msgspec.convert(
        {
            "id": record["id"],
            "last_message": record["last_message"],
            "last_message_id": record["last_message_id"],
            "analyzed_at": record["analyzed_at"],
            "analyzer": record["analyzer"],
            "funnel_stage": record["funnel_stage"],
            "interest_level": record["interest_level"],
            "manual_fields": manual,
            "manual_values": {name: record[name] for name in manual},
        },
        StoredState,
    )


def check_changes(changes: Mapping[str, Any], derived: Mapping[str, Any] | None) -> None:
    """Refuse columns a person may not set (ValueError names the first one)."""
    for name in changes:
        if name not in MANUAL_COLUMNS:
            raise ValueError(f"column {name} cannot be changed by hand")
    for name in derived or {}:
        if name not in DERIVED_COLUMNS:
            raise ValueError(f"column {name} is not derived from the facts")


def cause_json(cause: Cause | None) -> dict[str, Any]:
    """The cause as the write functions take it (a manual edit when none is given)."""
    return msgspec.to_builtins(cause or Cause(kind="manual"))  # type: ignore[no-any-return]


def creation_values(row: LeadRow) -> dict[str, Any]:
    """Column values (JSON-ready) of a lead created by hand: `source` is 'manual'.

    The caller lists in `row.manual_fields` the columns the person gave; they are kept
    (deduplicated, manual columns only) and survive later analyses. created_at and
    updated_at are the database's.
    """
    values: dict[str, Any] = msgspec.to_builtins(row)
    for name in ("created_at", "updated_at", "stage_changed_at"):
        values.pop(name, None)
    values["source"] = "manual"
    values["manual_fields"] = list(
        dict.fromkeys(name for name in row.manual_fields if name in MANUAL_COLUMNS)
    )
    if values.get("next_message") is None:
        values["next_message"] = ""  # NOT NULL in the original's table
    return values
