"""Webhook body → queued events, or a typed reason not to queue anything.

Pure: no I/O, no framework. The HTTP handler and the Evolution-exchange bridge both call
`parse_webhook` and act on its outcome:

- `Accepted`: message events to publish (groups, broadcasts and non-dialog messages of a
  multi-message body already left out);
- `Ignored`: nothing to queue, and nothing a retry would change (other events, group
  chats, `status@broadcast`, newsletters, reactions and protocol messages) → 200;
- `Rejected`: the body is malformed; `reason` says what is wrong → 400 (Evolution does not
  retry a 400).

Only identity, time and readable text survive: base64 media and other bulk never reach
the queue.
"""

from __future__ import annotations

import re
import time
from typing import Any

import msgspec

from service.adapters.broker.envelope import QueuedEvent
from service.adapters.evolution.identity import (
    is_non_contact_chat,
    lid_jid,
    owner_jid,
    phone_jid,
)
from service.adapters.evolution.message_text import message_text

# Events whose messages are queued for analysis (canonical, dotted lower case).
MESSAGE_EVENTS = frozenset({"messages.upsert", "send.message", "messages.set"})
# Events that change an earlier message (whatsapp.baileys.service.ts): `messages.delete`
# (a revoke: the flattened key; a delete through the API: the stored message),
# `messages.update` (status updates; an edit carries `message.editedMessage`),
# `messages.edited` / `send.message.update` (the edit's protocolMessage itself).
CHANGE_EVENTS = frozenset(
    {"messages.delete", "messages.update", "messages.edited", "send.message.update"}
)

# Evolution's event names in canonical form; anything else is reported as "other" in
# metrics so a caller cannot inflate label cardinality.
KNOWN_EVENTS = frozenset(
    {
        "application.startup",
        "call",
        "chats.delete",
        "chats.set",
        "chats.update",
        "chats.upsert",
        "connection.update",
        "contacts.set",
        "contacts.update",
        "contacts.upsert",
        "creds.update",
        "group.participants.update",
        "groups.update",
        "groups.upsert",
        "instance.create",
        "instance.delete",
        "labels.association",
        "labels.edit",
        "logout.instance",
        "messages.delete",
        "messages.edited",
        "messages.set",
        "messages.update",
        "messages.upsert",
        "messaging.history.set",
        "presence.update",
        "qrcode.updated",
        "remove.instance",
        "send.message",
        "send.message.update",
        "status.instance",
        "typebot.change.status",
        "typebot.start",
    }
)

_MAX_NAME = 100  # longest event/instance name echoed back or carried along
_MAX_TIMESTAMP = 253_402_300_799  # 9999-12-31: anything later is garbage


class Accepted(msgspec.Struct, frozen=True, kw_only=True):
    event: str
    instance: str
    events: list[QueuedEvent]
    skipped: int = 0  # messages of the body left out (groups, reactions, …)


class Ignored(msgspec.Struct, frozen=True, kw_only=True):
    event: str
    reason: str  # the event name for other events, else why the message is not a lead's


class Rejected(msgspec.Struct, frozen=True, kw_only=True):
    event: str  # canonical event when it could be read, else ""
    reason: str


IntakeOutcome = Accepted | Ignored | Rejected


def normalize_event(name: str) -> str:
    """`MESSAGES_UPSERT`, `messages-upsert` (path form) and `messages.upsert` → dotted."""
    return name.strip().lower().replace("_", ".").replace("-", ".")


def split_event_tail(query_string: str) -> tuple[str, str | None]:
    """A query string without the event path Evolution's byEvents appended to it.

    Evolution builds the byEvents URL as `${url}/${event-path}` (webhook.controller.ts,
    emit), so a configured `…/evolution?token=T` becomes `…?token=T/messages-upsert`: the
    tail belongs to the last query value. It is split off only when it is one of
    Evolution's event names, so a token that merely contains a slash stays whole.
    """
    head, sep, tail = query_string.rpartition("/")
    if not sep or not tail or normalize_event(tail) not in KNOWN_EVENTS:
        return query_string, None
    return head, tail


def event_label(event: str) -> str:
    """A bounded metrics label for an event name."""
    if not event:
        return "unknown"
    return event if event in KNOWN_EVENTS else "other"


# -- wire shapes (tolerant: unknown fields are skipped, absent ones checked by hand) -------
class _Envelope(msgspec.Struct):
    event: str | None = None
    instance: str | None = None
    data: msgspec.Raw = msgspec.field(default_factory=msgspec.Raw)
    sender: str | None = None  # the instance's own number (wuid)


