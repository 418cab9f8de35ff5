"""Chat completions from a validated request to a response: idempotent replay, JSON or SSE rendering.

`complete` is what both chat routes call. It answers once per `Idempotency-Key` (replaying a stored answer
or recording a new one), runs the chat service, and renders its events — collected into one JSON object,
or as server-sent events. A client that hangs up cancels the generation in both renderings.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing, asynccontextmanager
from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tokentill import errors
from tokentill.api.sse import first_error, sse_stream
from tokentill.api.state import services_of
from tokentill.auth.service import Principal
from tokentill.billing.money import format_credits
from tokentill.chat import PreparedChat
from tokentill.engines.base import EngineEvent, Finished, TextDelta
from tokentill.idempotency import Claim, Replay, check_key, fingerprint, track_stream
from tokentill.protocol import responses
from tokentill.protocol.chat import ChatCompletionRequest

__all__ = ["complete", "limit_headers_on_errors"]


@asynccontextmanager
async def limit_headers_on_errors(request: Request, principal: Principal) -> AsyncIterator[None]:
    """Give an error response to a limited key its x-ratelimit-* headers too (a 429 has its own)."""
    try:
        yield
    except errors.APIError as exc:
        if not any(name.startswith("x-ratelimit-") for name in exc.headers):
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
    route = "chat.completions" if request.url.path == "/v1/chat/completions" else "model"
    outcome = await services.idempotency.claim(
        principal.account_id,
        check_key(key),
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
    if body.stream:
        return await _stream(request, prepared, body, completion_id, created, claim)
    try:
        return await _collect(request, prepared, completion_id, created, claim)
    finally:
        with anyio.CancelScope(shield=True):
            request.state.remaining_credits = await services.chat.balance(principal.account_id)


async def _collect(
    request: Request, chat: PreparedChat, completion_id: str, created: int, claim: Claim | None
) -> Response:
    """Run the event stream to the end; a client that hangs up cancels the generation."""
    content: list[str] = []
    reasoning: list[str] = []
    finished: Finished | None = None

    async def consume() -> None:
        nonlocal finished
        async with aclosing(services_of(request).chat.run(chat)) as events:
            async for event in events:
                if isinstance(event, TextDelta):
                    (reasoning if event.reasoning else content).append(event.text)
                else:
                    finished = event
        tg.cancel_scope.cancel()

    async def watch_disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        tg.cancel_scope.cancel()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            tg.start_soon(watch_disconnect)
    except BaseExceptionGroup as group:
        raise first_error(group) from None
    if finished is None:  # the client went away; nobody reads this response
        if claim is not None:
            await services_of(request).idempotency.release(claim)
        return Response(status_code=499)
    services = services_of(request)
    balance = await services.chat.balance(chat.principal.account_id)
    request.state.remaining_credits = balance
    payload = responses.completion(
        completion_id=completion_id,
        created=created,
        model=chat.spec.id,
        content="".join(content),
        finish_reason=finished.finish_reason,
        usage=finished.usage,
        reasoning_content="".join(reasoning) if chat.include_reasoning else None,
    )
    if claim is not None:
        # Stored before the client sees it: a retry that arrives now finds the answer, not a 409.
        stored = {"x-original-request-id": chat.request_id}
        await services.idempotency.complete(claim, status=200, body=payload, headers=stored)
    return JSONResponse(
        payload, headers={"x-remaining-credits": format_credits(balance), **chat.lease.headers}
    )


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
    first = await anext(run)
    events: AsyncGenerator[EngineEvent, None] = _prepend(first, run)
    if claim is not None:
        events = track_stream(events, services.idempotency, claim)
    stream = sse_stream(
        events,
        completion_id=completion_id,
        created=created,
        model=chat.spec.id,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
        include_reasoning=chat.include_reasoning,
    )
    headers = {
        "x-remaining-credits": format_credits(chat.balance_after_hold),
        "cache-control": "no-cache",
        "x-accel-buffering": "no",
        **chat.lease.headers,
    }
    return StreamingResponse(stream, media_type="text/event-stream", headers=headers)


async def _prepend(
    first: EngineEvent, rest: AsyncGenerator[EngineEvent, None]
) -> AsyncGenerator[EngineEvent, None]:
    async with aclosing(rest):
        yield first
        async for event in rest:
            yield event
