"""aiohttp application factory: routes of every handler module, wired to one AppContext."""

from __future__ import annotations

from aiohttp import web

from service.context import AppContext

CTX: web.AppKey[AppContext] = web.AppKey("ctx", AppContext)


def context(request: web.Request) -> AppContext:
    return request.app[CTX]


def make_app(ctx: AppContext) -> web.Application:
    # Imported here so that building one part of the app never imports another's deps.
    from handlers import health, webhooks

    app = web.Application(client_max_size=ctx.settings.webhook_max_body_bytes)
    app[CTX] = ctx
    health.setup(app)
    webhooks.setup(app)
    try:
        from handlers import dialogs
    except ImportError:  # pragma: no cover - REST module not present in every build stage
        pass
    else:
        dialogs.setup(app)
    return app
