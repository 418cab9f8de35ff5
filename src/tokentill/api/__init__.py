"""The HTTP layer: the only package that imports FastAPI/Starlette."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

from fastapi import FastAPI
from starlette.middleware import Middleware
from starlette.middleware.body_limit import RequestBodyLimitMiddleware

from tokentill.api.account import account_router
from tokentill.api.admin import admin_router
from tokentill.api.errors import install_error_handlers
from tokentill.api.middleware import RequestContextMiddleware
from tokentill.api.routes import router
from tokentill.settings import Settings

__all__ = ["build_api"]


def build_api(
    settings: Settings, lifespan: Callable[[FastAPI], AbstractAsyncContextManager[None]]
) -> FastAPI:
    app = FastAPI(
        title="tokentill",
        summary="Metered, OpenAI-compatible chat completions on hardware you own",
        version="0.1.0",
        lifespan=lifespan,
        middleware=[
            Middleware(RequestContextMiddleware, max_body_bytes=settings.max_body_bytes),
            Middleware(RequestBodyLimitMiddleware, max_body_size=settings.max_body_bytes),
        ],
    )
    install_error_handlers(app)
    app.include_router(admin_router)
    app.include_router(account_router)  # before `router`, whose POST /v1/{model} takes any /v1/<name>
    app.include_router(router)
    return app
