"""One request inside the decode loop (`Sequence`), its sampling settings, and its channel to the event loop.

Split from `scheduler.py` so that the loop and the runners share these types without importing each other;
`scheduler` re-exports them.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any

from tokentill.engines.text import TextAssembler
from tokentill.errors import APIError, DeadlineExceeded
from tokentill.types import EngineEvent, Finished, Grammar

__all__ = [
    "Channel",
    "FollowUpPass",
    "Outbox",
    "PassEnd",
    "SamplingParams",
    "Sequence",
    "deadline_error",
    "new_channel",
]


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None  # None = a fresh random seed per request
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    frequency_penalty: float = 0.0  # OpenAI's penalties, over the tokens this sequence generated
    presence_penalty: float = 0.0
    grammar: Grammar | None = None  # structured output: only tokens the grammar allows are sampled


@dataclass(frozen=True)
class FollowUpPass:
    """A second pass that continues a sequence in its own KV cells (see `Scheduler` and
    `BatchRunner.follow`): `prompt` is appended after the first pass's output and decoded in the same
    slot, so the first prompt and the output are never evaluated again."""

    prompt: list[int]  # the answer prompt: the chat template's text after the first pass's output
    budget: int  # completion tokens of both passes together
    sampling: SamplingParams
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class PassEnd:
    """Scheduler → `stream`: a pass ended and its follow-up continues on the same channel."""

    finished: Finished


Item = EngineEvent | APIError | PassEnd


class Channel:
    """Scheduler thread → event loop handoff; `put` is the only method called off the loop thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[Item] = asyncio.Queue()

    def put(self, item: Item) -> bool:
        """False when the loop is closed (the consumer can never read it): the caller should stop."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # loop closed; nobody is listening any more
            return False
        return True


class Outbox:
    """Events of one decode step, handed to each event loop in one `call_soon_threadsafe` (scheduler thread).

    One wake-up per step instead of one per sequence: with many sequences, per-event wake-ups keep the
    event loop thread taking the GIL back from the decode thread between two `llama_decode` calls.
    """

    def __init__(self) -> None:
        self._items: list[tuple[Sequence, Item]] = []

    def add(self, seq: Sequence, item: Item) -> None:
        self._items.append((seq, item))

    def send(self) -> None:
        if not self._items:
            return
        items, self._items = self._items, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Sequence, Item]]] = {}
        for seq, item in items:
            by_loop.setdefault(seq.channel.loop, []).append((seq, item))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, batch)
            except RuntimeError:  # loop closed; nobody is listening any more
                for seq, _ in batch:
                    seq.cancelled.set()


def _deliver(batch: list[tuple[Sequence, Item]]) -> None:
    for seq, item in batch:
        seq.channel.queue.put_nowait(item)


@dataclass(eq=False)
class Sequence:
    """One request inside the scheduler. Fields below `cancelled` belong to the scheduler thread."""

    request_id: str
    prompt: list[int]
    max_new_tokens: int  # already clamped so prompt + completion fits the (per-sequence) context
    sampling: SamplingParams
    stop: tuple[str, ...]
    deadline: float  # time.monotonic()
    channel: Channel
    timeout_s: float = 0.0  # the whole request's time, every pass included; for the 504 message only
    continuation: bool = False  # a later pass of an admitted request: next in line, never refused
    # A multimodal prompt the runner understands (`prompt` is then empty): its token counts are given here,
    # computed by the same tokenization the runner will use, so usage stays exact.
    media: Any = None
    media_prompt_tokens: int = 0  # all prompt tokens, image tokens included (only with `media`)
    image_tokens: int = 0
    # `native` reasoning: split `<think>…</think>` off (stops apply to the answer only); `thinking`: the
    # prompt ends inside an open `<think>` the chat template wrote.
    think_tags: bool = False
    thinking: bool = False
    # A pass that continues this one in the same slot once it ends (batching runners only).
    follow_up: FollowUpPass | None = None
    # A follow-up pass: the tokens already in the sequence before `prompt` (counted in `prompt_tokens`).
    prefix: int = 0
    # Shared by a sequence and its follow-up, so cancelling either (`Scheduler.withdraw`) stops both.
    cancelled: threading.Event = field(default_factory=threading.Event)
    # --- scheduler-thread state ---
    prefilled: bool = False  # batching runner: the whole prompt is queued, sampling starts next step
    n_generated: int = 0  # sampled tokens, end-of-generation token excluded
    cached_tokens: int = 0  # prompt tokens whose KV entries were reused
    evaluated: int = 0  # prompt tokens evaluated for this request (every pass), for tests and metrics
    earlier: int = 0  # tokens sampled by the earlier passes of this request
    started_at: float = 0.0
    outbox: Outbox | None = None  # set on admission: events then leave once per step (`Outbox.send`)
    text: TextAssembler = field(init=False)

    def __post_init__(self) -> None:
        self.text = TextAssembler(self.stop, think_tags=self.think_tags, thinking=self.thinking)

    @property
    def prompt_tokens(self) -> int:
        return self.prefix + (self.media_prompt_tokens if self.media is not None else len(self.prompt))

    def cancel(self) -> None:
        """Thread-safe; the scheduler retires the sequence before its next token."""
        self.cancelled.set()

    def emit(self, item: Item) -> None:
        """Scheduler thread: queue `item` in the step's outbox (or send it now before admission)."""
        if self.outbox is not None:
            self.outbox.add(self, item)
        else:
            self.emit_now(item)

    def emit_now(self, item: Item) -> None:
        """Send `item` at once; any thread."""
        if not self.channel.put(item):
            self.cancelled.set()


def deadline_error(seq: Sequence) -> DeadlineExceeded:
    return DeadlineExceeded(f"The request timed out after {seq.timeout_s:.1f} seconds.")


def new_channel() -> Channel:
    """A channel bound to the running loop (call from the coroutine that will consume it)."""
    return Channel(asyncio.get_running_loop())
