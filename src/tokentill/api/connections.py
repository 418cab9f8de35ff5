"""Slow and idle clients are cut off; open connections are capped (TOKENTILL_READ_TIMEOUT_S,
TOKENTILL_KEEPALIVE_TIMEOUT_S, TOKENTILL_MAX_CONNECTIONS).

Two layers, because the application sees a request only once its headers are complete:

* `GuardedHttpProtocol`, uvicorn's httptools protocol with three timers and a cap (given to uvicorn as
  its `http` protocol by `tokentill serve`):

      connection made ── over max_connections? ── 503 envelope, close
             │ idle timer (keepalive_timeout_s; uvicorn's own runs after each response)
      first byte of a request ── header timer (read_timeout_s) ── 408 envelope, close
      headers complete ── the app runs; backstop timer (read_timeout_s + grace)
      body complete ── timers off

  The backstop covers a body nobody reads (an app that answered early, e.g. 401, while the client keeps
  trickling): it closes the connection, with a 408 envelope when no response has started.

* `RequestMiddleware` (api/middleware.py), inside the app: the body must be complete `read_timeout_s` after
  the headers; a `receive` that would wait past that raises `RequestTimeout`, which the error handlers
  render as the 408 envelope with `Connection: close`, with the request id, like every other error.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterable
from typing import Any, cast

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from tokentill.errors import APIError, Overloaded, RequestTimeout
from tokentill.metrics import observe_response

__all__ = ["TIMEOUT_MESSAGE", "CoalescedWrites", "GuardedHttpProtocol"]

log = logging.getLogger(__name__)

_BACKSTOP_GRACE_S = 1.0  # the middleware answers first; the protocol closes only what it could not
_WARN_EVERY_S = 10.0  # at most one "connection refused: cap" warning per process this often
TIMEOUT_MESSAGE = "The client did not send the request in time (TOKENTILL_READ_TIMEOUT_S={limit:g} s)."


def _raw_response(error: APIError) -> bytes:
    """A complete HTTP/1.1 response carrying `error`'s envelope, for a connection the app never saw
    (counted in /metrics like the app's own refusals)."""
    observe_response(error.status, error.code)
    body = json.dumps(error.body()).encode()
    head = [f"HTTP/1.1 {error.status} {_REASONS[error.status]}"]
    head += [f"{name}: {value}" for name, value in error.headers.items() if name.lower() != "connection"]
    head += ["content-type: application/json", f"content-length: {len(body)}", "connection: close"]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


_REASONS = {408: "Request Timeout", 503: "Service Unavailable"}


class CoalescedWrites:
    """A transport whose writes of one event-loop pass go out as one: a response's head and its body
    (uvicorn writes them separately) leave in one `write` syscall and one TCP segment instead of two,
    which the receiving side also wakes up for once. The writes are joined at the end of the pass
    (`loop.call_soon`), and before anything that ends or half-closes the connection. Everything else
    is the wrapped transport's."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(bytes(data))

    def writelines(self, chunks: Iterable[bytes | bytearray | memoryview]) -> None:
        for chunk in chunks:
            self.write(chunk)

    def flush(self) -> None:
        if not self._pending:
            return
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending.clear()
        if not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def abort(self) -> None:
        self._pending.clear()
        self._transport.abort()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(len(chunk) for chunk in self._pending)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, plus header/body timers, an idle timer from the first moment, and a
    per-process cap on open connections. Build it with `functools.partial(GuardedHttpProtocol,
    read_timeout_s=..., max_connections=...)`; the idle timeout is uvicorn's `timeout_keep_alive`."""

    _last_cap_warning = 0.0  # class-wide: the cap is per process

    def __init__(self, *args: Any, read_timeout_s: float, max_connections: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.read_timeout_s = read_timeout_s
        self.max_connections = max_connections
        self._read_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.transport = cast(asyncio.Transport, CoalescedWrites(transport, self.loop))
        if len(self.connections) > self.max_connections:
            now = time.monotonic()
            if now - GuardedHttpProtocol._last_cap_warning > _WARN_EVERY_S:
                GuardedHttpProtocol._last_cap_warning = now
                log.warning(
                    "refusing connections: %d open, TOKENTILL_MAX_CONNECTIONS=%d",
                    len(self.connections) - 1,
                    self.max_connections,
                )
            error = Overloaded("Too many open connections to this server; retry shortly.", retry_after_s=1.0)
            self.transport.write(_raw_response(error))
            self.transport.close()
            return
        # uvicorn arms its keep-alive timer only after a response; a connection that never sends a byte
        # gets the same idle limit from the start (any data cancels it, as it does uvicorn's).
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_read_timer()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._start_read_timer(self.read_timeout_s)

    def on_headers_complete(self) -> None:
        self._stop_read_timer()
        super().on_headers_complete()
        self._start_read_timer(self.read_timeout_s + _BACKSTOP_GRACE_S)

    def on_message_complete(self) -> None:
        self._stop_read_timer()
        super().on_message_complete()

    def _start_read_timer(self, delay_s: float) -> None:
        self._stop_read_timer()
        self._read_timer = self.loop.call_later(delay_s, self._read_timed_out)

    def _stop_read_timer(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _read_timed_out(self) -> None:
        self._read_timer = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        responding = cycle is not None and cycle.response_started and not cycle.response_complete
        if responding:  # an answer is on its way (it started before the body was in): let it finish
            assert cycle is not None
            cycle.keep_alive = False
            return
        if cycle is None or not cycle.response_started:
            message = TIMEOUT_MESSAGE.format(limit=self.read_timeout_s)
            self.transport.write(_raw_response(RequestTimeout(message)))
        if cycle is not None:
            cycle.keep_alive = False
        self.transport.close()