class _Long(msgspec.Struct):
    """protobuf.js Long, as some Evolution versions serialise 64-bit timestamps."""

    low: int = 0
    high: int = 0


class _Key(msgspec.Struct):
    remote_jid: str | None = msgspec.field(default=None, name="remoteJid")
    id: str | None = None
    from_me: bool | None = msgspec.field(default=None, name="fromMe")
    remote_jid_alt: str | None = msgspec.field(default=None, name="remoteJidAlt")
    sender_pn: str | None = msgspec.field(default=None, name="senderPn")


class _MessageData(msgspec.Struct):
    key: _Key | None = None
    push_name: str | None = msgspec.field(default=None, name="pushName")
    message: dict[str, Any] | None = None
    message_type: str | None = msgspec.field(default=None, name="messageType")
    message_timestamp: int | float | str | _Long | None = msgspec.field(
        default=None, name="messageTimestamp"
    )
    # messages.set from some versions: {"messages": [...], ...}
    messages: list[_MessageData] | None = None


class _ChangeData(msgspec.Struct):
    """`data` of the change events, every shape in one tolerant struct."""

    key: _Key | None = None
    # A revoke's messages.delete is the key itself, flattened.
    remote_jid: str | None = msgspec.field(default=None, name="remoteJid")
    id: str | None = None
    from_me: bool | None = msgspec.field(default=None, name="fromMe")
    remote_jid_alt: str | None = msgspec.field(default=None, name="remoteJidAlt")
    sender_pn: str | None = msgspec.field(default=None, name="senderPn")
    key_id: str | None = msgspec.field(default=None, name="keyId")  # messages.update
    status: str | None = None
    message: dict[str, Any] | None = None
    # protocolMessage (messages.edited): type REVOKE (0) or MESSAGE_EDIT (14).
    type: int | str | None = None
    edited_message: dict[str, Any] | None = msgspec.field(default=None, name="editedMessage")
    message_timestamp: int | float | str | _Long | None = msgspec.field(
        default=None, name="messageTimestamp"
    )
    timestamp_ms: int | float | str | _Long | None = msgspec.field(default=None, name="timestampMs")


_envelope_decoder = msgspec.json.Decoder(_Envelope)
_change_decoder = msgspec.json.Decoder(_ChangeData | list[_ChangeData] | None)
_data_decoder = msgspec.json.Decoder(_MessageData | list[_MessageData] | None)


class _Invalid(Exception):
    """One message of the body is malformed; the text is the reason."""


def parse_webhook(
    body: bytes, path_event: str | None = None, *, received_at: int | None = None
) -> IntakeOutcome:
    """Decode an Evolution webhook body; `path_event` is the `{event}` path segment."""
    if not body.strip():
        return Rejected(event="", reason="empty body")
    try:
        envelope = _envelope_decoder.decode(body)
    except msgspec.ValidationError as exc:
        return Rejected(event="", reason=_explain(str(exc), root="body"))
    except msgspec.DecodeError as exc:
        return Rejected(event="", reason=f"malformed JSON: {exc}")

    body_event = normalize_event(envelope.event) if envelope.event else ""
    url_event = normalize_event(path_event) if path_event else ""
    if body_event and url_event and body_event != url_event:
        return Rejected(
            event=body_event,
            reason=f"event in the path ({url_event}) does not match the body ({body_event})",
        )
    event = (body_event or url_event)[:_MAX_NAME]
    if not event:
        return Rejected(event="", reason="missing event")
    instance = (envelope.instance or "").strip()
    if not instance:
        return Rejected(event=event, reason="missing instance")
    if len(instance) > _MAX_NAME:
        return Rejected(event=event, reason=f"instance name longer than {_MAX_NAME} characters")
    owner = owner_jid(envelope.sender)
    if event in CHANGE_EVENTS:
        return _change_outcome(event, instance, envelope.data, owner, received_at)
    if event not in MESSAGE_EVENTS:
        return Ignored(event=event, reason=event)
    return _message_outcome(event, instance, envelope.data, owner, received_at)


def _decode_data(event: str, raw: msgspec.Raw, decoder: msgspec.json.Decoder[Any]) -> Any:
    """The body's `data` decoded, or the Rejected outcome saying why it cannot be."""
    if not raw:
        return Rejected(event=event, reason="missing data")
    try:
        data = decoder.decode(raw)
    except msgspec.ValidationError as exc:
        return Rejected(event=event, reason=_explain(str(exc), root="data"))
    except msgspec.DecodeError as exc:  # pragma: no cover - the envelope already parsed
        return Rejected(event=event, reason=f"malformed JSON: {exc}")
    return Rejected(event=event, reason="missing data") if data is None else data


