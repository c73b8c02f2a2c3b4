"""In-memory ResultsStore and DialogSource: the pipeline's decisions tested in milliseconds.

The store keeps the write rules of `crm_upsert_analysis` and `crm_update_lead`
(service/sql/0002_write_rules.sql, 0006_lead_history.sql): the newest dialog wins, a foreign
account's row is left alone, new_lead facts never replace an analysis or a person's edit,
manual columns survive; the events a write raises are listed in `events`.
tests/test_store_rules.py runs the same cases against this store and PostgresStore, so the
two cannot drift apart. Only the calls the pipeline makes are here.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from collections.abc import Set as AbstractSet
from datetime import UTC, datetime
from typing import Any

import msgspec

from service.adapters.stores.base import (
    AnalysisWrite,
    StoredState,
    UpsertResult,
    check_changes,
    state_from_record,
)
from service.domain.dialog import ContactSummary, Dialog
from service.domain.lead import LEAD_COLUMNS, MANUAL_COLUMNS, LeadRow

# Columns an analysis writes only while no person has set them (contact_name aside).
_GUARDED = tuple(c for c in MANUAL_COLUMNS if c not in ("contact_name", "notes"))
# Columns that follow the facts but a person cannot set.
_FOLLOWING = ("reasoning", "budget_stated", "qualification_complete", "score_breakdown")


class MemoryStore:
    """Rows keyed by (instance, phone), as the table's unique key."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], dict[str, Any]] = {}
        self.deletes: dict[tuple[uuid.UUID, str, str], set[str]] = {}
        self.writes: list[AnalysisWrite] = []
        # (event type, contact, score) per event a write raised, as crm_record_changes does.
        self.events: list[tuple[str, str, int | None]] = []

    async def close(self) -> None:
        return None

    async def get_state(self, account: uuid.UUID, instance: str, phone: str) -> StoredState | None:
        row = self.rows.get((instance, phone))
        if row is None or row["user_account_id"] != account:
            return None
        return state_from_record(row)

    async def upsert_analysis(self, write: AnalysisWrite) -> UpsertResult:
        self.writes.append(write)
        r = msgspec.to_builtins(write, builtin_types=(uuid.UUID, datetime))
        analyzed = bool(r["analyzed"])
        key = (r["instance_name"], r["contact_phone"])
        o = self.rows.get(key)
        now = datetime.now(UTC)
        if o is None:
            row = {name: None for name in LEAD_COLUMNS}
            row.update({k: v for k, v in r.items() if k in LEAD_COLUMNS})
            row.update(
                id=uuid.uuid4(),
                next_message=r["next_message"] or "",
                analyzer=(r["analyzer"] or "unknown") if analyzed else None,
                llm_usage=r["llm_usage"] if analyzed else None,
                analyzed_at=now if analyzed else None,
                source="auto",
                manual_fields=[],
                created_at=now,
                updated_at=now,
            )
            self.rows[key] = row
            self._record(None, row, write.notify)
            return UpsertResult(
                applied=True,
                id=row["id"],
                previous_interest=None,
                interest_level=r["interest_level"],
            )
        if o["user_account_id"] != r["user_account_id"]:
            return UpsertResult(applied=False, id=None, previous_interest=None, interest_level=None)
        kept = UpsertResult(
            applied=False,
            id=o["id"],
            previous_interest=o["interest_level"],
            interest_level=o["interest_level"],
        )
        if o["last_message"] is not None and (
            r["last_message"] is None or o["last_message"] > r["last_message"]
        ):
            return kept
        dialog = analyzed or o["analyzer"] is None or o["analyzed_at"] is None
        facts = analyzed or (dialog and o["source"] == "auto" and not o["manual_fields"])
        if (
            not analyzed
            and not dialog
            and o["last_message"] == r["last_message"]
            and o["last_message_id"] == r["last_message_id"]
        ):
            return kept
        manual = set(o["manual_fields"])
        previous = o["interest_level"]
        before = dict(o)
        if "contact_name" not in manual and r["contact_name"] is not None:
            o["contact_name"] = r["contact_name"]
        for name in ("remote_jid", "incoming_count", "outgoing_count", "first_message"):
            if r[name] is not None:
                o[name] = r[name]
        o["last_message"], o["last_message_id"] = r["last_message"], r["last_message_id"]
        if dialog:
            o["messages"] = r["messages"]
        if facts:
            for name in _GUARDED:
                if name not in manual:
                    o[name] = r[name]
            if "next_message" not in manual:
                o["next_message"] = r["next_message"] or ""
            for name in _FOLLOWING:
                o[name] = r[name]
        if analyzed:
            o["analyzer"] = r["analyzer"] or "unknown"
            o["llm_usage"] = r["llm_usage"]
            o["analyzed_at"] = now
        o["updated_at"] = now
        self._record(before, o, write.notify)
        return UpsertResult(
            applied=True, id=o["id"], previous_interest=previous, interest_level=o["interest_level"]
        )

    def _record(self, old: dict[str, Any] | None, new: dict[str, Any], notify: bool) -> None:
        if not notify:
            return
        old = old or {}
        if old.get("funnel_stage") != new["funnel_stage"]:
            self.events.append(("lead.stage_changed", new["contact_phone"], new["score"]))
        if new["interest_level"] == "hot" and old.get("interest_level") != "hot":
            self.events.append(("lead.hot", new["contact_phone"], new["score"]))

    async def get_lead(
        self, account: uuid.UUID, lead_id: uuid.UUID, *, include_messages: bool = False
    ) -> LeadRow | None:
        for row in self.rows.values():
            if row["id"] == lead_id and row["user_account_id"] == account:
                values = dict(row) if include_messages else {**row, "messages": None}
                return msgspec.convert(values, LeadRow)
        return None

    async def update_lead(
        self,
        account: uuid.UUID,
        lead_id: uuid.UUID,
        changes: dict[str, Any],
        derived: dict[str, Any] | None = None,
    ) -> LeadRow | None:
        check_changes(changes, derived)
        for row in self.rows.values():
            if row["id"] == lead_id and row["user_account_id"] == account:
                old = list(row["manual_fields"])
                manual = old + sorted(k for k in changes if k not in old)
                row.update({k: v for k, v in (derived or {}).items() if k not in manual})
                row.update(changes)
                row["next_message"] = row["next_message"] or ""
                row["manual_fields"] = manual
                row["updated_at"] = datetime.now(UTC)
                return msgspec.convert(row, LeadRow)
        return None

    async def forget_dialog_time(self, account: uuid.UUID, instance: str, phone: str) -> bool:
        row = self.rows.get((instance, phone))
        if row is None or row["user_account_id"] != account:
            return False
        row["last_message"] = None
        return True

    async def record_deletes(
        self, account: uuid.UUID, instance: str, remote_jid: str, message_ids: Sequence[str]
    ) -> int:
        known = self.deletes.setdefault((account, instance, remote_jid), set())
        new = set(message_ids) - known
        known |= new
        return len(new)

    async def deleted_ids(self, account: uuid.UUID, instance: str, remote_jid: str) -> set[str]:
        return set(self.deletes.get((account, instance, remote_jid), ()))

    async def deleted_ids_of(
        self, account: uuid.UUID, instance: str, remote_jids: Sequence[str]
    ) -> dict[str, set[str]]:
        found = {jid: await self.deleted_ids(account, instance, jid) for jid in remote_jids}
        return {jid: ids for jid, ids in found.items() if ids}

    async def get_states(
        self, account: uuid.UUID, instance: str, phones: Sequence[str]
    ) -> dict[str, StoredState]:
        found = {phone: await self.get_state(account, instance, phone) for phone in phones}
        return {phone: state for phone, state in found.items() if state is not None}

    async def upsert_analyses(self, writes: Sequence[AnalysisWrite]) -> list[UpsertResult]:
        return [await self.upsert_analysis(write) for write in writes]


