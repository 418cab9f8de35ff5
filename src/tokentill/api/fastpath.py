"""The two chat routes served without FastAPI's router: `ChatFastPath`, the innermost middleware.

A chat completion is the one request this server answers at volume. Through FastAPI it pays, on every
request, for the router's scan of every route, dependency solving for the key, the exception middleware
and an exit stack. Here `POST /v1/chat/completions` and `POST /v1/{model}` go straight to the same
handlers (`api/routes.py`: `chat_completions`, `chat_by_path`, `authenticate_cached`), and what they
raise is rendered by the same handlers the exception middleware uses (`api/errors.py`
`render_handled`); an unexpected exception still reaches the outermost handler (500 with the request
id). The routes stay registered with FastAPI, so `/openapi.json` and every other method and path are
unchanged.

Which requests are taken: exactly those FastAPI would route to a chat handler. `/v1/chat/completions`
is no other route's path, and `/v1/{model}` is a single path segment that is not the literal last
segment of another `/v1/<name>` route (`/v1/models`, `/v1/responses`, ...): those, trailing slashes and
everything else fall through to FastAPI, which routes them as before.
"""

from __future__ import annotations

from collections.abc import Iterable

from fastapi import APIRouter, Request
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokentill.api.errors import render_handled
from tokentill.api.routes import authenticate_cached, chat_by_path, chat_completions

__all__ = ["ChatFastPath", "literal_v1_names"]

_CHAT = "/v1/chat/completions"
_V1 = "/v1/"


def literal_v1_names(routers: Iterable[APIRouter]) -> frozenset[str]:
    """The `<name>` of every route path `/v1/<name>` (one literal segment) in `routers`."""
    names: set[str] = set()
    for router in routers:
        for route in router.routes:
            path = getattr(route, "path", "") if isinstance(route, BaseRoute) else ""
            name = path.removeprefix(_V1)
            if path.startswith(_V1) and name and "/" not in name and "{" not in name:
                names.add(name)
    return frozenset(names)


class ChatFastPath:
    def __init__(self, app: ASGIApp, *, taken_names: frozenset[str]) -> None:
        """`taken_names`: the `/v1/<name>` paths other routes own (`literal_v1_names`)."""
        self.app = app
        self.taken_names = taken_names

    def _model(self, scope: Scope) -> str | None:
        """'' for /v1/chat/completions, the model of /v1/{model}, or None: not a chat route."""
        if scope["type"] != "http" or scope["method"] != "POST" or scope.get("root_path"):
            return None
        path: str = scope["path"]
        if path == _CHAT:
            return ""
        name = path[len(_V1) :]
        if not path.startswith(_V1) or not name or "/" in name or name in self.taken_names:
            return None
        return name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        model = self._model(scope)
        if model is None:
            await self.app(scope, receive, send)
            return
        if model:
            scope["path_params"] = {"model": model}
        request = Request(scope, receive)
        started = False

        async def send_tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            principal = await authenticate_cached(request)
            if model:
                response = await chat_by_path(request, principal, model)
            else:
                response = await chat_completions(request, principal)
            await response(scope, receive, send_tracked)
        except Exception as exc:
            rendered = None if started else await render_handled(request, exc)
            if rendered is None:
                raise
            await rendered(scope, receive, send)
