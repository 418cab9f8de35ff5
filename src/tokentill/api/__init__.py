"""The HTTP layer: the only package that imports FastAPI/Starlette."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from fastapi import FastAPI
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from tokentill.api.account import account_router
from tokentill.api.admin import admin_router
from tokentill.api.console import console_router
from tokentill.api.docs import STATIC_DIR, docs_router
from tokentill.api.errors import install_error_handlers
from tokentill.api.fastpath import ChatFastPath, literal_v1_names
from tokentill.api.middleware import RequestMiddleware
from tokentill.api.openapi import install_openapi
from tokentill.api.responses import responses_router
from tokentill.api.routes import router
from tokentill.settings import Settings

__all__ = ["TokentillAPI", "build_api"]


class TokentillAPI(FastAPI):
    """FastAPI with our request layer in front of it: every HTTP request passes `RequestMiddleware` (id,
    body cap, read timeout, response counter), then `ChatFastPath`, which answers the two chat routes
    itself and hands everything else to FastAPI's own stack (its error middleware, routing, handlers).
    Outside FastAPI, a chat completion pays for none of its layers (exception and telemetry middlewares,
    the router's scan), each of which wraps every message sent."""

    front: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.front is None:
            await super().__call__(scope, receive, send)
            return
        scope["app"] = self  # what Starlette sets: `Request.app` for the handlers
        await self.front(scope, receive, send)

    async def fastapi(self, scope: Scope, receive: Receive, send: Send) -> None:
        """FastAPI's own handling of a request (`ChatFastPath`'s fall-through)."""
        await super().__call__(scope, receive, send)


def build_api(
    settings: Settings, lifespan: Callable[[FastAPI], AbstractAsyncContextManager[None]]
) -> FastAPI:
    routers = [docs_router, admin_router, console_router, account_router, responses_router, router]
    app = TokentillAPI(
        title="tokentill",
        summary="Metered, OpenAI-compatible chat completions on hardware you own",
        version="0.1.0",
        lifespan=lifespan,
        # /docs is ours (assets from the package, api/docs.py); no /redoc, which would need a CDN.
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json" if settings.docs_enabled else None,
    )
    app.front = RequestMiddleware(
        ChatFastPath(app.fastapi, taken_names=literal_v1_names(routers)),
        max_body_bytes=settings.max_body_bytes,
        read_timeout_s=settings.read_timeout_s,
    )
    install_error_handlers(app)
    if settings.docs_enabled:
        app.include_router(docs_router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.include_router(admin_router)
    app.include_router(console_router)
    app.include_router(account_router)  # before `router`, whose POST /v1/{model} takes any /v1/<name>
    app.include_router(responses_router)  # before `router` too
    app.include_router(router)
    install_openapi(app)
    return app