class MemoryDialogs:
    """Evolution's DB as dialogs per (instance, phone); counts the reads."""

    def __init__(self) -> None:
        self.dialogs: dict[tuple[str, str], Dialog] = {}
        self.reads = 0

    def put(self, dialog: Dialog) -> None:
        self.dialogs[(dialog.instance, dialog.contact.phone)] = dialog

    async def dialog(
        self, instance: str, phone: str, *, limit: int, excluded: AbstractSet[str] = frozenset()
    ) -> Dialog | None:
        self.reads += 1
        found = self.dialogs.get((instance, phone))
        if found is None:
            return None
        kept = [m for m in found.messages if m.id not in excluded]
        return msgspec.structs.replace(found, messages=kept[-limit:])

    async def contact_of_message(self, instance: str, message_id: str) -> str | None:
        for (name, phone), dialog in self.dialogs.items():
            if name == instance and any(m.id == message_id for m in dialog.messages):
                return phone
        return None

    async def iter_contacts(
        self,
        instance: str,
        *,
        min_incoming: int,
        limit: int | None = None,
        since: datetime | None = None,
    ) -> AsyncIterator[ContactSummary]:
        found = 0
        for (name, _), dialog in sorted(self.dialogs.items()):
            if name != instance or dialog.incoming_count < min_incoming or not dialog.messages:
                continue
            if since is not None and (
                dialog.last_message_at is None or dialog.last_message_at < since
            ):
                continue
            if limit is not None and found >= limit:
                return
            found += 1
            assert dialog.first_message_at is not None and dialog.last_message_at is not None
            yield ContactSummary(
                contact=dialog.contact,
                incoming_count=dialog.incoming_count,
                outgoing_count=dialog.outgoing_count,
                first_message_at=dialog.first_message_at,
                last_message_at=dialog.last_message_at,
                last_message_id=dialog.messages[-1].id,
            )

    async def unpaired_lid_chats(self, instance: str) -> int:
        return 0
