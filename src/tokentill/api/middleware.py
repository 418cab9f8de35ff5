"""Pure ASGI middleware (never BaseHTTPMiddleware: it breaks streaming and contextvars).

`RequestContextMiddleware` gives every request an id (`x-request-id` on every response, in every log line
about it) and refuses a declared `Content-Length` over the cap before anything reads the body; Starlette's
`RequestBodyLimitMiddleware`, inside it, counts the bytes of bodies that declare no length.
`ResponseMetricsMiddleware`, outside both, counts every response by status and error code: the code is the
one the error renderer left in the request's state (`error_code`), so refusals (401, 402, 429, 413, ...)
count like answers, and an exception that escapes every handler counts as 500 `internal_error`.
"""

from __future__ import annotations

import contextvars
import json
import logging
import secrets

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokentill.errors import RequestTooLarge
from tokentill.metrics import observe_response

__all__ = [
    "RequestContextMiddleware",
    "RequestIdFilter",
    "ResponseMetricsMiddleware",
    "current_request_id",
    "new_request_id",
]

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


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, *, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        token = _request_id.set(request_id)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            declared = Headers(scope=scope).get("content-length", "")
            if declared.isascii() and declared.isdigit() and int(declared) > self.max_body_bytes:
                await self._too_large(scope, send_with_id)
                return
            await self.app(scope, receive, send_with_id)
        finally:
            _request_id.reset(token)

    async def _too_large(self, scope: Scope, send: Send) -> None:
        error = RequestTooLarge(
            f"The request body is larger than the {self.max_body_bytes} bytes this server accepts."
        )
        scope.setdefault("state", {})["error_code"] = error.code
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


class ResponseMetricsMiddleware:
    """Counts every HTTP response once, by status and error code (`tokentill_http_responses_total`)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        status = 0

        async def send_counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                code = str(state.get("error_code") or "") if status >= 400 else ""
                observe_response(status, code)
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        except Exception:
            if not status:  # the outermost handler renders it as a 500 after this middleware
                observe_response(500, "internal_error")
            raise
