"""Pure ASGI middleware (never BaseHTTPMiddleware: it breaks streaming and contextvars).

`RequestMiddleware` is one layer for what every HTTP request needs (one layer, not four: each costs a
coroutine frame and a `send`/`receive` wrapper per message on the hot path):

* an id: `x-request-id` on every response, in every log line about it (`RequestIdFilter`);
* the body cap: a declared `Content-Length` over it is refused (413) before anything reads the body, and
  the bytes of a body that declares no length are counted as they arrive (`RequestTooLarge`, rendered by
  the error handlers, once the body passes the cap);
* the body's read timeout: the body must be complete `read_timeout_s` after the headers; a `receive` that
  would wait past that raises `RequestTimeout` (408, `Connection: close`). The time before the headers
  is `GuardedHttpProtocol`'s (api/connections.py);
* the response counter: every response once, by status and error code (`tokentill_http_responses_total`);
  the code is the one the error renderer left in the request's state (`error_code`), so refusals (401,
  402, 429, 413, ...) count like answers, and an exception that escapes every handler counts as 500
  `internal_error`.
"""

from __future__ import annotations

import contextvars
import json
import logging
import secrets
import time

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokentill.api.connections import TIMEOUT_MESSAGE
from tokentill.errors import RequestTimeout, RequestTooLarge
from tokentill.metrics import observe_response

__all__ = ["RequestIdFilter", "RequestMiddleware", "current_request_id", "new_request_id"]

_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("tokentill_request_id", default="-")


def new_request_id() -> str:
    return "req_" + secrets.token_hex(12)


def current_request_id() -> str:
    return _request_id.get()


class RequestIdFilter(logging.Filter):
    """Gives every log record `request_id`: the id of the request being handled where it was logged
    (worker threads started with `anyio.to_thread` inherit it), else "-"."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = current_request_id()
        return True


class RequestMiddleware:
    """Request id, body cap, body read timeout and the response counter (see the module docstring)."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, read_timeout_s: float) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.read_timeout_s = read_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = new_request_id()
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["response_status"] = 0  # set when the response starts (`request.state.response_status`)
        token = _request_id.set(request_id)
        id_header = (b"x-request-id", request_id.encode())
        status = 0
        deadline = time.monotonic() + self.read_timeout_s
        received = 0
        body_done = False

        async def send_wrapped(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = state["response_status"] = int(message["status"])
                observe_response(status, str(state.get("error_code") or "") if status >= 400 else "")
                message = {**message, "headers": [*message.get("headers", ()), id_header]}
            await send(message)

        async def receive_wrapped() -> Message:
            nonlocal body_done, received
            if body_done:  # afterwards receive() only waits for a disconnect (streaming): no limit
                return await receive()
            with anyio.move_on_after(deadline - time.monotonic()):
                message = await receive()
                if message["type"] != "http.request":
                    body_done = True
                    return message
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise RequestTooLarge("The request body is larger than this server accepts.")
                body_done = not message.get("more_body", False)
                return message
            raise RequestTimeout(TIMEOUT_MESSAGE.format(limit=self.read_timeout_s))

        try:
            declared = _content_length(scope)
            if declared is not None and declared > self.max_body_bytes:
                await self._too_large(state, send_wrapped)
                return
            await self.app(scope, receive_wrapped, send_wrapped)
        except Exception:
            if not status:  # the outermost handler renders it as a 500 after this middleware
                observe_response(500, "internal_error")
            raise
        finally:
            _request_id.reset(token)

    async def _too_large(self, state: dict[str, object], send: Send) -> None:
        error = RequestTooLarge(
            f"The request body is larger than the {self.max_body_bytes} bytes this server accepts."
        )
        state["error_code"] = error.code
        body = json.dumps(error.body()).encode()
        await send(
            {
                "type": "http.response.start",
                "status": error.status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _content_length(scope: Scope) -> int | None:
    """The declared `Content-Length` when it is a plain number."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None
