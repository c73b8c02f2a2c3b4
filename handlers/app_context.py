"""Where a handler finds the process's parts: one application key, set once by make_app."""

from __future__ import annotations

from aiohttp import web

from service.bootstrap.context import AppContext

CTX: web.AppKey[AppContext] = web.AppKey("ctx", AppContext)


def context(request: web.Request) -> AppContext:
    return request.app[CTX]
