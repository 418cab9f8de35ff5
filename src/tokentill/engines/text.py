"""Turning sampled bytes into client text: UTF-8 reassembly and stop strings.

Both engines (`llamacpp`, `echo`) feed their output through `TextAssembler`, so the rules are the same
everywhere: a stop string never reaches the client, text that *might* be the start of a stop string is held
back until it is decided, and a multi-byte character split across tokens is emitted only once complete.
Pure Python, no threads: the llama.cpp scheduler owns one assembler per sequence.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable

__all__ = ["StopMatcher", "TextAssembler"]


class StopMatcher:
    """Cuts a text stream at the first stop string, holding back possible partial matches.

    `feed(text)` returns `(safe_text, stopped)`: `safe_text` can be sent now; once `stopped` is true the
    stream has ended (the stop string and anything after it are dropped) and further feeds are ignored.
    """

    def __init__(self, stops: Iterable[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._pending = ""
        self.stopped = False

    def feed(self, text: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self._stops:
            return text, False
        buffer = self._pending + text
        cut = min((i for i in (buffer.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self._pending = ""
            self.stopped = True
            return buffer[:cut], True
        hold = self._partial_suffix(buffer)
        self._pending = buffer[len(buffer) - hold :]
        return buffer[: len(buffer) - hold], False

    def flush(self) -> str:
        """The held-back text, released because the stream ended without completing a stop string."""
        pending, self._pending = self._pending, ""
        return "" if self.stopped else pending

    def _partial_suffix(self, buffer: str) -> int:
        """Length of the longest suffix of `buffer` that is a proper prefix of some stop string."""
        best = 0
        for stop in self._stops:
            for length in range(min(len(stop) - 1, len(buffer)), best, -1):
                if buffer.endswith(stop[:length]):
                    best = length
                    break
        return best


class TextAssembler:
    """Bytes from the detokenizer in, client-safe text out (UTF-8 completed, stop strings applied)."""

    def __init__(self, stops: Iterable[str]) -> None:
        # errors="replace": a model can sample an invalid byte sequence; the client gets U+FFFD, not a 500.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._matcher = StopMatcher(stops)

    @property
    def stopped(self) -> bool:
        return self._matcher.stopped

    def feed_bytes(self, data: bytes) -> tuple[str, bool]:
        return self._matcher.feed(self._decoder.decode(data))

    def feed_text(self, text: str) -> tuple[str, bool]:
        return self._matcher.feed(text)

    def finish(self) -> str:
        """Everything still held back (an incomplete character becomes U+FFFD) at the end of the stream."""
        tail, stopped = self._matcher.feed(self._decoder.decode(b"", final=True))
        return tail if stopped else tail + self._matcher.flush()
