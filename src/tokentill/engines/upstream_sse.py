"""Reading an upstream's answer body: server-sent events split by the SSE spec, and capped bodies.

`sse_data` yields the `data` of each event (comments and keep-alives skipped); `sse_lines` splits the body
on CR, LF or CRLF only. Both cap what they hold (MAX_EVENT) and check the request's deadline on every chunk
read, so an upstream can outgrow neither memory nor the request's time. `read_capped` reads at most a
limit of a body (an error answer, a non-streamed completion) and releases the response. Protocol breaks
raise `BadAnswer`; transport errors are aiohttp's, mapped by the engine.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncGenerator, AsyncIterable
from contextlib import aclosing

import aiohttp

from tokentill import errors
from tokentill.engines.upstream_wire import BadAnswer

__all__ = ["MAX_EVENT", "read_capped", "sse_data", "sse_lines"]

MAX_EVENT = 1024 * 1024  # one SSE event's data


async def read_capped(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """At most `limit` bytes of the body; an over-long body is cut (it is only parsed for an envelope)."""
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in response.content.iter_any():
            chunks.append(chunk)
            size += len(chunk)
            if size >= limit:
                break
    except (aiohttp.ClientError, TimeoutError):
        pass  # an error body that breaks off is still an error; what we have is enough
    finally:
        response.release()  # a body left unread closes its connection
    return b"".join(chunks)[:limit]


_LINE_END = re.compile(rb"\r\n|\r|\n")


async def sse_lines(chunks: AsyncIterable[bytes], deadline: float) -> AsyncGenerator[bytes, None]:
    """The lines of a body read as `chunks`, split as the SSE spec says: on CRLF, CR or LF only.

    Not a library's line reader: those split like `str.splitlines` (also on U+0085, U+2028 and U+2029,
    which vLLM and SGLang write raw inside JSON strings, so an answer containing them would be cut
    mid-event) or cap lines at their own size. A
    line is capped at MAX_EVENT bytes and the deadline is checked on every chunk read, so an upstream
    that trickles bytes without a line break can outgrow neither memory nor the request's time.
    """
    buffer = bytearray()
    after_cr = False  # the last chunk ended in CR: a leading LF in the next one belongs to it
    async for chunk in chunks:
        if time.monotonic() > deadline:
            raise errors.DeadlineExceeded("The request timed out while the upstream model was answering.")
        if not chunk:
            continue
        if after_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        after_cr = False
        scan_from = len(buffer)
        buffer += chunk
        start = 0
        for end in _LINE_END.finditer(buffer, scan_from):
            yield bytes(buffer[start : end.start()])
            start = end.end()
            after_cr = end.group() == b"\r" and start == len(buffer)
        del buffer[:start]
        if len(buffer) > MAX_EVENT:
            raise BadAnswer("a line of the event stream is longer than 1 MiB")
    if buffer:
        yield bytes(buffer)


async def sse_data(chunks: AsyncIterable[bytes], deadline: float) -> AsyncGenerator[str, None]:
    """The `data` of each server-sent event in a body read as `chunks`; comments (keep-alives) are
    skipped, the deadline holds."""
    lines: list[str] = []
    size = 0
    first = True
    async with aclosing(sse_lines(chunks, deadline)) as raw_lines:
        async for raw in raw_lines:
            line = raw.decode("utf-8", errors="replace")
            if first:
                line, first = line.removeprefix("\ufeff"), False
            if not line:
                if lines:
                    yield "\n".join(lines)
                lines, size = [], 0
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            if name == "data":
                value = value[1:] if value.startswith(" ") else value
                size += len(value)
                if size > MAX_EVENT:
                    raise BadAnswer("an event is larger than 1 MiB")
                lines.append(value)
    if lines:
        yield "\n".join(lines)
