"""Reading an upstream's answer body: server-sent events split by the SSE spec, and capped bodies.

`sse_events` yields the `data` of each event (comments and keep-alives skipped), split by `EventSplitter`
on CR, LF or CRLF only; it caps what it holds (MAX_EVENT) and checks the request's deadline on every chunk
read, so an upstream can outgrow neither memory nor the request's time. `read_capped` reads at most a
limit of a body (an error answer, a non-streamed completion) and releases the response. Protocol breaks
raise `BadAnswer`; transport errors are aiohttp's, mapped by the engine.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncGenerator, AsyncIterable

import aiohttp

from tokentill import errors
from tokentill.engines.upstream_wire import BadAnswer

__all__ = ["MAX_EVENT", "EventSplitter", "read_capped", "sse_events"]

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
_BOM = "\ufeff".encode()


class EventSplitter:
    """An event stream's bytes, fed as they arrive, split into the `data` of each event (bytes).

    Split as the SSE spec says: lines end on CRLF, CR or LF only. Not a library's line reader: those split
    like `str.splitlines` (also on U+0085, U+2028 and U+2029, which vLLM and SGLang write raw inside JSON
    strings, so an answer containing them would be cut mid-event) or cap lines at their own size. A
    leading BOM, comments (keep-alives) and fields other than `data` are skipped; the data lines of one
    event are joined with LF. A line or an event longer than MAX_EVENT bytes raises `BadAnswer`, so an
    upstream that never ends one cannot outgrow memory. Synchronous, one call per read: the reader's
    cost per event is a few bytes operations, not a generator switch per line.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._after_cr = False  # the last chunk ended in CR: a leading LF in the next one belongs to it
        self._first = True
        self._data: list[bytes] = []
        self._size = 0

    def feed(self, chunk: bytes) -> list[bytes]:
        """The events that `chunk` completes, in order."""
        if not chunk:
            return []
        if self._after_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        self._after_cr = False
        buffer = self._buffer  # never holds a line end: only the start of a line still to come
        buffer += chunk
        if b"\r" in chunk:  # any of the three line ends: split by the spec's rule
            lines: list[bytes] = []
            start = 0
            for end in _LINE_END.finditer(buffer):
                lines.append(bytes(buffer[start : end.start()]))
                start = end.end()
                self._after_cr = end.group() == b"\r" and start == len(buffer)
        else:  # LF only, as servers write: one split of the lines this chunk completes
            start = buffer.rfind(b"\n") + 1
            lines = bytes(buffer[: start - 1]).split(b"\n") if start else []
        del buffer[:start]
        if len(buffer) > MAX_EVENT:
            raise BadAnswer("a line of the event stream is longer than 1 MiB")
        return self._events(lines)

    def end(self) -> list[bytes]:
        """The events left when the body ends: an unterminated last line and event count as ended."""
        lines = [bytes(self._buffer), b""] if self._buffer else [b""]
        self._buffer.clear()
        return self._events(lines)

    def _events(self, lines: list[bytes]) -> list[bytes]:
        """The events that complete `lines`: whole one-line events at once, anything else line by line."""
        if self._first and lines:
            lines[0], self._first = lines[0].removeprefix(_BOM), False
        if (events := self._whole_events(lines)) is not None:
            return events
        return self._lines(lines)

    def _whole_events(self, lines: list[bytes]) -> list[bytes] | None:
        """The events when `lines` are what servers send, whole events of one `data: ` line each (every
        other line blank, none open before them); None for anything else, which `_lines` reads line by
        line. The same events either way, found without a loop over every line."""
        if self._data or not lines or len(lines) % 2 or any(lines[1::2]):
            return None
        events = [line[6:] for line in lines[::2] if line.startswith(b"data: ")]
        if len(events) != len(lines) // 2 or max(map(len, events)) > MAX_EVENT:
            return None  # a comment or another field: read line by line
        return events

    def _lines(self, lines: list[bytes]) -> list[bytes]:
        events: list[bytes] = []
        data = self._data
        for line in lines:
            if not line:  # a blank line dispatches the event
                if data:
                    events.append(data[0] if len(data) == 1 else b"\n".join(data))
                    data.clear()
                self._size = 0
                continue
            if line.startswith(b":"):  # a comment: a keep-alive
                continue
            name, _, value = line.partition(b":")
            if name == b"data":
                value = value[1:] if value.startswith(b" ") else value
                self._size += len(value)
                if self._size > MAX_EVENT:
                    raise BadAnswer("an event is larger than 1 MiB")
                data.append(value)
        return events


async def sse_events(chunks: AsyncIterable[bytes], deadline: float) -> AsyncGenerator[list[bytes], None]:
    """The `data` of the server-sent events in a body read as `chunks`, as one list per read that ended
    any (`EventSplitter`); the request's deadline is checked on every read, so an upstream that trickles
    bytes cannot outlast it."""
    splitter = EventSplitter()
    async for chunk in chunks:
        if time.monotonic() > deadline:
            raise errors.DeadlineExceeded("The request timed out while the upstream model was answering.")
        if events := splitter.feed(chunk):
            yield events
    if events := splitter.end():
        yield events
