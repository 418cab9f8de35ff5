"""The HTTP layer: the only package that imports FastAPI/Starlette."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from fastapi import FastAPI
from starlette.middleware import Middleware
from starlette.staticfiles import StaticFiles

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

__all__ = ["build_api"]


def build_api(
    settings: Settings, lifespan: Callable[[FastAPI], AbstractAsyncContextManager[None]]
) -> FastAPI:
    routers = [docs_router, admin_router, console_router, account_router, responses_router, router]
    app = FastAPI(
        title="tokentill",
        summary="Metered, OpenAI-compatible chat completions on hardware you own",
        version="0.1.0",
        lifespan=lifespan,
        # /docs is ours (assets from the package, api/docs.py); no /redoc, which would need a CDN.
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json" if settings.docs_enabled else None,
        middleware=[
            Middleware(
                RequestMiddleware,
                max_body_bytes=settings.max_body_bytes,
                read_timeout_s=settings.read_timeout_s,
            ),
            Middleware(ChatFastPath, taken_names=literal_v1_names(routers)),
        ],
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
