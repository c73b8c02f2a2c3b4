"""Bearer authentication of every route but `/health` and the webhooks.

Three credentials: API_TOKEN, the platform-wide admin (any `userAccountId`); an API key
made by `crm-backend keys create` (`crm_…`), bound to one account; a Supabase Auth access
token, bound to the signed-in user's account. With a bound credential the account comes
from the credential: a request naming another one gets 404, as a foreign lead does
(`handlers.http_errors` applies it where requests are decoded).

The webhook routes check Evolution's credentials themselves (`handlers.webhooks`). The
decision is taken on the matched route, not on the raw path, so no spelling of a URL can
reach a protected handler through an open prefix. Unknown paths need the token too (an
anonymous caller learns nothing about which routes exist).
"""

from __future__ import annotations

import hmac

from aiohttp import web
from aiohttp.typedefs import Middleware
from loguru import logger

from handlers.app_context import context
from handlers.http_errors import Handler, error_response
from handlers.principal import Principal, set_principal
from handlers.webhooks import ROUTES as WEBHOOK_ROUTES
from service.adapters.user_tokens import UserTokens
from service.config import Settings
from service.usecases.api_keys import key_account, key_prefix, looks_like_key
from service.usecases.intake_guard import bounded

OPEN_ROUTES = frozenset({"/health", *WEBHOOK_ROUTES})
# Platform-wide figures: the admin credential only.
ADMIN_ROUTES = frozenset({"/metrics"})
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="crm-backend"'}


def _route_path(request: web.Request) -> str | None:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else None


def bearer_token(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def make_auth_middleware(settings: Settings) -> Middleware:
    expected = (settings.api_token or "").encode()
    disabled = settings.auth_disabled
    users = UserTokens(settings)

    @web.middleware
    async def rest_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if _route_path(request) in OPEN_ROUTES:
            return await handler(request)
        if disabled:
            set_principal(request, Principal(kind="open"))
            return await handler(request)
        given = bearer_token(request.headers.get("Authorization"))
        if given is None:
            return error_response(
                401, "missing Authorization: Bearer <API_TOKEN> header", None, _CHALLENGE
            )
        principal = await _principal(request, given, expected, users)
        if isinstance(principal, str):
            logger.info("REST request refused ({}): {}", principal, bounded(request.path, 100))
            return error_response(401, principal, None, _CHALLENGE)
        if principal.account is not None and _route_path(request) in ADMIN_ROUTES:
            return error_response(403, "this endpoint needs the platform's API_TOKEN")
        set_principal(request, principal)
        return await handler(request)

    return rest_auth


async def _principal(
    request: web.Request, given: str, expected: bytes, users: UserTokens
) -> Principal | str:
    """Who `given` is, or why it is refused (words safe to return)."""
    # surrogateescape: header bytes that are not UTF-8 compare unequal, never raise.
    if expected and hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected):
        return Principal(kind="admin", ref="admin")
    if looks_like_key(given):
        account = await key_account(context(request).store, given)
        if account is None:
            return "invalid API key"
        return Principal(kind="key", account=account, ref=key_prefix(given))
    if users.configured and given.count(".") == 2:
        verdict = await users.identify(given)
        if isinstance(verdict, str):
            return verdict
        account, user = verdict
        return Principal(kind="user", account=account, ref=f"user:{user}")
    if not expected:
        # Fail closed: `serve` refuses to start like this, but an embedding app might not.
        return "API_TOKEN is not configured on the server"
    return "invalid API token"
