"""Turning sampled bytes into client text: UTF-8 reassembly, `<think>` splitting and stop strings.

Both engines (`llamacpp`, `echo`) feed their output through `TextAssembler`, so the rules are the same
everywhere: a stop string never reaches the client, text that *might* be the start of a stop string is held
back until it is decided, and a multi-byte character split across tokens is emitted only once complete.

Billing rule: every token fed in comes out on exactly one `TextDelta` (`tokens=1`), even when it produces no
text yet (half a character, a possible stop prefix, a bare `<think>` tag), so a stream cut short still
accounts for every token generated. Text released at the end (`finish`) carries `tokens=0`.

With `think_tags` (models whose catalogue reasoning is `native`), text inside `<think>…</think>` comes out
as `reasoning=True` deltas without the tags, and stop strings apply to the visible text only, as if the
reasoning were not there. `thinking=True` starts inside the block: the chat template already wrote
`<think>` at the end of the prompt (DeepSeek-R1 distills, QwQ).
Pure Python, no threads: the llama.cpp scheduler owns one assembler per sequence.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable

from tokentill.engines.base import THINK_CLOSE, THINK_OPEN
from tokentill.types import TextDelta

__all__ = ["StopMatcher", "TextAssembler", "ThinkSplitter"]


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


class ThinkSplitter:
    """Splits streamed text into (reasoning, visible) parts at `<think>` / `</think>` tags.

    Text that might be the start of a tag is held back until the next delta decides it, so a tag split
    across deltas ("<thi" + "nk>") never leaks into the answer. `inside=True` starts within a block.
    """

    OPEN, CLOSE = THINK_OPEN, THINK_CLOSE

    def __init__(self, *, inside: bool = False) -> None:
        self.inside = inside
        self._pending = ""

    def feed(self, text: str) -> list[tuple[bool, str]]:
        """Parts of `text` ready to emit, each as (is_reasoning, text), none empty."""
        data = self._pending + text
        self._pending = ""
        parts: list[tuple[bool, str]] = []
        while data:
            tag = self.CLOSE if self.inside else self.OPEN
            index = data.find(tag)
            if index >= 0:
                if index:
                    parts.append((self.inside, data[:index]))
                data = data[index + len(tag) :]
                self.inside = not self.inside
                continue
            keep = _partial_suffix(data, tag)
            if len(data) > keep:
                parts.append((self.inside, data[: len(data) - keep]))
            self._pending = data[len(data) - keep :]
            break
        return parts

    def flush(self) -> list[tuple[bool, str]]:
        rest, self._pending = self._pending, ""
        return [(self.inside, rest)] if rest else []


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0


class TextAssembler:
    """Bytes (or text) per token in, `TextDelta`s out: UTF-8 completed, reasoning split, stops applied."""

    def __init__(self, stops: Iterable[str], *, think_tags: bool = False, thinking: bool = False) -> None:
        # errors="replace": a model can sample an invalid byte sequence; the client gets U+FFFD, not a 500.
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._matcher = StopMatcher(stops)
        self._splitter = ThinkSplitter(inside=thinking) if think_tags else None

    @property
    def stopped(self) -> bool:
        """A stop string completed in the visible text: the generation must end."""
        return self._matcher.stopped

    @property
    def thinking(self) -> bool:
        """Inside a `<think>` block now."""
        return self._splitter is not None and self._splitter.inside

    def feed_bytes(self, data: bytes, tokens: int = 1) -> list[TextDelta]:
        """The deltas for one token's bytes; never empty, the first carries `tokens`."""
        return self._deltas(self._decoder.decode(data), tokens)

    def feed_text(self, text: str, tokens: int = 1) -> list[TextDelta]:
        """Like `feed_bytes` for an engine that produces text."""
        return self._deltas(text, tokens)

    def finish(self) -> list[TextDelta]:
        """Everything still held back (an incomplete character becomes U+FFFD), `tokens=0`."""
        if self.stopped:
            return []
        parts = self._parts(self._decoder.decode(b"", final=True))
        if self._splitter is not None:
            for hidden, text in self._splitter.flush():
                parts += [(True, text)] if hidden else self._visible(text)
        rest = self._matcher.flush()
        if rest:
            parts.append((False, rest))
        return [TextDelta(text, reasoning=hidden, tokens=0) for hidden, text in parts]

    def _deltas(self, text: str, tokens: int) -> list[TextDelta]:
        was_inside = self.thinking
        parts = self._parts(text)
        if not parts:  # the token's text is held back (or is a bare tag): it is still counted now
            return [TextDelta("", reasoning=was_inside or self.thinking, tokens=tokens)]
        return [
            TextDelta(part, reasoning=hidden, tokens=tokens if i == 0 else 0)
            for i, (hidden, part) in enumerate(parts)
        ]

    def _parts(self, text: str) -> list[tuple[bool, str]]:
        if self._splitter is None:
            return self._visible(text)
        parts: list[tuple[bool, str]] = []
        for hidden, piece in self._splitter.feed(text):
            if self._matcher.stopped:
                break  # nothing after the stop string is generated for the client, reasoning included
            parts += [(True, piece)] if hidden else self._visible(piece)
        return parts

    def _visible(self, text: str) -> list[tuple[bool, str]]:
        safe, _ = self._matcher.feed(text)
        return [(False, safe)] if safe else []