def _message_outcome(
    event: str, instance: str, raw: msgspec.Raw, owner: str | None, received_at: int | None
) -> IntakeOutcome:
    data = _decode_data(event, raw, _data_decoder)
    if isinstance(data, Rejected):
        return data
    if isinstance(data, list):
        items, where = data, "data[{}]"
    elif data.messages is not None:
        items, where = data.messages, "data.messages[{}]"
    else:
        items, where = [data], "data"

    events: list[QueuedEvent] = []
    skipped: list[str] = []
    invalid: list[str] = []
    for index, item in enumerate(items):
        path = where.format(index)
        try:
            result = _queued_event(event, instance, item, path, owner, received_at)
        except _Invalid as exc:
            invalid.append(str(exc))
            continue
        if isinstance(result, str):
            skipped.append(result)
        else:
            events.append(result)

    if invalid and (len(items) == 1 or not (events or skipped)):
        return Rejected(event=event, reason=invalid[0])
    if not events:
        return Ignored(event=event, reason=skipped[0] if skipped else "no messages")
    return Accepted(
        event=event, instance=instance, events=events, skipped=len(skipped) + len(invalid)
    )


def _queued_event(
    event: str,
    instance: str,
    data: _MessageData,
    path: str,
    owner: str | None,
    received_at: int | None,
) -> QueuedEvent | str:
    """The event of one message, or why it is not queued (a short reason)."""
    key = data.key
    if key is None:
        raise _Invalid(f"{path}.key missing")
    remote_jid = (key.remote_jid or "").strip()
    if not remote_jid:
        raise _Invalid(f"{path}.key.remoteJid missing")
    message_id = (key.id or "").strip()
    if not message_id:
        raise _Invalid(f"{path}.key.id missing")
    timestamp = _timestamp(data.message_timestamp, received_at)
    if timestamp is None:
        raise _Invalid(f"{path}.messageTimestamp must be a Unix time")

    non_contact = _non_contact_reason(remote_jid)
    if non_contact is not None:
        return non_contact
    if owner is not None and remote_jid == owner:
        return "own_chat"
    message_type = data.message_type or _guess_type(data.message)
    text = message_text(data.message, message_type)
    if text is None:
        return "not_dialog"
    jids = {"remoteJid": remote_jid, "remoteJidAlt": key.remote_jid_alt, "senderPn": key.sender_pn}
    contact = phone_jid(jids, owner)
    return QueuedEvent(
        event=event,
        instance=instance,
        message_id=message_id,
        remote_jid=remote_jid,
        phone_jid=contact,
        from_me=bool(key.from_me),
        timestamp=timestamp,
        message_type=message_type,
        text=text,
        push_name=_push_name(data.push_name, jids),
        lid=lid_jid(jids),
    )


def _push_name(push_name: str | None, jids: dict[str, str | None]) -> str | None:
    """The sender's display name; None for what only repeats the JID's digits (Evolution's
    messages.set fallback `participantJid.split('@')[0]`, whatsapp.baileys.service.ts)."""
    name = (push_name or "").strip()
    if not name:
        return None
    if name.isdigit() and any(
        isinstance(jid, str) and jid.split("@", 1)[0].split(":", 1)[0] == name
        for jid in jids.values()
    ):
        return None
    return name


def _change_outcome(
    event: str, instance: str, raw: msgspec.Raw, owner: str | None, received_at: int | None
) -> IntakeOutcome:
    data = _decode_data(event, raw, _change_decoder)
    if isinstance(data, Rejected):
        return data
    items = data if isinstance(data, list) else [data]
    events: list[QueuedEvent] = []
    skipped: list[str] = []
    for item in items:
        result = _change_event(event, instance, item, owner, received_at)
        if isinstance(result, str):
            skipped.append(result)
        else:
            events.append(result)
    if not events:
        return Ignored(event=event, reason=skipped[0] if skipped else "no messages")
    return Accepted(event=event, instance=instance, events=events, skipped=len(skipped))


_EDIT_TYPES = (14, "MESSAGE_EDIT")
_REVOKE_TYPES = (0, "REVOKE")


