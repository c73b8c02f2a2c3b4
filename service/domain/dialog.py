"""A contact's WhatsApp dialog as the analyzers see it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from datetime import UTC, datetime

import msgspec

PHONE_SUFFIX = "@s.whatsapp.net"  # a phone contact's WhatsApp JID is <digits> + this


def jid_of(phone: str) -> str:
    """The WhatsApp JID of a phone contact (digits as stored on the lead)."""
    return f"{phone}{PHONE_SUFFIX}"


class DialogMessage(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    from_me: bool
    timestamp: datetime  # UTC, from Evolution's messageTimestamp
    text: str
    type: str  # Evolution's messageType, e.g. conversation, imageMessage


class Contact(msgspec.Struct, frozen=True, kw_only=True):
    phone: str  # digits only, country code first
    remote_jid: str  # the phone JID: <digits>@s.whatsapp.net
    name: str | None = None  # the contact's push name, if known


class ContactSummary(msgspec.Struct, frozen=True, kw_only=True):
    """One row of the reader's per-instance contact aggregate."""

    contact: Contact
    incoming_count: int
    outgoing_count: int
    first_message_at: datetime
    last_message_at: datetime
    last_message_id: str


class Dialog(msgspec.Struct, kw_only=True):
    instance: str
    contact: Contact
    messages: list[DialogMessage]  # chronological, newest `MAX_DIALOG_MESSAGES`
    # Counts over the whole stored history (not only the messages kept above).
    incoming_count: int
    outgoing_count: int
    first_message_at: datetime | None
    last_message_at: datetime | None

    @property
    def last_message_id(self) -> str | None:
        return self.messages[-1].id if self.messages else None


def dialog_of(
    instance: str,
    contact: Contact,
    history: Sequence[DialogMessage],
    *,
    window: int | None = None,
) -> Dialog:
    """A dialog from its whole chronological `history`: the newest `window` messages (all
    when None) with whole-history counts, as the Evolution reader hands a dialog over."""
    shown = list(history[-window:] if window else history)
    return Dialog(
        instance=instance,
        contact=contact,
        messages=shown,
        incoming_count=sum(1 for m in history if not m.from_me),
        outgoing_count=sum(1 for m in history if m.from_me),
        first_message_at=shown[0].timestamp if shown else None,
        last_message_at=shown[-1].timestamp if shown else None,
    )


def merge_messages(dialog: Dialog, extra: list[DialogMessage], limit: int) -> Dialog:
    """Merge messages carried by events into a dialog read from the DB.

    The DB write may lag the webhook, so event messages count too. Dedupe by id, keep
    chronological order and the newest `limit`; counts grow by the genuinely new ones.
    """
    known = {m.id for m in dialog.messages}
    new = [m for m in extra if m.id not in known]
    if not new:
        return dialog
    merged = sorted([*dialog.messages, *{m.id: m for m in new}.values()], key=_order)
    added = list({m.id: m for m in new}.values())
    incoming = dialog.incoming_count + sum(1 for m in added if not m.from_me)
    outgoing = dialog.outgoing_count + sum(1 for m in added if m.from_me)
    times = [m.timestamp for m in merged]
    first = min([t for t in (dialog.first_message_at, *times) if t is not None])
    last = max([t for t in (dialog.last_message_at, *times) if t is not None])
    return Dialog(
        instance=dialog.instance,
        contact=dialog.contact,
        messages=merged[-limit:],
        incoming_count=incoming,
        outgoing_count=outgoing,
        first_message_at=first,
        last_message_at=last,
    )


def _order(message: DialogMessage) -> tuple[datetime, str]:
    return (message.timestamp, message.id)


def from_unix(seconds: int | float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=UTC)


def apply_changes(dialog: Dialog, edits: Mapping[str, str], deleted: AbstractSet[str]) -> Dialog:
    """The dialog as WhatsApp shows it after edits (id -> new text) and deletes.

    Only messages present are changed: an edit never adds a message, and a deleted one
    leaves the counts only when it was counted here.
    """
    if not edits and not deleted:
        return dialog
    kept: list[DialogMessage] = []
    incoming, outgoing = dialog.incoming_count, dialog.outgoing_count
    for message in dialog.messages:
        if message.id in deleted:
            if message.from_me:
                outgoing = max(0, outgoing - 1)
            else:
                incoming = max(0, incoming - 1)
            continue
        text = edits.get(message.id)
        kept.append(message if text is None else msgspec.structs.replace(message, text=text))
    times = [m.timestamp for m in kept]
    return Dialog(
        instance=dialog.instance,
        contact=dialog.contact,
        messages=kept,
        incoming_count=incoming,
        outgoing_count=outgoing,
        first_message_at=dialog.first_message_at if kept else None,
        # A deleted newest message moves the last message back.
        last_message_at=(
            max(times) if len(kept) < len(dialog.messages) and times else dialog.last_message_at
        )
        if kept
        else None,
    )
