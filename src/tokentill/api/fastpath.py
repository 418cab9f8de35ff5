"""The two chat routes served without FastAPI: `ChatFastPath`, just inside `RequestMiddleware`.

A chat completion is the one request this server answers at volume. Through FastAPI it pays, on every
request, for its telemetry check, the error and exception middlewares (each wraps every message sent),
the router's scan of every route, dependency solving for the key and an exit stack. Here `POST
/v1/chat/completions` and `POST /v1/{model}` go straight to the same handlers (`api/routes.py`:
`chat_completions`, `chat_by_path`, `authenticate_cached`), and what they raise is rendered by the same
handlers FastAPI's middlewares use (`api/errors.py`: `render_handled`, and `render_bug` for anything
unexpected, a 500 with the request id). `api.TokentillAPI` puts this in front of FastAPI; every other
request falls through to FastAPI's own stack. The routes stay registered with FastAPI, so
`/openapi.json` is unchanged.

Which requests are taken: exactly those FastAPI would route to a chat handler. `/v1/chat/completions`
is no other route's path, and `/v1/{model}` is a single path segment that is not the literal last
segment of another `/v1/<name>` route (`/v1/models`, `/v1/responses`, ...): those, trailing slashes and
everything else fall through to FastAPI, which routes them as before.
"""

from __future__ import annotations

from collections.abc import Iterable

from fastapi import APIRouter, Request
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from tokentill.api.errors import render_bug, render_handled
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
        try:
            principal = await authenticate_cached(request)
            if model:
                response = await chat_by_path(request, principal, model)
            else:
                response = await chat_completions(request, principal)
            await response(scope, receive, send)
        except Exception as exc:
            if request.state.response_status:  # under way (RequestMiddleware): the connection is closed
                raise
            rendered = await render_handled(request, exc) or render_bug(request, exc)
            await rendered(scope, receive, send)
