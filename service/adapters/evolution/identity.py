"""Who a message belongs to: the contact's phone JID, whatever form Evolution used.

Evolution moved the phone number between `remoteJid`, `remoteJidAlt` and `senderPn`
across versions; the robust rule is "whichever of them ends in @s.whatsapp.net".
Groups, broadcast status and newsletters are never contacts.

Each rule has a Python form (for webhook events) and an SQL twin (for the reader's
queries and the expression indexes); the two must agree row for row.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from service.domain.dialog import PHONE_SUFFIX as PHONE_SUFFIX

LID_SUFFIX = "@lid"
_NOT_CONTACT_SUFFIXES = ("@g.us", "@broadcast", "@newsletter")
_JID_FIELDS = ("remoteJid", "remoteJidAlt", "senderPn")
_LID_FIELDS = ("remoteJid", "remoteJidAlt")
# A phone JID's user part starts with a digit: this rejects placeholders such as
# `undefined@s.whatsapp.net`. A full digit check would cost more in SQL than the rest of
# the expression, which runs for every message of an instance in the contacts aggregate.
_DIGITS = frozenset("0123456789")


def is_non_contact_chat(remote_jid: str | None) -> bool:
    """Groups, status@broadcast and channels: never leads."""
    return bool(remote_jid) and str(remote_jid).endswith(_NOT_CONTACT_SUFFIXES)


def phone_jid(key: Mapping[str, Any], owner: str | None = None) -> str | None:
    """The contact's phone JID from a message key, or None when it has none.

    `owner` is the business's own phone JID: never a contact (the reader's SQL applies
    the same rule with NULLIF on the instance's ownerJid).
    """
    if is_non_contact_chat(key.get("remoteJid")):
        return None
    for field in _JID_FIELDS:
        value = key.get(field)
        if isinstance(value, str) and value.endswith(PHONE_SUFFIX) and value[0] in _DIGITS:
            # A device part (`<digits>:12@…`) is dropped.
            found = value.split(":", 1)[0] + PHONE_SUFFIX if ":" in value else value
            return None if found == owner else found
    return None


def owner_jid(sender: str | None) -> str | None:
    """The business's phone JID from a webhook body's `sender` (or "Instance"."ownerJid")."""
    if not sender or not sender.endswith(PHONE_SUFFIX) or sender[0] not in _DIGITS:
        return None
    return phone_digits(sender) + PHONE_SUFFIX


def lid_jid(key: Mapping[str, Any]) -> str | None:
    """The privacy-addressed id (`<digits>@lid`) a message key carries, if any."""
    if is_non_contact_chat(key.get("remoteJid")):
        return None
    for field in _LID_FIELDS:
        value = key.get(field)
        if isinstance(value, str) and value.endswith(LID_SUFFIX):
            return value
    return None


def phone_digits(jid: str) -> str:
    return jid.split("@", 1)[0].split(":", 1)[0]


def normalize_phone(raw: str) -> str:
    """Digits only (for phones typed by people: '+7 (701) 234-56-01')."""
    return "".join(ch for ch in raw if ch.isdigit())


_NOT_CONTACT_SQL = (
    " WHEN {rj} LIKE '%@g.us' OR {rj} LIKE '%@broadcast' OR {rj} LIKE '%@newsletter' THEN NULL"
)


def _phone_branch(value: str) -> str:
    # LIKE, ascii() and strpos() only: PostgreSQL's regular expressions (and even ltrim
    # with a character set) cost several times more per row.
    return (
        f" WHEN {value} LIKE '%{PHONE_SUFFIX}' AND ascii({value}) BETWEEN 48 AND 57 THEN"
        f" CASE WHEN strpos({value}, ':') = 0 THEN {value}"
        f" ELSE split_part({value}, ':', 1) || '{PHONE_SUFFIX}' END"
    )


def phone_jid_sql_from(remote_jid: str, key_column: str) -> str:
    """`phone_jid_sql` with `remoteJid` already extracted into the SQL value `remote_jid`.

    The common case (a phone chat) is tested first; a phone chat is never a group, so the
    order gives the same answer as `phone_jid`.
    """
    return (
        "(CASE"
        + _phone_branch(remote_jid)
        + _NOT_CONTACT_SQL.format(rj=remote_jid)
        + "".join(_phone_branch(f"{key_column}->>'{field}'") for field in _JID_FIELDS[1:])
        + " END)"
    )


# SQL twin of `phone_jid`, for the reader's queries and the expression index. Kept as
# one IMMUTABLE expression so PostgreSQL can index it. `{k}` is the jsonb key column.
PHONE_JID_SQL = phone_jid_sql_from("{k}->>'remoteJid'", "{k}")

# SQL twin of `lid_jid`.
LID_JID_SQL = (
    "(CASE"
    + _NOT_CONTACT_SQL.format(rj="{k}->>'remoteJid'")
    + " WHEN {k}->>'remoteJid' LIKE '%@lid' THEN {k}->>'remoteJid'"
    " WHEN {k}->>'remoteJidAlt' LIKE '%@lid' THEN {k}->>'remoteJidAlt'"
    " END)"
)


def phone_jid_sql(key_column: str = '"key"') -> str:
    return PHONE_JID_SQL.format(k=key_column)


def lid_jid_sql(key_column: str = '"key"') -> str:
    return LID_JID_SQL.format(k=key_column)
