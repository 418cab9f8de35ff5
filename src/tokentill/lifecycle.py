"""One billable request from admission to release: the single owner of its claim, hold, lease and bill.

A route parses, hands the request to `Lifecycle.admit`, and renders what comes back:

    admit        Idempotency-Key claimed (or its stored answer returned: `Replayed`, nothing runs),
                 then `ChatService.prepare`: model, permission, images, context, rate-limit lease,
                 credit hold                                                           → `Run`
    Run.collect  the whole answer, then the balance it left            → `Collected`, None: client gone
    Run.stream   the first event, then every event as a generator      → events, None: client gone
    settle       exactly once, on every exit, shielded from cancellation (`ChatService.settle`):
                 finished → the usage; client gone → the tokens made; engine failure → nothing,
                 unless tokens were already streamed
    release      on every exit: the claim keeps the answer the client was charged for, else it is
                 deleted so the key may be retried

Ownership: `admit` releases what it took when it fails. `collect` ends the run whatever happens.
`stream` ends it when it fails or the client left; otherwise the returned generator ends it when it is
closed, and `Run.aclose` (the response's on-close hook) ends it when the body was never iterated
(Starlette never starts a body whose client left first). `aclose` is safe to call at any time, again.

The client is seen through `Client`: whether it has gone, and the balance to show it. A client that
leaves cancels the generation, except for a non-streamed request holding an Idempotency-Key: that one
runs to the end and stores its answer, so the client's retry (what an SDK does after a timeout) replays
it and the account pays once. Nothing here knows HTTP or the wire format: an idempotent request's
stored answer is whatever the route's `render(Answer)` makes of it, so another API shape (the Responses
API) reuses this unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Protocol

import anyio

from tokentill import errors
from tokentill.auth.service import Principal
from tokentill.chat import ChatService, PreparedChat
from tokentill.idempotency import Claim, IdempotencyStore, Replay, check_key, fingerprint
from tokentill.protocol.chat import ChatCompletionRequest
from tokentill.protocol.responses import Answer
from tokentill.types import EngineEvent, Finished, TextDelta, ToolCallDelta

__all__ = ["Answer", "Client", "Collected", "Lifecycle", "Replayed", "Run", "first_error", "watch_beside"]

log = logging.getLogger(__name__)


class Client(Protocol):
    """What the lifecycle needs of the client on the other end (the api package's HTTP request)."""

    async def gone(self) -> None:
        """Return once the client has hung up (never, while it listens)."""

    def show_balance(self, ucr: int) -> None:
        """The account balance this request's response (or error) reports, in µcr."""


Render = Callable[[Answer], Any]
"""A finished answer (text, hidden reasoning, tool calls, how it ended: `protocol.responses.Answer`) as
the route's API shape writes it; stored for an Idempotency-Key's replay."""


@dataclass(frozen=True)
class Replayed:
    """An earlier request with this Idempotency-Key answered already: its stored answer, and the key's
    rate-limit headers as they stand (a replay takes no lease and no credits)."""

    stored: Replay
    limit_headers: dict[str, str]


@dataclass(frozen=True)
class Collected:
    """A non-streamed run that finished: the answer, `render(answer)`, and the balance it left."""

    answer: Answer
    body: Any
    balance: int


class Lifecycle:
    """Admits requests into `Run`s; shared by every request, safe to use concurrently."""

    def __init__(self, chat: ChatService, idempotency: IdempotencyStore) -> None:
        self._chat = chat
        self._idempotency = idempotency

    async def admit(
        self,
        principal: Principal,
        model: str,
        body: ChatCompletionRequest,
        *,
        request_id: str,
        client: Client,
        render: Render,
        idempotency_key: str | None = None,
        route: str = "",
        payload: Any = None,
    ) -> Replayed | Run:
        """Claim `idempotency_key` (if any) for the fingerprint of (`route`, `model`, `payload`), then
        prepare the chat. Raises what admission refuses (400/402/403/404/409/429/503), having released
        whatever it took."""
        claim: Claim | None = None
        if idempotency_key is not None:
            key = check_key(idempotency_key)
            # A stored answer goes only to keys that may use its model, as a fresh request would.
            principal.check_model(self._chat.model(model).id)
            outcome = await self._idempotency.claim(
                principal.account_id, key, fingerprint(route, model, payload), request_id
            )
            if isinstance(outcome, Replay):
                return Replayed(outcome, await self._chat.limit_headers(principal))
            claim = outcome
        try:
            prepared = await self._chat.prepare(principal, model, body, request_id)
        except BaseException:
            if claim is not None:
                with anyio.CancelScope(shield=True):
                    await self._idempotency.release(claim)
            raise
        client.show_balance(prepared.balance_after_hold)
        return Run(self._chat, self._idempotency, prepared, claim, client, render)


class Run:
    """One admitted request: holds its credit hold, rate-limit lease and claim until it ends (see the
    module docstring for who ends it). All its mutable state lives here, owned by one object."""

    def __init__(
        self,
        chat: ChatService,
        idempotency: IdempotencyStore,
        prepared: PreparedChat,
        claim: Claim | None,
        client: Client,
        render: Render,
    ) -> None:
        self.prepared = prepared
        self._chat = chat
        self._idempotency = idempotency
        self._claim = claim
        self._client = client
        self._render = render
        self._events: AsyncGenerator[EngineEvent, None] | None = None
        self._started = False  # the engine was asked: `_generate`'s own `finally` settles
        self._settled = False
        self._claim_closed = claim is None
        self._answer: Answer | None = None
        self._balance_after: int | None = None  # what settlement left; None: not settled, or it failed

    @property
    def headers(self) -> dict[str, str]:
        """The rate-limit headers of the lease this run holds."""
        return dict(self.prepared.lease.headers)

    async def collect(self) -> Collected | None:
        """Run to the end and settle; None when the client went away (nobody reads the answer)."""
        try:
            self._events = self._tracked(self._generate())

            async def consume() -> None:
                assert self._events is not None
                async with aclosing(self._events) as events:
                    async for _event in events:
                        pass

            # With a claim the generation goes on when the client leaves: the retry replays its answer.
            gone = await self._until_gone(consume, stop=self._claim is None)
            if self._answer is None or gone:
                return None
            balance = await self._final_balance()
            return Collected(self._answer, self._render(self._answer), balance)
        finally:
            with anyio.CancelScope(shield=True):
                await self._close()
                # The balance the settlement returned; read again only if it failed.
                self._client.show_balance(await self._final_balance())

    async def stream(self) -> AsyncGenerator[EngineEvent, None] | None:
        """The events, once the first is known; None when the client went away first.

        Waiting for the first event before answering makes a failure before any output (queue full,
        upstream down, deadline) an ordinary error rather than a 200 carrying an error event; a client
        that leaves while the request is still queued pays nothing.
        """
        try:
            events = self._events = self._tracked(self._generate())
            first: list[EngineEvent] = []

            async def take_first() -> None:
                first.append(await anext(events))

            await self._until_gone(take_first, stop=True)
            if not first:
                await self.aclose()
                return None
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._close()
            raise
        return _prepend(first[0], events)

    async def aclose(self) -> None:
        """End the run now if nothing else has: settle (a run that never started charges nothing) and
        release the claim. Safe to call again and from any `finally`."""
        with anyio.CancelScope(shield=True):
            await self._close()

    async def _close(self) -> None:
        """`aclose`'s work, for a caller already inside a shielded scope."""
        if self._events is not None:
            # "already running": the body's own pump is inside it, and its `finally` ends the run.
            with contextlib.suppress(RuntimeError):
                await self._events.aclose()
        if not self._started:
            await self.prepared.abandon()
            await self._settle(None, 0, 0, 499)
        await self._release_claim()

    async def _generate(self) -> AsyncGenerator[EngineEvent, None]:
        """The engine's events; settles in `finally` whether the consumer finishes, fails or goes away."""
        generated = 0
        reasoning = 0
        finished: Finished | None = None
        status = 499  # until proven otherwise: the consumer stopped listening
        self._started = True
        chat = self.prepared
        try:
            # Closed as soon as this generator is: a client that leaves stops the engine (and closes an
            # upstream's response) at once, not when the garbage collector gets to it.
            async with aclosing(chat.generate()) as events:
                async for event in events:
                    if isinstance(event, TextDelta):
                        generated += event.tokens
                        if event.reasoning:
                            reasoning += event.tokens
                    elif isinstance(event, ToolCallDelta):
                        generated += event.tokens
                    else:
                        finished = event
                        status = 200
                    yield event
        except errors.APIError as exc:
            status = exc.status
            raise
        except Exception:
            status = 500
            raise
        finally:
            # Starlette cancels the body iterator when the client disconnects: the money must still move.
            with anyio.CancelScope(shield=True):
                await self._settle(finished, generated, reasoning, status)

    async def _tracked(self, events: AsyncGenerator[EngineEvent, None]) -> AsyncGenerator[EngineEvent, None]:
        """Pass `events` through, adding up the answer; when they end, the claim keeps the answer if the
        run finished (exactly when the full answer is charged), else it is released. The inner events
        are closed first (they settle under their own shield), then the claim, shielded too."""
        answer = Answer()
        try:
            async with aclosing(events):
                async for event in events:
                    answer.add(event)
                    if answer.finished is not None:
                        self._answer = answer
                    yield event
        finally:
            if self._claim is not None and not self._claim_closed:  # else nothing to await, no shield
                with anyio.CancelScope(shield=True):
                    if self._answer is not None:
                        # Stored before the client sees the end: a retry that arrives now finds the answer.
                        self._claim_closed = True
                        await self._idempotency.complete(
                            self._claim,
                            status=200,
                            body=self._render(self._answer),
                            headers={"x-original-request-id": self.prepared.request_id},
                            streamed=self.prepared.stream,
                        )
                    await self._release_claim()

    async def _settle(self, finished: Finished | None, generated: int, reasoning: int, status: int) -> None:
        if self._settled:
            return
        self._settled = True
        self._balance_after = await self._chat.settle(self.prepared, finished, generated, reasoning, status)

    async def _release_claim(self) -> None:
        if self._claim is not None and not self._claim_closed:
            self._claim_closed = True
            await self._idempotency.release(self._claim)

    async def _final_balance(self) -> int:
        if self._balance_after is not None:
            return self._balance_after
        return await self._chat.balance(self.prepared.principal.account_id)

    async def _until_gone(self, work: Callable[[], Awaitable[None]], *, stop: bool) -> bool:
        """Run `work` while watching the client; whether the client went away. With `stop`, a client
        that goes cancels `work`; without, `work` runs on to its end."""
        gone = False
        with anyio.CancelScope() as scope:

            async def watch() -> None:
                nonlocal gone
                await self._client.gone()
                gone = True
                if stop:
                    scope.cancel()

            watcher = watch_beside(watch())
            try:
                await work()  # in this task: one task per request is the watcher's
            finally:
                watcher.cancel()
        return gone


def watch_beside(watch: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
    """`watch` (a watcher of the client, which holds nothing that needs a shield) in a plain asyncio task
    beside the caller's work; the caller ends it with `cancel()` when the work is done. An anyio task
    group would end it through `CancelScope.cancel`, which formats the cancelling task's repr for its
    message: about 50 µs on every request. What the watcher fails with is logged."""
    task = asyncio.ensure_future(watch)
    task.add_done_callback(_log_failure)
    return task


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (failure := task.exception()) is not None:
        log.error("watching the client failed", exc_info=failure)


async def _prepend(
    first: EngineEvent, rest: AsyncGenerator[EngineEvent, None]
) -> AsyncGenerator[EngineEvent, None]:
    async with aclosing(rest):
        yield first
        async for event in rest:
            yield event


def first_error(exc: BaseException) -> BaseException:
    """The first real error inside (nested) exception groups from a task group."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc
