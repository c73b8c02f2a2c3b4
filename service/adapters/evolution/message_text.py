"""Readable text of an Evolution message, whatever its kind.

Returns None for messages that are not dialog turns (protocol messages: deletes and
edits; reactions). Media without text get a short placeholder such as `[image]`.
Binary fields and 64-bit numbers arrive in odd shapes: never fail on them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Not dialog turns.
SKIPPED_TYPES = frozenset(
    {
        "protocolMessage",
        "reactionMessage",
        "senderKeyDistributionMessage",
        "messageContextInfo",
        "pollUpdateMessage",
        "keepInChatMessage",
        "editedMessage",
    }
)

# Wrappers that hold another message inside (`<wrapper>.message`). Evolution skips only a
# top-level protocolMessage (whatsapp.baileys.service.ts, messages.upsert): a protocol
# message or reaction inside one of these, such as the "disappearing messages turned on"
# notice, is stored and sent with messageType `ephemeralMessage`.
WRAPPER_TYPES = (
    "ephemeralMessage",
    "viewOnceMessage",
    "viewOnceMessageV2",
    "viewOnceMessageV2Extension",
)
# Inner messages that make a wrapped message no dialog turn.
WRAPPED_NON_TURNS = ("protocolMessage", "reactionMessage")

_PLACEHOLDERS = {
    "imageMessage": "[image]",
    "videoMessage": "[video]",
    "ptvMessage": "[video]",
    "audioMessage": "[audio]",
    "documentMessage": "[document]",
    "documentWithCaptionMessage": "[document]",
    "stickerMessage": "[sticker]",
    "locationMessage": "[location]",
    "liveLocationMessage": "[location]",
    "contactMessage": "[contact]",
    "contactsArrayMessage": "[contacts]",
    "pollCreationMessage": "[poll]",
    "pollCreationMessageV3": "[poll]",
    "buttonsResponseMessage": "[button]",
    "listResponseMessage": "[list reply]",
    "templateButtonReplyMessage": "[button]",
    "interactiveResponseMessage": "[reply]",
    "buttonsMessage": "[buttons]",
    "listMessage": "[list]",
    "templateMessage": "[template]",
    "interactiveMessage": "[message]",
    "orderMessage": "[order]",
    "productMessage": "[product]",
    "eventMessage": "[event]",
    "viewOnceMessage": "[view once]",
    "viewOnceMessageV2": "[view once]",
}


def _s(value: Any) -> str | None:
    if isinstance(value, str):
        value = value.strip()
        return value or None
    return None


def _get(obj: Any, *path: str) -> Any:
    for part in path:
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(part)
    return obj


def _items(value: Any) -> list[Any]:
    """A stored list, or nothing when the field holds something else."""
    return value if isinstance(value, list) else []


def _join(*parts: str | None) -> str | None:
    kept = [p for p in parts if p]
    return " ".join(kept) if kept else None


def message_text(message: Any, message_type: str | None) -> str | None:
    """Text of one message; None when it is not a dialog turn."""
    if message_type in SKIPPED_TYPES:
        return None
    if not isinstance(message, Mapping):
        return _PLACEHOLDERS.get(message_type or "", "[message]")
    for skipped in ("protocolMessage", "reactionMessage"):
        if skipped in message and message_type in (None, "", skipped):
            return None
    if message_type in (None, "") and (
        "protocolMessage" in message or "reactionMessage" in message
    ):
        return None

    # Transcription of a voice note, when Evolution's speech-to-text is on.
    stt = _s(message.get("speechToText"))
    if stt:
        return stt if stt.startswith("[audio]") else f"[audio] {stt}"

    text = _s(message.get("conversation")) or _s(_get(message, "extendedTextMessage", "text"))
    if text:
        return text

    # Wrappers that hold another message inside.
    for wrapper in (*WRAPPER_TYPES, "documentWithCaptionMessage", "editedMessage"):
        inner = _get(message, wrapper, "message")
        if isinstance(inner, Mapping):
            if wrapper in WRAPPER_TYPES and any(k in inner for k in WRAPPED_NON_TURNS):
                return None
            inner_type = next((k for k in inner if k.endswith("Message")), None)
            found = message_text(inner, inner_type)
            if found:
                return found

    extracted = _typed_text(message)
    if extracted:
        return extracted
    kind = message_type if message_type in _PLACEHOLDERS else None
    if kind is None:
        kind = next((k for k in message if k in _PLACEHOLDERS), None)
    if kind is not None:
        return _PLACEHOLDERS[kind]
    return "[message]"


def _typed_text(message: Mapping[str, Any]) -> str | None:
    caption = (
        _s(_get(message, "imageMessage", "caption"))
        or _s(_get(message, "videoMessage", "caption"))
        or _s(_get(message, "ptvMessage", "caption"))
    )
    if caption:
        kind = "[image]" if "imageMessage" in message else "[video]"
        return f"{kind} {caption}"
    doc = message.get("documentMessage")
    if isinstance(doc, Mapping):
        return _join(
            "[document]", _s(doc.get("fileName")) or _s(doc.get("title")), _s(doc.get("caption"))
        )
    if "audioMessage" in message:
        return "[audio]"
    choice = (
        _s(_get(message, "buttonsResponseMessage", "selectedDisplayText"))
        or _s(_get(message, "templateButtonReplyMessage", "selectedDisplayText"))
        or _s(_get(message, "listResponseMessage", "title"))
        or _s(_get(message, "listResponseMessage", "singleSelectReply", "selectedRowId"))
        or _s(_get(message, "interactiveResponseMessage", "body", "text"))
    )
    if choice:
        return choice
    for loc_key in ("locationMessage", "liveLocationMessage"):
        loc = message.get(loc_key)
        if isinstance(loc, Mapping):
            where = _join(_s(loc.get("name")), _s(loc.get("address"))) or _s(loc.get("caption"))
            return _join("[location]", where)
    contact = message.get("contactMessage")
    if isinstance(contact, Mapping):
        return _join("[contact]", _s(contact.get("displayName")))
    contacts = message.get("contactsArrayMessage")
    if isinstance(contacts, Mapping):
        names = [
            _s(c.get("displayName"))
            for c in _items(contacts.get("contacts"))
            if isinstance(c, Mapping)
        ]
        return _join(
            "[contacts]", ", ".join(n for n in names if n) or _s(contacts.get("displayName"))
        )
    for poll_key in ("pollCreationMessage", "pollCreationMessageV2", "pollCreationMessageV3"):
        poll = message.get(poll_key)
        if isinstance(poll, Mapping):
            options = [
                _s(o.get("optionName"))
                for o in _items(poll.get("options"))
                if isinstance(o, Mapping)
            ]
            opts = " / ".join(o for o in options if o)
            return _join("[poll]", _s(poll.get("name")), f"({opts})" if opts else None)
    return None
