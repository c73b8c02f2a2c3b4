"""aiohttp application factory: routes of every handler module, wired to one AppContext."""

from __future__ import annotations

from aiohttp import web

from handlers import dialogs, health, openapi, ready, webhooks
from handlers.app_context import CTX
from handlers.http_errors import error_middleware
from handlers.request_id import request_context
from handlers.rest_auth import make_auth_middleware
from handlers.server import handler_args
from service.bootstrap.context import AppContext


def make_app(ctx: AppContext) -> web.Application:
    app = web.Application(
        client_max_size=ctx.settings.webhook_max_body_bytes,
        handler_args=handler_args(ctx.settings),
    )
    app[CTX] = ctx
    if ctx.settings.log_level not in ("TRACE", "DEBUG"):
        # Webhooks skip the middlewares below (handlers.webhooks.lean_middleware).
        app.middlewares.append(webhooks.lean_middleware())
    app.middlewares.append(request_context)  # first, so outermost
    health.setup(app)
    webhooks.setup(app)
    # JSON errors around everything, then the bearer check (which skips /health and the
    # webhooks, as they authenticate on their own).
    app.middlewares.append(error_middleware)
    app.middlewares.append(make_auth_middleware(ctx.settings))
    dialogs.setup(app)
    ready.setup(app)
    openapi.setup(
        app,
        [ep for module in (dialogs, ready, health) for ep, _ in module.ROUTES],
        auth_disabled=ctx.settings.auth_disabled,
    )
    return app
