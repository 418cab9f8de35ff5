"""`ChatFastPath` takes exactly the requests FastAPI would route to a chat handler: POST
/v1/chat/completions and POST /v1/{model} for a name no other /v1 route owns; the rest falls through."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokentill.api.fastpath import ChatFastPath
from tokentill.api.middleware import RequestMiddleware
from tokentill.app import create_app
from tokentill.settings import Settings


def _fast_path(tmp_path: Path) -> ChatFastPath:
    app = create_app(Settings(data_dir=tmp_path))
    front = app.front  # RequestMiddleware, then ours, then FastAPI
    assert isinstance(front, RequestMiddleware) and isinstance(front.app, ChatFastPath)
    assert front.app.app == app.fastapi  # what is not a chat completion goes to FastAPI's own stack
    return front.app


@pytest.mark.parametrize(
    ("method", "path", "model"),
    [
        ("POST", "/v1/chat/completions", ""),
        ("POST", "/v1/o1-preview", "o1-preview"),
        ("POST", "/v1/models", None),  # another route's path: left to FastAPI, whatever it answers
        ("POST", "/v1/responses", None),  # the Responses API
        ("POST", "/v1/chat/completions/", None),  # the router's redirect
        ("POST", "/v1/a/b", None),
        ("POST", "/v1/", None),
        ("GET", "/v1/chat/completions", None),  # 405 with Allow, from the router
        ("POST", "/admin/accounts", None),
    ],
)
def test_which_requests_take_the_fast_path(tmp_path: Path, method: str, path: str, model: str | None) -> None:
    fast = _fast_path(tmp_path)
    scope = {"type": "http", "method": method, "path": path, "root_path": ""}
    assert fast._model(scope) == model


def test_every_literal_v1_route_falls_through(tmp_path: Path) -> None:
    fast = _fast_path(tmp_path)
    assert {"models", "responses"} <= fast.taken_names
    for name in fast.taken_names:
        assert fast._model({"type": "http", "method": "POST", "path": f"/v1/{name}"}) is None
