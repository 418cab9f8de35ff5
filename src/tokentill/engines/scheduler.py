"""The decode loop: one thread that owns the model context and steps admitted sequences.

    event loop (many coroutines)                   scheduler thread (one)
    ───────────────────────────                    ──────────────────────
    Scheduler.submit(seq)  ── FIFO (bounded) ──▶   admit up to `max_active` (continuations first)
    stream(seq) awaits seq's asyncio.Queue  ◀──    step: sample / emit / queue each sequence's next token,
                                                   emit via loop.call_soon_threadsafe(queue.put_nowait, …)
    consumer gone → seq.cancel() (threading.Event) checked before every step → retired within one token
    Scheduler.call(fn) ── jobs ───────────────▶   fn() run between two steps; result via a Future

The model-specific work lives behind a runner (see `batch.py`), so this module is plain threading and
asyncio. Two kinds of runner:
  * `Runner`: one sequence at a time; `prefill` and `decode` evaluate at once (scripted test runners).
  * `BatchRunner` (continuous batching): `decode` and `prefill_chunk` only *queue* tokens; one `flush` per
    step evaluates every active sequence's next token and a chunk of each new prompt in a single
    `llama_decode`. A step samples all ready sequences first and prefills after, because a prefill may
    evaluate on its own (images) and that overwrites the logits the samplers read.
`call` runs other work that must happen on the thread owning the context (libmtmd tokenizing images for
`count_prompt_tokens`).

Follow-ups (the scratchpad's answer, batching runners only): a sequence with `follow_up` does not leave
when its pass ends. Its consumer gets a `PassEnd`, and a new `Sequence` for the second pass takes its
place in the same step, sharing its channel, deadline and cancel event: the runner hands it the slot with
its KV cells (`BatchRunner.follow`), so only the follow-up's own prompt is evaluated, as a prefill.
Slots freed in a step are refilled from the queue in that same step.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any, Protocol, TypeVar, runtime_checkable

from tokentill.engines.sequence import (
    Outbox,
    PassEnd,
    SamplingParams,
    Sequence,
    deadline_error,
    new_channel,
)
from tokentill.errors import APIError, Overloaded, UpstreamError
from tokentill.types import EngineEvent, Finished, FinishReason, Usage

__all__ = ["BatchRunner", "Runner", "SamplingParams", "Scheduler", "Sequence", "new_channel", "stream"]

logger = logging.getLogger(__name__)

_STATS_KEPT = 1024  # request ids whose decoded-token count stays queryable

T = TypeVar("T")


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


@runtime_checkable
class BatchRunner(Runner, Protocol):
    """A `Runner` whose `decode` only queues the token; see the module docstring for the step order.

    `prefill` is not used: `prefill_chunk` queues part of the prompt per step. `sample` reads the logits
    of the last `flush`.
    """

    def prefill_chunk(self, seq: Sequence) -> bool:
        """Start or continue `seq`'s prompt (queue at most one chunk); True once its last token is queued.

        Raises before queuing anything for `seq` if it fails, so a batch never holds half a failure.
        """

    def flush(self) -> None:
        """Evaluate every queued token in one batch; raising means every queued sequence failed."""

    def discard(self, seq: Sequence) -> None:
        """Like `release`, and drop the KV cells of `seq` too (after its own failure)."""

    def follow(self, seq: Sequence, then: Sequence, tail: list[int]) -> bool:
        """Hand `seq`'s slot and KV cells to its follow-up `then`, whose prompt is evaluated after `tail`
        (sampled tokens of `seq` not decoded yet). The end of `seq`'s output is dropped if the follow-up
        would not fit the context otherwise. Sets `then.prefix` and `then.cached_tokens`. False (nothing
        changed) when even that cannot make room; raises before changing anything if it fails.
        """


class Scheduler:
    """Bounded FIFO admission + one decode thread. `submit`, `withdraw`, `close` are thread-safe.

    At most `max_active` sequences decode together (the runner's parallel slots); `queue_size` more may
    wait, beyond that `submit` raises Overloaded. Continuations skip the queue and its bound.
    """

    def __init__(self, runner: Runner, *, queue_size: int, name: str, max_active: int = 1) -> None:
        self._runner = runner
        # Continuous batching when the runner supports it; otherwise the original one-at-a-time steps.
        self._batch: BatchRunner | None = runner if isinstance(runner, BatchRunner) else None
        self._queue_size = queue_size
        self._max_active = max_active
        self._cond = threading.Condition()
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._active: list[Sequence] = []
        self._calls: collections.deque[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = (
            collections.deque()
        )
        self._closing = False
        self._outbox = Outbox()  # scheduler thread only
        self._avg_seconds = 1.0  # moving average of a request's time in the loop, for Retry-After
        # request id → (tokens sampled, prompt tokens evaluated), every pass included
        self._decoded: collections.OrderedDict[str, tuple[int, int]] = collections.OrderedDict()
        self.total_tokens = 0
        self._thread = threading.Thread(target=self._run, name=f"tokentill-decode-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def queued(self) -> int:
        with self._cond:
            return len(self._waiting)

    @property
    def running(self) -> int:
        with self._cond:
            return len(self._active)

    def tokens_decoded(self, request_id: str) -> int | None:
        """Tokens sampled for a finished (or cancelled) request, None while unknown; for tests and metrics."""
        with self._cond:
            stats = self._decoded.get(request_id)
        return None if stats is None else stats[0]

    def prompt_tokens_evaluated(self, request_id: str) -> int | None:
        """Prompt tokens a finished request had evaluated (cached prefixes excluded), None while unknown."""
        with self._cond:
            stats = self._decoded.get(request_id)
        return None if stats is None else stats[1]

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
        for seq in orphans:  # emit_now: the outbox belongs to the scheduler thread
            seq.cancel()
            seq.emit_now(Overloaded("The model is shutting down. Retry shortly.", retry_after_s=5.0))
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
                self._admit_waiting()
                active = list(self._active)
                calls = list(self._calls)
                self._calls.clear()
            for fn, future in calls:
                _run_call(fn, future)
            if self._batch is not None:
                self._step_batch(self._batch, active)
                continue
            for seq in active:
                if self._step(seq):
                    self._retire(seq)
                self._outbox.send()
        for seq in leftovers:  # close() already told their consumers
            self._retire(seq)
        self._outbox.send()

    def _admit_waiting(self) -> list[Sequence]:
        """Move waiting sequences into free slots (caller holds `_cond`); returns them."""
        admitted: list[Sequence] = []
        while self._waiting and len(self._active) < self._max_active:
            seq = self._waiting.popleft()
            seq.started_at = time.monotonic()
            seq.outbox = self._outbox
            self._active.append(seq)
            admitted.append(seq)
        return admitted

    def _retire(self, seq: Sequence, *, failed: bool = False) -> None:
        try:
            if failed and self._batch is not None:
                self._batch.discard(seq)  # its cells may be half-written: never reuse them
            else:
                self._runner.release(seq)
        except Exception:  # a leak at worst; the loop must survive
            logger.exception("releasing sequence %s failed", seq.request_id)
        elapsed = time.monotonic() - seq.started_at
        with self._cond:
            if seq in self._active:
                self._active.remove(seq)
            self._avg_seconds = 0.8 * self._avg_seconds + 0.2 * elapsed
            self._decoded[seq.request_id] = (seq.earlier + seq.n_generated, seq.evaluated)
            while len(self._decoded) > _STATS_KEPT:
                self._decoded.popitem(last=False)

    def _gone(self, seq: Sequence) -> bool:
        """True when `seq` must leave before its next token (cancelled, closing, or past its deadline)."""
        if seq.cancelled.is_set() or self._closing:
            return True
        if time.monotonic() > seq.deadline:
            seq.emit(deadline_error(seq))
            return True
        return False

    def _step(self, seq: Sequence) -> bool:
        """One-at-a-time runner: advance `seq` by one token; True when finished (final event emitted)."""
        if self._gone(seq):
            return True
        try:
            if not seq.prefilled:
                self._runner.prefill(seq)
                seq.prefilled = True
            return self._advance(seq) is None
        except Exception as exc:
            self._fail(seq, exc)
            self._reset_quietly()
            return True

    def _step_batch(self, runner: BatchRunner, active: list[Sequence]) -> None:
        """Sample every ready sequence, queue prompt chunks, then evaluate them all in one `flush`."""
        done: list[tuple[Sequence, bool]] = []  # (sequence, failed)
        prefilling: list[Sequence] = []
        queued: list[Sequence] = []
        for seq in active:
            if self._gone(seq):
                done.append((seq, False))
            elif not seq.prefilled:
                prefilling.append(seq)
            else:
                try:
                    going = self._advance(seq)
                except Exception as exc:
                    self._fail(seq, exc)
                    done.append((seq, True))
                    continue
                if going is None:
                    done.append((seq, False))
                elif going is seq:
                    queued.append(seq)
                else:  # its follow-up, in the same slot: its prompt is queued below, in this step
                    prefilling.append(going)
        for seq, failed in done:  # none of them has a token in the batch: their cells can go now
            self._retire(seq, failed=failed)
        done = []
        with self._cond:  # the slots just freed take waiting requests in this same step
            prefilling.extend(self._admit_waiting())
        for seq in prefilling:  # after sampling: an image prefill evaluates on its own, clobbering logits
            try:
                seq.prefilled = runner.prefill_chunk(seq)
                queued.append(seq)
            except Exception as exc:
                self._fail(seq, exc)
                done.append((seq, True))
        for seq, failed in done:
            self._retire(seq, failed=failed)
        self._outbox.send()  # the loop renders this step's text while llama_decode runs (GIL released)
        try:
            runner.flush()
        except Exception as exc:  # the whole batch is lost: every sequence in it fails
            logger.exception("llama_decode failed for a batch of %d sequences", len(queued))
            for seq in queued:
                self._fail(seq, exc, log=False)
            self._reset_quietly()
            for seq in queued:
                self._retire(seq, failed=True)
            self._outbox.send()

    def _advance(self, seq: Sequence) -> Sequence | None:
        """Sample `seq`'s next token and emit its text. Returns `seq` when the token is queued for decoding,
        None when `seq` finished (its final event emitted), or the follow-up that now holds its slot."""
        token = self._runner.sample(seq)
        if self._runner.is_end(token):
            return self._finish(seq, "stop")
        seq.n_generated += 1
        self.total_tokens += 1
        # Every token leaves on a delta now, with or without text, so a consumer that goes away has been
        # told about (and pays for) every token generated for it.
        for delta in seq.text.feed_bytes(self._runner.piece(token)):
            seq.emit(delta)
        if seq.text.stopped:
            return self._finish(seq, "stop", token)
        if seq.n_generated >= seq.max_new_tokens:
            return self._finish(seq, "length", token)
        self._runner.decode(seq, token)
        return seq

    def _fail(self, seq: Sequence, exc: Exception, *, log: bool = True) -> None:
        """Tell `seq`'s consumer: an APIError as is (the runner refused it), anything else as a 502."""
        if isinstance(exc, APIError):
            logger.info("request %s refused by the runner: %s", seq.request_id, exc.message)
            seq.emit(exc)
            return
        if log:
            logger.error("llama.cpp failed while generating request %s", seq.request_id, exc_info=exc)
        error = UpstreamError("The model failed to generate a response.")
        error.__cause__ = exc
        seq.emit(error)

    def _reset_quietly(self) -> None:
        try:
            self._runner.reset()
        except Exception:
            logger.exception("resetting the model context failed")

    def _finish(self, seq: Sequence, reason: FinishReason, last: int | None = None) -> Sequence | None:
        """End `seq`'s pass (`last`: its final sampled token, not decoded); its follow-up, if one starts."""
        for delta in seq.text.finish():  # held-back text, no new tokens
            seq.emit(delta)
        usage = Usage(
            prompt_tokens=seq.prompt_tokens,
            completion_tokens=seq.n_generated,
            cached_tokens=seq.cached_tokens,
            image_tokens=seq.image_tokens,
        )
        finished = Finished(finish_reason=reason, usage=usage)
        then = self._follow(seq, [] if last is None else [last])
        if then is None:
            seq.emit(finished)
            return None
        seq.emit(PassEnd(finished))
        return then

    def _follow(self, seq: Sequence, tail: list[int]) -> Sequence | None:
        """`seq`'s follow-up, holding its slot in its place, or None (no follow-up, no budget or no room)."""
        plan = seq.follow_up
        left = 0 if plan is None else plan.budget - seq.n_generated
        if plan is None or left < 1 or self._batch is None:
            return None
        then = Sequence(
            request_id=seq.request_id,
            prompt=plan.prompt,
            max_new_tokens=left,
            sampling=plan.sampling,
            stop=plan.stop,
            deadline=seq.deadline,
            channel=seq.channel,
            timeout_s=seq.timeout_s,
            continuation=True,
            image_tokens=seq.image_tokens,
            cancelled=seq.cancelled,
        )
        then.started_at, then.outbox = seq.started_at, seq.outbox
        then.earlier, then.evaluated = seq.earlier + seq.n_generated, seq.evaluated
        if not self._batch.follow(seq, then, tail):
            return None
        with self._cond:
            self._active[self._active.index(seq)] = then
        return then


def _run_call(fn: Callable[[], Any], future: concurrent.futures.Future[Any]) -> None:
    if not future.set_running_or_notify_cancel():
        return
    try:
        future.set_result(fn())
    except BaseException as exc:  # handed to the caller's thread; the loop itself must survive
        future.set_exception(exc)


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
                    raise deadline_error(seq)
                try:
                    async with asyncio.timeout(remaining):  # no extra task per event, unlike wait_for
                        item = await queue.get()
                except TimeoutError:
                    raise deadline_error(seq) from None
            else:
                item = queue.get_nowait()
            if isinstance(item, APIError):
                done = True
                raise item
            if isinstance(item, Finished):
                done = True
                yield item
                return
            yield item.finished if isinstance(item, PassEnd) else item
    finally:
        if not done:
            scheduler.withdraw(seq)
