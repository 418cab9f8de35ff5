"""Chat completions from a validated request to a response: idempotent replay, JSON or SSE rendering.

`complete` is what both chat routes call. It answers once per `Idempotency-Key` (replaying a stored answer
or recording a new one), runs the chat service, and renders its events — collected into one JSON object,
or as server-sent events. A client that hangs up cancels the generation in both renderings, with one
exception: a non-streamed request that carries an Idempotency-Key runs to the end and stores its answer,
so that the client's retry (what an SDK does after a timeout) replays it and the account pays once.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import aclosing, asynccontextmanager
from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from tokentill import errors
from tokentill.api.sse import EventStreamResponse, first_error
from tokentill.api.state import services_of
from tokentill.auth.service import Principal
from tokentill.billing.money import format_credits
from tokentill.chat import PreparedChat
from tokentill.idempotency import Claim, Replay, check_key, fingerprint, track_stream
from tokentill.limits import LimiterUnavailable
from tokentill.protocol import responses
from tokentill.protocol.chat import ChatCompletionRequest
from tokentill.types import EngineEvent, Finished, TextDelta, ToolCallDelta, Usage

__all__ = ["complete", "limit_headers_on_errors"]


@asynccontextmanager
async def limit_headers_on_errors(request: Request, principal: Principal) -> AsyncIterator[None]:
    """Give an error response to a limited key its x-ratelimit-* headers too (a 429 has its own)."""
    try:
        yield
    except errors.APIError as exc:
        # The limiter's own 503 means its backend is unreachable: asking it again would only wait again.
        if not isinstance(exc, LimiterUnavailable) and not any(
            name.startswith("x-ratelimit-") for name in exc.headers
        ):
            with anyio.CancelScope(shield=True):
                exc.headers.update(await services_of(request).chat.limit_headers(principal))
        raise


async def complete(
    request: Request, principal: Principal, model: str, body: ChatCompletionRequest, payload: Any
) -> Response:
    """Answer once per Idempotency-Key: replay a stored answer, or run and record (see idempotency)."""
    services = services_of(request)
    key = request.headers.get("idempotency-key")
    if key is None:
        return await _answer(request, principal, model, body, None)
    key = check_key(key)
    route = "chat.completions" if request.url.path == "/v1/chat/completions" else "model"
    # A stored answer goes only to keys that may use its model, as a fresh request would.
    principal.check_model(services.chat.model(model).id)
    outcome = await services.idempotency.claim(
        principal.account_id,
        key,
        fingerprint(route, model, payload),
        request.state.request_id,
    )
    if isinstance(outcome, Replay):
        headers = {
            **outcome.headers,
            **await services.chat.limit_headers(principal),
            "x-remaining-credits": format_credits(request.state.remaining_credits),
            "idempotent-replayed": "true",
        }
        if outcome.streamed:
            return _replay_stream(outcome.body, body, {**headers, **_STREAM_HEADERS})
        return JSONResponse(outcome.body, status_code=outcome.status, headers=headers)
    try:
        return await _answer(request, principal, model, body, outcome)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await services.idempotency.release(outcome)
        raise


async def _answer(
    request: Request, principal: Principal, model: str, body: ChatCompletionRequest, claim: Claim | None
) -> Response:
    services = services_of(request)
    prepared = await services.chat.prepare(principal, model, body, request.state.request_id)
    request.state.remaining_credits = prepared.balance_after_hold
    completion_id = "chatcmpl-" + secrets.token_hex(12)
    created = int(time.time())
    try:
        if body.stream:
            return await _stream(request, prepared, body, completion_id, created, claim)
        return await _collect(request, prepared, completion_id, created, claim)
    finally:
        with anyio.CancelScope(shield=True):
            # Cancelled before the chat ever ran (the client left at once): return its hold and lease.
            await services.chat.abandon(prepared)
            if not body.stream:
                # The balance the settlement returned; read again only if it failed.
                request.state.remaining_credits = (
                    prepared.balance_after
                    if prepared.balance_after is not None
                    else await services.chat.balance(principal.account_id)
                )


async def _collect(
    request: Request, chat: PreparedChat, completion_id: str, created: int, claim: Claim | None
) -> Response:
    """Run the event stream to the end; a client that hangs up cancels the generation, unless the
    request holds an Idempotency-Key (then its answer is stored for the retry)."""
    collected = responses.Answer()
    gone = False

    async def consume() -> None:
        async with aclosing(services_of(request).chat.run(chat)) as events:
            async for event in events:
                collected.add(event)
        tg.cancel_scope.cancel()

    async def watch_disconnect() -> None:
        nonlocal gone
        await _client_gone(request)
        gone = True
        if claim is None:
            tg.cancel_scope.cancel()
        # With a claim the generation goes on: the SDK's retry will replay its stored answer.

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            tg.start_soon(watch_disconnect)
    except BaseExceptionGroup as group:
        raise first_error(group) from None
    if collected.finished is None:  # the client went away; nobody reads this response
        if claim is not None:
            await services_of(request).idempotency.release(claim)
        return Response(status_code=499)
    services = services_of(request)
    payload = collected.completion(
        completion_id=completion_id,
        created=created,
        model=chat.spec.id,
        include_reasoning=chat.include_reasoning,
    )
    if claim is not None:
        # Stored before the client sees it: a retry that arrives now finds the answer, not a 409.
        stored = {"x-original-request-id": chat.request_id}
        await services.idempotency.complete(claim, status=200, body=payload, headers=stored)
    if gone:
        return Response(status_code=499)
    # The run settled before its last event was consumed: its balance is the one to show.
    balance = chat.balance_after
    if balance is None:
        balance = await services.chat.balance(chat.principal.account_id)
    request.state.remaining_credits = balance
    return JSONResponse(
        payload, headers={"x-remaining-credits": format_credits(balance), **chat.lease.headers}
    )


_STREAM_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


async def _stream(
    request: Request,
    chat: PreparedChat,
    body: ChatCompletionRequest,
    completion_id: str,
    created: int,
    claim: Claim | None,
) -> Response:
    services = services_of(request)
    run = services.chat.run(chat)
    # Wait for the engine's first event before answering, so that a failure before any output (queue
    # full, upstream down, deadline) is an ordinary HTTP error rather than a 200 carrying an error event.
    # Meanwhile watch the client: one that leaves while the request is still queued pays nothing.
    first = await _first_event(request, run)
    if first is None:
        if claim is not None:
            await services.idempotency.release(claim)
        return Response(status_code=499)
    events: AsyncGenerator[EngineEvent, None] = _prepend(first, run)
    if claim is not None:

        def answer(collected: responses.Answer) -> dict[str, Any]:
            return collected.completion(
                completion_id=completion_id,
                created=created,
                model=chat.spec.id,
                include_reasoning=chat.include_reasoning,
            )

        stored = {"x-original-request-id": chat.request_id}
        events = track_stream(events, services.idempotency, claim, answer, stored)
    headers = {
        "x-remaining-credits": format_credits(chat.balance_after_hold),
        **_STREAM_HEADERS,
        **chat.lease.headers,
    }

    async def close_unstreamed() -> None:
        # Starlette never closes a body it did not finish, and one it never began (the client left
        # before the first byte) is not even started: settle the chat and free the key here.
        with contextlib.suppress(RuntimeError):  # "already running": its own `finally` settles
            await run.aclose()
        if claim is not None:
            await services.idempotency.release(claim)  # a no-op once the answer is stored

    return EventStreamResponse(
        events,
        completion_id=completion_id,
        created=created,
        model=chat.spec.id,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
        include_reasoning=chat.include_reasoning,
        headers=headers,
        on_close=close_unstreamed,
    )


def _replay_stream(
    stored: dict[str, Any], body: ChatCompletionRequest, headers: Mapping[str, str]
) -> EventStreamResponse:
    """A stored `chat.completion` rendered again as the stream it came from: same id, text and usage
    (the text arrives in one delta, the reasoning in another when it was asked for)."""
    choice = stored["choices"][0]
    usage = stored["usage"]
    events: list[EngineEvent] = []
    if choice["message"].get("reasoning_content"):
        events.append(TextDelta(choice["message"]["reasoning_content"], reasoning=True))
    events.append(TextDelta(choice["message"]["content"] or ""))
    for index, call in enumerate(choice["message"].get("tool_calls") or ()):
        function = call["function"]
        events.append(ToolCallDelta(index, call["id"], function["name"], function["arguments"]))
    events.append(
        Finished(
            choice["finish_reason"],
            Usage(
                prompt_tokens=usage["prompt_tokens"],
                completion_tokens=usage["completion_tokens"],
                cached_tokens=usage["prompt_tokens_details"]["cached_tokens"],
                reasoning_tokens=usage["completion_tokens_details"]["reasoning_tokens"],
                image_tokens=usage["prompt_tokens_details"].get("image_tokens", 0),
            ),
        )
    )

    async def replayed() -> AsyncGenerator[EngineEvent, None]:
        for event in events:
            yield event

    return EventStreamResponse(
        replayed(),
        completion_id=stored["id"],
        created=stored["created"],
        model=stored["model"],
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
        include_reasoning="reasoning_content" in choice["message"],
        headers=headers,
    )


async def _client_gone(request: Request) -> None:
    """Return once the client has hung up (the request body is already read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _first_event(request: Request, run: AsyncGenerator[EngineEvent, None]) -> EngineEvent | None:
    """`run`'s first event, or None when the client hung up first (`run` is then closed: settled)."""
    first: EngineEvent | None = None

    async def take_first() -> None:
        nonlocal first
        first = await anext(run)
        tg.cancel_scope.cancel()

    async def watch_disconnect() -> None:
        await _client_gone(request)
        tg.cancel_scope.cancel()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(take_first)
            tg.start_soon(watch_disconnect)
    except BaseExceptionGroup as group:
        raise first_error(group) from None
    if first is None:
        with anyio.CancelScope(shield=True):
            await run.aclose()
    return first


async def _prepend(
    first: EngineEvent, rest: AsyncGenerator[EngineEvent, None]
) -> AsyncGenerator[EngineEvent, None]:
    async with aclosing(rest):
        yield first
        async for event in rest:
            yield event
