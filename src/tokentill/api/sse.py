"""Server-sent events framing for `stream: true`: the engine's events as `chat.completion.chunk`s.

Order on the wire: a first chunk with `role: "assistant"`, content deltas (and `reasoning_content` deltas
when the client asked to see the reasoning), a last choice chunk with `finish_reason`, the usage chunk
(`choices: []`) when `stream_options.include_usage` is set, then `data: [DONE]`. While nothing visible is
produced (queueing, hidden reasoning) an SSE comment goes out every `keepalive_s` so proxies keep the
connection. An error after the first byte is one `data: {"error": ...}` event, then the stream ends.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import AsyncIterator
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectSendStream

from tokentill import errors
from tokentill.engines.base import EngineEvent, Finished, TextDelta
from tokentill.protocol import responses

__all__ = ["KEEPALIVE", "first_error", "sse_stream"]

log = logging.getLogger(__name__)

KEEPALIVE = b": keep-alive\n\n"
DONE = b"data: [DONE]\n\n"


def _data(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


async def _pump(events: AsyncIterator[EngineEvent], send: MemoryObjectSendStream[EngineEvent]) -> None:
    async with send:
        async for event in events:
            await send.send(event)


async def sse_stream(
    events: AsyncIterator[EngineEvent],
    *,
    completion_id: str,
    created: int,
    model: str,
    include_usage: bool,
    include_reasoning: bool,
    keepalive_s: float = 10.0,
) -> AsyncIterator[bytes]:
    """Render `events` (already known to have started) as SSE bytes."""

    def chunk(delta: dict[str, Any] | None, **kw: Any) -> bytes:
        return _data(
            responses.chunk(completion_id=completion_id, created=created, model=model, delta=delta, **kw)
        )

    yield chunk({"role": "assistant", "content": "", "refusal": None})
    send, receive = anyio.create_memory_object_stream[EngineEvent](math.inf)
    failure: BaseException | None = None
    try:
        async with anyio.create_task_group() as tg, receive:
            tg.start_soon(_pump, events, send)
            last_sent = anyio.current_time()
            while True:
                event: EngineEvent | None = None
                with anyio.move_on_after(keepalive_s):
                    try:
                        event = await receive.receive()
                    except anyio.EndOfStream:
                        break
                out = b""
                if isinstance(event, Finished):
                    out = chunk({}, finish_reason=event.finish_reason)
                    if include_usage:
                        out += chunk(None, usage=event.usage)
                elif isinstance(event, TextDelta) and not event.reasoning:
                    out = chunk({"content": event.text}) if event.text else b""
                elif isinstance(event, TextDelta) and include_reasoning:
                    out = chunk({"reasoning_content": event.text}) if event.text else b""
                elif anyio.current_time() - last_sent >= keepalive_s:
                    out = KEEPALIVE  # nothing visible for a while: keep proxies from timing out
                if out:
                    last_sent = anyio.current_time()
                    yield out
    except Exception as exc:
        failure = first_error(exc)
    if failure is None:
        yield DONE
        return
    if isinstance(failure, errors.APIError):
        yield _data(failure.body())
        return
    log.error("stream %s failed", completion_id, exc_info=failure)
    yield _data(errors.InternalError("The server had an error while streaming the response.").body())


def first_error(exc: BaseException) -> BaseException:
    """The first real error inside (nested) exception groups from the task group."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc
