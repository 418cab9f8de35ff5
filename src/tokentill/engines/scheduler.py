"""The decode loop: one thread that owns the model context and steps admitted sequences.

    event loop (many coroutines)                   scheduler thread (one)
    ───────────────────────────                    ──────────────────────
    Scheduler.submit(seq)  ── FIFO (bounded) ──▶   admit up to `max_active`
    stream(seq) awaits seq's asyncio.Queue  ◀──    step(): prefill / sample / decode, emit via
                                                   loop.call_soon_threadsafe(queue.put_nowait, event)
    consumer gone → seq.cancel() (threading.Event) checked before every step → retired within one token
    Scheduler.call(fn) ── jobs ───────────────▶   fn() run between two steps; result via a Future

The model-specific work lives behind `Runner` (see `llamacpp.py`), so this module is plain threading and
asyncio. `call` runs other work that must happen on the thread owning the context (libmtmd tokenizing
images for `count_prompt_tokens`). `max_active` is 1 today; the loop already steps a list of active
sequences so that continuous batching only needs a runner whose `step` decodes all of them in one
`llama_decode`.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from tokentill.engines.base import EngineEvent, Finished, FinishReason, TextDelta, Usage
from tokentill.engines.text import TextAssembler
from tokentill.errors import APIError, DeadlineExceeded, Overloaded, UpstreamError

__all__ = ["Runner", "SamplingParams", "Scheduler", "Sequence", "stream"]

logger = logging.getLogger(__name__)

_STATS_KEPT = 1024  # request ids whose decoded-token count stays queryable

T = TypeVar("T")


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None  # None = a fresh random seed per request


class _Channel:
    """Scheduler thread → event loop handoff; `put` is the only method called off the loop thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.queue: asyncio.Queue[EngineEvent | APIError] = asyncio.Queue()

    def put(self, item: EngineEvent | APIError) -> bool:
        """False when the loop is closed (the consumer can never read it): the caller should stop."""
        try:
            self._loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # loop closed; nobody is listening any more
            return False
        return True


@dataclass(eq=False)
class Sequence:
    """One request inside the scheduler. Fields below `cancelled` belong to the scheduler thread."""

    request_id: str
    prompt: list[int]
    max_new_tokens: int  # already clamped so prompt + completion fits the context
    sampling: SamplingParams
    stop: tuple[str, ...]
    deadline: float  # time.monotonic()
    channel: _Channel
    timeout_s: float = 0.0  # for the DeadlineExceeded message only
    continuation: bool = False  # a later pass of an admitted request: next in line, never refused
    # A multimodal prompt the runner understands (`prompt` is then empty): its token counts are given here,
    # computed by the same tokenization the runner will use, so usage stays exact.
    media: Any = None
    media_prompt_tokens: int = 0  # all prompt tokens, image tokens included (only with `media`)
    image_tokens: int = 0
    cancelled: threading.Event = field(default_factory=threading.Event)
    # --- scheduler-thread state ---
    prefilled: bool = False
    n_generated: int = 0  # sampled tokens, end-of-generation token excluded
    cached_tokens: int = 0  # prompt tokens whose KV entries were reused
    started_at: float = 0.0
    text: TextAssembler = field(init=False)

    def __post_init__(self) -> None:
        self.text = TextAssembler(self.stop)

    @property
    def prompt_tokens(self) -> int:
        return self.media_prompt_tokens if self.media is not None else len(self.prompt)

    def cancel(self) -> None:
        """Thread-safe; the scheduler retires the sequence before its next token."""
        self.cancelled.set()

    def emit(self, item: EngineEvent | APIError) -> None:
        if not self.channel.put(item):
            self.cancelled.set()


class Runner(Protocol):
    """Model operations, all called on the scheduler thread only."""

    def prefill(self, seq: Sequence) -> None:
        """Put the prompt in the KV cache (reusing a cached prefix; set `seq.cached_tokens`)."""

    def sample(self, seq: Sequence) -> int:
        """Sample the next token from the latest logits with `seq`'s sampler."""

    def is_end(self, token: int) -> bool:
        """True for end-of-generation tokens (EOS / EOT): they end the sequence and emit no text."""

    def piece(self, token: int) -> bytes:
        """The token's bytes (possibly a partial UTF-8 character)."""

    def decode(self, seq: Sequence, token: int) -> None:
        """Append `token` to `seq`'s KV cache so the next `sample` sees it."""

    def release(self, seq: Sequence) -> None:
        """Free per-sequence state (sampler); the KV cache may stay for prefix reuse."""

    def reset(self) -> None:
        """Forget all cached state after a failure."""


