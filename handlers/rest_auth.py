"""Bearer-token authentication of every route but `/health` and the webhooks.

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

from handlers.errors import Handler, error_response
from handlers.webhooks import ROUTES as WEBHOOK_ROUTES
from service.config import Settings

OPEN_ROUTES = frozenset({"/health", *WEBHOOK_ROUTES})
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

    @web.middleware
    async def rest_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if disabled or _route_path(request) in OPEN_ROUTES:
            return await handler(request)
        if not expected:
            # Fail closed: `serve` refuses to start like this, but an embedding app might not.
            return error_response(
                401, "API_TOKEN is not configured on the server", None, _CHALLENGE
            )
        given = bearer_token(request.headers.get("Authorization"))
        if given is None:
            return error_response(
                401, "missing Authorization: Bearer <API_TOKEN> header", None, _CHALLENGE
            )
        # surrogateescape: header bytes that are not UTF-8 compare unequal, never raise.
        if not hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected):
            logger.info("REST request with a wrong API token refused: {}", request.path)
            return error_response(401, "invalid API token", None, _CHALLENGE)
        return await handler(request)

    return rest_auth
