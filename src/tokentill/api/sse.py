"""Server-sent events framing for `stream: true`: the engine's events as `chat.completion.chunk`s.

Order on the wire: a first chunk with `role: "assistant"`, content deltas (and `reasoning_content` deltas when
the client asked to see the reasoning), `tool_calls` deltas as OpenAI sends them (a call's first with index,
id, type and name, then argument fragments with the index only), a last choice chunk with `finish_reason`, the
usage chunk (`choices: []`) when `stream_options.include_usage` is set, then `data: [DONE]`. Deltas without
text (a token that completes no character yet, or hidden reasoning) send nothing. Once the stream has begun,
an SSE comment goes out at least every `keepalive_s` while nothing else is sent (hidden reasoning, a slow
upstream), so proxies keep the connection. Nothing at all is sent before the engine's first event (the queue
wait and the prompt evaluation): the route waits for it so that an early failure is an ordinary HTTP error. An
error after the first byte is one `data: {"error": ...}` event, then the stream ends.

Structure (cancellation, STYLE rule 10): `EventStreamResponse` owns a task group for the whole response; its
pump task drives the engine's events into a memory stream (with keep-alive ticks from a loop callback), and
the body generator (`sse_frames`) only receives from it. No `yield` happens inside a task group or cancel
scope, and the response closes the body itself, so nothing is left for a finalizer in another task. A client
that hangs up cancels the task group: the pump's events are cancelled, and they settle under a shield.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from contextlib import suppress
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from tokentill import errors
from tokentill.jsonbytes import dumps
from tokentill.lifecycle import first_error, watch_beside
from tokentill.protocol import responses
from tokentill.types import EngineEvent, Finished, TextDelta, ToolCallDelta

__all__ = [
    "KEEPALIVE",
    "KEEPALIVE_S",
    "EventStreamResponse",
    "Item",
    "KeepAlive",
    "PumpedEventStream",
    "next_item",
    "sse_frames",
    "until_disconnect",
]

log = logging.getLogger(__name__)

KEEPALIVE = b": keep-alive\n\n"
DONE = b"data: [DONE]\n\n"
KEEPALIVE_S = 10.0

Item = EngineEvent | Exception | None
"""What the pump hands the renderer: an event, or the error that ended them; `None` is a keep-alive tick."""


def _data(obj: dict[str, Any]) -> bytes:
    return b"data: " + dumps(obj) + b"\n\n"


async def _pump(events: AsyncGenerator[EngineEvent, None], send: MemoryObjectSendStream[Item]) -> None:
    """Move `events` into `send`; an error becomes the last item (cancellation propagates)."""
    ended = False  # the events ran out: nothing is left to close
    async with send:
        try:
            async for event in events:
                # No checkpoint per event (the stream is unbounded): the events of one upstream read or one
                # decode step all land before the renderer runs, and go out in one write.
                send.send_nowait(event)
            ended = True
        except anyio.BrokenResourceError:
            pass  # the renderer stopped reading: nobody wants the rest
        except Exception as exc:
            with suppress(anyio.BrokenResourceError):
                await send.send(exc)
        finally:
            if not ended:  # a shielded scope costs ~5 µs: only when the events may still be running
                with anyio.CancelScope(shield=True):
                    await events.aclose()


async def next_item(items: MemoryObjectReceiveStream[Item]) -> Item:
    """The next item; raises `anyio.EndOfStream` after the last. An item already waiting (the pump ran
    ahead: one upstream read can carry several events) is taken without a checkpoint.

    No timeout and no cancel scope: the keep-alive's cue is a tick in the stream itself (`PumpedEventStream`),
    so a receive is never cancelled, and an item handed over just as a deadline passed cannot be lost
    (anyio's `receive` drops an item delivered to a receiver that is cancelled before it resumes)."""
    with suppress(anyio.WouldBlock):
        return items.receive_nowait()
    return await items.receive()


class KeepAlive:
    """What a renderer does with the pump's ticks (`None` items, every `keepalive_s / 2`): `tick()` is
    `KEEPALIVE` when a whole tick went by without output, else `b""`; `sent()` notes output (a keep-alive
    included). So a silent stream gets a keep-alive every `keepalive_s`, the first after `keepalive_s / 2`
    to `keepalive_s` of silence."""

    __slots__ = ("_quiet",)

    def __init__(self) -> None:
        self._quiet = False  # a tick came and nothing went out since

    def sent(self) -> None:
        self._quiet = False

    def tick(self) -> bytes:
        self._quiet = not self._quiet
        return b"" if self._quiet else KEEPALIVE


async def sse_frames(
    items: MemoryObjectReceiveStream[Item],
    *,
    completion_id: str,
    created: int,
    model: str,
    include_usage: bool,
    include_reasoning: bool,
) -> AsyncGenerator[bytes, None]:
    """Render what the pump sends (events, possibly ending with an error, and ticks) as SSE bytes."""

    def chunk(delta: dict[str, Any] | None, **kw: Any) -> bytes:
        return _data(
            responses.chunk(completion_id=completion_id, created=created, model=model, delta=delta, **kw)
        )

    alive = KeepAlive()
    async with items:
        yield chunk({"role": "assistant", "content": "", "refusal": None})
        while True:
            try:
                item = await next_item(items)
            except anyio.EndOfStream:
                break
            if isinstance(item, Exception):
                yield _error(item, completion_id)
                return
            out = b""
            if item is None:
                out = alive.tick()  # nothing visible for a while: keep proxies from timing out
            elif isinstance(item, Finished):
                out = chunk({}, finish_reason=item.finish_reason)
                if include_usage:
                    out += chunk(None, usage=item.usage)
            elif isinstance(item, ToolCallDelta):
                if item.id is not None or item.arguments:
                    out = chunk({"tool_calls": [responses.tool_call_delta(item)]})
            elif isinstance(item, TextDelta) and item.text:
                if not item.reasoning:
                    out = chunk({"content": item.text})
                elif include_reasoning:
                    out = chunk({"reasoning_content": item.text})
            if out:
                alive.sent()
            yield out  # b"" too: the body then sends what it holds unless more is ready
    yield DONE


def _error(exc: BaseException, completion_id: str) -> bytes:
    failure = first_error(exc)
    if isinstance(failure, errors.APIError):
        return _data(failure.body())
    log.error("stream %s failed", completion_id, exc_info=failure)
    return _data(errors.InternalError("The server had an error while streaming the response.").body())


Frames = Callable[[MemoryObjectReceiveStream[Item]], AsyncGenerator[bytes, None]]
"""Renders what the pump sends (events, possibly ending with an error, and ticks) as SSE bytes: one
frame per item after the first, `b""` for an item that shows nothing."""


class PumpedEventStream(StreamingResponse):
    """`text/event-stream` of `events` (already known to have started), rendered by `frames`.

    One task group spans the whole response: the pump, and a watcher (`watch_beside`) that cancels it when
    the client hangs up; the body is sent from this task, never from a generator in another. On any exit
    (done, client gone, send failed) the watcher is cancelled, the group too if the pump is still running,
    and the body generator closed, all in this task.

    Frames go out together when the pump has already handed over the next item (or has ended): one write
    for what one upstream read or decode step produced, not one per chunk; nothing ready is ever held
    back waiting for more. Every `keepalive_s / 2` a loop callback puts a tick (`None`) in the stream
    until the pump closes it, the renderer's cue for a keep-alive (`KeepAlive`): no timer per receive.
    """

    def __init__(
        self,
        events: AsyncGenerator[EngineEvent, None],
        frames: Frames,
        *,
        headers: Mapping[str, str] | None = None,
        on_close: Callable[[], Awaitable[None]] | None = None,
        keepalive_s: float = KEEPALIVE_S,
    ) -> None:
        self._events = events
        self._on_close = on_close
        self._tick_s = keepalive_s / 2
        self._send, self._items = anyio.create_memory_object_stream[Item](math.inf)
        self._frames = frames(self._items)
        super().__init__(self._frames, media_type="text/event-stream", headers=headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_pump, self._events, self._send)
            watcher = watch_beside(_until_hang_up(receive, tg.cancel_scope))
            ticks = _Ticks(self._send, self._tick_s)
            try:
                await self._respond(send)
            finally:
                ticks.stop()
                watcher.cancel()
                if self._items.statistics().open_send_streams:  # the pump has not ended: cancel it
                    tg.cancel_scope.cancel()
                with anyio.CancelScope(shield=True):
                    await self._frames.aclose()
                    if self._on_close is not None:
                        await self._on_close()

    async def _respond(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        held: list[bytes] = []
        async for frame in self._frames:  # one per item, b"" for those that show nothing
            if frame:
                held.append(frame)
            waiting = self._items.statistics()
            if waiting.current_buffer_used or not waiting.open_send_streams or not held:
                continue  # the next item is ready now: send what it makes with these
            await send({"type": "http.response.body", "body": b"".join(held), "more_body": True})
            held = []
        await send({"type": "http.response.body", "body": b"".join(held), "more_body": False})


class _Ticks:
    """A `None` into `send` every `period` seconds, from a loop callback, until the stream closes (the
    pump ended: nothing is left to keep alive) or `stop()`."""

    def __init__(self, send: MemoryObjectSendStream[Item], period: float) -> None:
        self._send = send
        self._period = period
        self._loop = asyncio.get_running_loop()
        self._handle = self._loop.call_later(period, self._tick)

    def _tick(self) -> None:
        try:
            self._send.send_nowait(None)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            return
        self._handle = self._loop.call_later(self._period, self._tick)

    def stop(self) -> None:
        self._handle.cancel()


async def until_disconnect(receive: Receive) -> None:
    """Return once the client has hung up (the request body is already read: what is left to receive
    is the disconnect)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _until_hang_up(receive: Receive, scope: anyio.CancelScope) -> None:
    await until_disconnect(receive)
    scope.cancel()


class EventStreamResponse(PumpedEventStream):
    """The chat completion chunks of `events` (see `sse_frames`)."""

    def __init__(
        self,
        events: AsyncGenerator[EngineEvent, None],
        *,
        completion_id: str,
        created: int,
        model: str,
        include_usage: bool,
        include_reasoning: bool,
        headers: Mapping[str, str] | None = None,
        keepalive_s: float = KEEPALIVE_S,
        on_close: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        def frames(items: MemoryObjectReceiveStream[Item]) -> AsyncGenerator[bytes, None]:
            return sse_frames(
                items,
                completion_id=completion_id,
                created=created,
                model=model,
                include_usage=include_usage,
                include_reasoning=include_reasoning,
            )

        super().__init__(events, frames, headers=headers, on_close=on_close, keepalive_s=keepalive_s)
