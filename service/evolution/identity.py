"""Who a message belongs to: the contact's phone JID, whatever form Evolution used.

Evolution moved the phone number between `remoteJid`, `remoteJidAlt` and `senderPn`
across versions; the robust rule is "whichever of them ends in @s.whatsapp.net".
Groups, broadcast status and newsletters are never contacts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

PHONE_SUFFIX = "@s.whatsapp.net"
_NOT_CONTACT_SUFFIXES = ("@g.us", "@broadcast", "@newsletter")
_JID_FIELDS = ("remoteJid", "remoteJidAlt", "senderPn")


def is_non_contact_chat(remote_jid: str | None) -> bool:
    """Groups, status@broadcast and channels: never leads."""
    return bool(remote_jid) and str(remote_jid).endswith(_NOT_CONTACT_SUFFIXES)


def phone_jid(key: Mapping[str, Any]) -> str | None:
    """The contact's phone JID from a message key, or None when it has none."""
    if is_non_contact_chat(key.get("remoteJid")):
        return None
    for field in _JID_FIELDS:
        value = key.get(field)
        if isinstance(value, str) and value.endswith(PHONE_SUFFIX):
            digits = value[: -len(PHONE_SUFFIX)].split(":", 1)[0]
            if digits.isdigit():
                return digits + PHONE_SUFFIX
    return None


def phone_digits(jid: str) -> str:
    return jid.split("@", 1)[0].split(":", 1)[0]


def normalize_phone(raw: str) -> str:
    """Digits only (for phones typed by people: '+7 (701) 234-56-01')."""
    return "".join(ch for ch in raw if ch.isdigit())


# SQL twin of `phone_jid`, for the reader's queries and the expression index. Kept as
# one IMMUTABLE expression so PostgreSQL can index it. `{k}` is the jsonb key column.
PHONE_JID_SQL = (
    "(CASE"
    " WHEN {k}->>'remoteJid' LIKE '%@g.us' OR {k}->>'remoteJid' LIKE '%@broadcast'"
    " OR {k}->>'remoteJid' LIKE '%@newsletter' THEN NULL"
    " WHEN {k}->>'remoteJid' LIKE '%@s.whatsapp.net' THEN {k}->>'remoteJid'"
    " WHEN {k}->>'remoteJidAlt' LIKE '%@s.whatsapp.net' THEN {k}->>'remoteJidAlt'"
    " WHEN {k}->>'senderPn' LIKE '%@s.whatsapp.net' THEN {k}->>'senderPn'"
    " END)"
)


def phone_jid_sql(key_column: str = '"key"') -> str:
    return PHONE_JID_SQL.format(k=key_column)
