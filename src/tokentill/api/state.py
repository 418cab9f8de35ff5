"""Typed access to the services the lifespan put on `app.state`."""

from __future__ import annotations

from typing import cast

from starlette.requests import Request

from tokentill.services import Services

__all__ = ["services_of"]


def services_of(request: Request) -> Services:
    return cast(Services, request.app.state.services)