def _change_event(
    event: str, instance: str, data: _ChangeData, owner: str | None, received_at: int | None
) -> QueuedEvent | str:
    """The change one item describes, or why there is none."""
    change: str | None
    text: str | None = None
    sender_view = False  # the key is in the sender's perspective (an edit's protocolMessage)
    if event in ("messages.edited", "send.message.update"):
        sender_view = True
        if data.type in _REVOKE_TYPES:
            change = "delete"
        elif data.type in _EDIT_TYPES or data.edited_message is not None:
            change = "edit"
            text = message_text(data.edited_message, None)
        else:
            return event
    elif event == "messages.update":
        edited = data.message.get("editedMessage") if data.message else None
        if isinstance(edited, dict) or data.status == "EDITED":
            change = "edit"
            text = message_text(data.message, None)
        else:
            # A delivery/read status, or a status-less update such as a star (Baileys
            # `messages.update` {starred}), whose status Evolution defaults to DELETED up
            # to 2.3.6: a revoke is posted as `messages.delete` only.
            return event
    else:  # messages.delete
        change = "delete"
    if change == "edit" and text is None:
        return "not_dialog"

    key = data.key
    if key is not None:
        remote_jid, message_id = key.remote_jid, key.id
        alt, sender_pn, from_me = key.remote_jid_alt, key.sender_pn, key.from_me
    else:
        remote_jid, alt, sender_pn = data.remote_jid, data.remote_jid_alt, data.sender_pn
        message_id = data.key_id or data.id
        from_me = data.from_me
    remote_jid = (remote_jid or "").strip()
    message_id = (message_id or "").strip()
    if not message_id:
        return "no_message_id"
    if is_non_contact_chat(remote_jid):
        return _non_contact_reason(remote_jid) or "group"
    jids = {"remoteJid": remote_jid, "remoteJidAlt": alt, "senderPn": sender_pn}
    contact = phone_jid(jids, owner)
    lid = lid_jid(jids)
    if sender_view and contact is None:
        # The contact's own edit names the business (its number or LID) as the chat: the
        # contact is found later through the edited message's id.
        remote_jid, lid = "", None
    timestamp = _timestamp(data.message_timestamp, None)
    if timestamp is None and data.timestamp_ms is not None:
        timestamp = _timestamp(data.timestamp_ms, None)
    if timestamp is None:
        timestamp = int(time.time()) if received_at is None else received_at
    return QueuedEvent(
        event=event,
        instance=instance,
        message_id=message_id,
        remote_jid=remote_jid or contact or lid or f"{message_id}@message",
        phone_jid=contact,
        from_me=bool(from_me),
        timestamp=timestamp,
        message_type="protocolMessage",
        text=text,
        change=change,
        lid=lid,
    )


def _non_contact_reason(remote_jid: str) -> str | None:
    if remote_jid.endswith("@g.us"):
        return "group"
    if remote_jid.endswith("@broadcast"):
        return "broadcast"
    if remote_jid.endswith("@newsletter"):
        return "newsletter"
    return None


def _guess_type(message: dict[str, Any] | None) -> str:
    if message:
        for name in message:
            if name == "conversation" or name.endswith("Message"):
                return name
    return "unknown"


def _timestamp(value: int | float | str | _Long | None, received_at: int | None) -> int | None:
    """Unix seconds from whatever shape Evolution used; None when unreadable."""
    seconds: int
    if value is None:
        return int(time.time()) if received_at is None else received_at
    if isinstance(value, _Long):
        seconds = ((value.high & 0xFFFFFFFF) << 32) | (value.low & 0xFFFFFFFF)
    elif isinstance(value, str):
        try:
            seconds = int(float(value.strip()))
        except (ValueError, OverflowError):
            return None
    else:
        seconds = int(value)
    if seconds > 100_000_000_000:  # milliseconds
        seconds //= 1000
    return seconds if 0 <= seconds <= _MAX_TIMESTAMP else None


def _explain(message: str, *, root: str) -> str:
    """msgspec's error in the body's terms: `data.key.id must be str, not int`."""
    match = _TYPE_ERROR.fullmatch(message)
    if match is None:
        return f"wrong type: {message}"
    expected, got, path = match.group(1), match.group(2), match.group(3)
    expected = expected.removesuffix(" | null")
    if path is None:
        # The root itself has the wrong type.
        if root == "body":
            return f"body must be a JSON object, not {got}"
        return f"data must be a message object or a list of them, not {got}"
    where = path.removeprefix("$").removeprefix(".")
    if root == "data":
        where = "data" + ("." if where and not where.startswith("[") else "") + where
    return f"{where} must be {expected}, not {got}"


_TYPE_ERROR = re.compile(r"Expected `(.+?)`, got `(.+?)`(?: - at `(.+)`)?")
