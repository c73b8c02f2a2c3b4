"""Who a REST request acts for: the admin (API_TOKEN), or one account (an API key or a
Supabase Auth user). Set by `rest_auth`, read where a request names its account."""

from __future__ import annotations

import uuid
from typing import Literal

import msgspec
from aiohttp import web


class Principal(msgspec.Struct, frozen=True, kw_only=True):
    kind: Literal["admin", "key", "user", "open"]
    account: uuid.UUID | None = None  # None: every account (admin, AUTH_DISABLED)
    # Who, as the lead history names a manual edit: the API key's public prefix,
    # `user:<id>` for a Supabase user, `admin` for API_TOKEN; never a secret.
    ref: str | None = None


_KEY: web.RequestKey[Principal] = web.RequestKey("principal", Principal)


def set_principal(request: web.Request, principal: Principal) -> None:
    request[_KEY] = principal


def bound_account(request: web.Request) -> uuid.UUID | None:
    """The one account the request may touch, or None when it may touch any."""
    principal = request.get(_KEY)
    return principal.account if principal is not None else None


def principal_ref(request: web.Request) -> str | None:
    """The credential's public reference (see `Principal.ref`), None when unauthenticated."""
    principal = request.get(_KEY)
    return principal.ref if principal is not None else None
