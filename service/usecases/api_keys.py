"""Account-bound API keys: the key is shown once, only its SHA-256 is stored.

A key is `crm_` + 43 URL-safe characters (256 random bits), so a hash without salt or
stretching is enough: there is nothing to guess. Its first characters (`prefix`) name it
in `keys list` and `keys revoke`.
"""

from __future__ import annotations

import hashlib
import secrets
import uuid

from service.adapters.stores.base import ApiKey, ResultsStore

KEY_MARK = "crm_"
_PREFIX_CHARS = 12


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def key_prefix(key: str) -> str:
    """A key's public reference (what `keys list` shows): never enough to use it."""
    return key[:_PREFIX_CHARS]


def looks_like_key(token: str) -> bool:
    return token.startswith(KEY_MARK) and len(token) > _PREFIX_CHARS


async def create_key(
    store: ResultsStore, account: uuid.UUID, name: str | None
) -> tuple[str, ApiKey]:
    """(the new key, its stored record): the key itself is not kept anywhere."""
    key = KEY_MARK + secrets.token_urlsafe(32)
    record = await store.create_api_key(key_hash(key), key_prefix(key), account, name)
    return key, record


async def key_account(store: ResultsStore, key: str) -> uuid.UUID | None:
    """The account of an active key, else None."""
    return await store.api_key_account(key_hash(key))