class Scheduler:
    """Bounded FIFO admission + one decode thread. `submit`, `withdraw`, `close` are thread-safe."""

    def __init__(self, runner: Runner, *, queue_size: int, name: str, max_active: int = 1) -> None:
        self._runner = runner
        self._queue_size = queue_size
        self._max_active = max_active
        self._cond = threading.Condition()
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._active: list[Sequence] = []
        self._calls: collections.deque[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = (
            collections.deque()
        )
        self._closing = False
        self._avg_seconds = 1.0  # moving average of a request's time in the loop, for Retry-After
        self._decoded: collections.OrderedDict[str, int] = collections.OrderedDict()
        self.total_tokens = 0
        self._thread = threading.Thread(target=self._run, name=f"tokentill-decode-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._waiting)

    def tokens_decoded(self, request_id: str) -> int | None:
        """Tokens sampled for a finished (or cancelled) request, None while unknown; for tests and metrics."""
        with self._cond:
            return self._decoded.get(request_id)

    def submit(self, seq: Sequence) -> None:
        """Queue `seq` or raise Overloaded at once when `queue_size` requests already wait."""
        with self._cond:
            if self._closing:
                raise Overloaded("The model is shutting down. Retry shortly.", retry_after_s=5.0)
            if seq.continuation:
                self._waiting.appendleft(seq)
                self._cond.notify()
                return
            busy = len(self._active) + len(self._waiting)
            if busy >= self._max_active + self._queue_size:
                n = len(self._waiting)
                retry = self._avg_seconds * (n + 1) / self._max_active
                raise Overloaded(
                    f"The model is busy: {n} requests are queued. Retry shortly.", retry_after_s=retry
                )
            self._waiting.append(seq)
            self._cond.notify()

    def call(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        """Run `fn()` on the decode thread between two steps; its result or exception lands in the Future.

        For native state that only the decode thread may touch. Jobs run before the next step, so a caller
        waits for at most one token (or one prefill). On `close` pending jobs fail with Overloaded.
        """
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._cond:
            if self._closing:
                raise Overloaded("The model is shutting down. Retry shortly.", retry_after_s=5.0)
            self._calls.append((fn, future))
            self._cond.notify()
        return future

    def withdraw(self, seq: Sequence) -> None:
        """Cancel `seq`; if it is still waiting it leaves the queue now (freeing its slot)."""
        seq.cancel()
        with self._cond:
            try:
                self._waiting.remove(seq)
            except ValueError:
                pass  # already admitted (the loop retires it) or already finished

    def close(self, timeout: float | None = None) -> None:
        """Stop the loop: waiting and active sequences fail with Overloaded; blocks until the thread ends."""
        with self._cond:
            self._closing = True
            orphans = list(self._waiting) + list(self._active)
            self._waiting.clear()
            calls = list(self._calls)
            self._calls.clear()
            self._cond.notify_all()
        for _, future in calls:
            if future.set_running_or_notify_cancel():
                future.set_exception(
                    Overloaded("The model is shutting down. Retry shortly.", retry_after_s=5.0)
                )
        for seq in orphans:
            seq.cancel()
            seq.emit(Overloaded("The model is shutting down. Retry shortly.", retry_after_s=5.0))
        if self._thread.is_alive():
            self._thread.join(timeout)

    # --- scheduler thread -------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._closing or self._active or self._waiting or self._calls):
                    self._cond.wait()
                if self._closing:
                    leftovers = list(self._active)
                    self._active.clear()
                    break
                while self._waiting and len(self._active) < self._max_active:
                    seq = self._waiting.popleft()
                    seq.started_at = time.monotonic()
                    self._active.append(seq)
                active = list(self._active)
                calls = list(self._calls)
                self._calls.clear()
            for fn, future in calls:
                _run_call(fn, future)
            for seq in active:
                if self._step(seq):
                    self._retire(seq)
        for seq in leftovers:  # close() already told their consumers
            self._retire(seq)

    def _retire(self, seq: Sequence) -> None:
        try:
            self._runner.release(seq)
        except Exception:  # a leak at worst; the loop must survive
            logger.exception("releasing sequence %s failed", seq.request_id)
        elapsed = time.monotonic() - seq.started_at
        with self._cond:
            if seq in self._active:
                self._active.remove(seq)
            self._avg_seconds = 0.8 * self._avg_seconds + 0.2 * elapsed
            self._decoded[seq.request_id] = seq.n_generated
            while len(self._decoded) > _STATS_KEPT:
                self._decoded.popitem(last=False)

    def _step(self, seq: Sequence) -> bool:
        """Advance `seq` by one token; True when it is finished (its final event already emitted)."""
        if seq.cancelled.is_set() or self._closing:
            return True
        if time.monotonic() > seq.deadline:
            seq.emit(_deadline_error(seq))
            return True
        try:
            if not seq.prefilled:
                self._runner.prefill(seq)
                seq.prefilled = True
            token = self._runner.sample(seq)
            if self._runner.is_end(token):
                return self._finish(seq, "stop")
            seq.n_generated += 1
            self.total_tokens += 1
            text, stopped = seq.text.feed_bytes(self._runner.piece(token))
            if text:
                seq.emit(TextDelta(text))
            if stopped:
                return self._finish(seq, "stop")
            if seq.n_generated >= seq.max_new_tokens:
                return self._finish(seq, "length")
            self._runner.decode(seq, token)
            return False
        except APIError as exc:  # the runner refused this request (e.g. a prompt that does not fit)
            logger.info("request %s refused by the runner: %s", seq.request_id, exc.message)
            self._reset_quietly()
            seq.emit(exc)
            return True
        except Exception as exc:
            logger.exception("llama.cpp failed while generating request %s", seq.request_id)
            self._reset_quietly()
            error = UpstreamError("The model failed to generate a response.")
            error.__cause__ = exc
            seq.emit(error)
            return True

    def _reset_quietly(self) -> None:
        try:
            self._runner.reset()
        except Exception:
            logger.exception("resetting the model context failed")

    def _finish(self, seq: Sequence, reason: FinishReason) -> bool:
        tail = seq.text.finish()
        if tail:
            seq.emit(TextDelta(tail))
        usage = Usage(
            prompt_tokens=seq.prompt_tokens,
            completion_tokens=seq.n_generated,
            cached_tokens=seq.cached_tokens,
            image_tokens=seq.image_tokens,
        )
        seq.emit(Finished(finish_reason=reason, usage=usage))
        return True


def _run_call(fn: Callable[[], Any], future: concurrent.futures.Future[Any]) -> None:
    if not future.set_running_or_notify_cancel():
        return
    try:
        future.set_result(fn())
    except BaseException as exc:  # handed to the caller's thread; the loop itself must survive
        future.set_exception(exc)


def _deadline_error(seq: Sequence) -> DeadlineExceeded:
    return DeadlineExceeded(f"The request timed out after {seq.timeout_s:.1f} seconds.")


def new_channel() -> _Channel:
    """A channel bound to the running loop (call from the coroutine that will consume it)."""
    return _Channel(asyncio.get_running_loop())


async def stream(scheduler: Scheduler, seq: Sequence) -> AsyncGenerator[EngineEvent, None]:
    """Submit `seq` and relay its events; errors from the loop are raised here, on the consumer's side.

    Cancellation: if the consumer stops iterating (aclose → GeneratorExit at `yield`) or its task is
    cancelled (CancelledError at `await`), `finally` withdraws the sequence; nothing here blocks the loop.
    """
    scheduler.submit(seq)
    done = False
    queue = seq.channel.queue
    try:
        while True:
            if queue.empty():
                remaining = seq.deadline - time.monotonic()
                if remaining <= 0:
                    raise _deadline_error(seq)
                try:
                    item = await asyncio.wait_for(queue.get(), timeout=remaining)
                except TimeoutError:
                    raise _deadline_error(seq) from None
            else:
                item = queue.get_nowait()
            if isinstance(item, APIError):
                done = True
                raise item
            if isinstance(item, Finished):
                done = True
                yield item
                return
            yield item
    finally:
        if not done:
            scheduler.withdraw(seq)
