"""The HTTP routes: parse, call one service, render."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing, asynccontextmanager
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from tokentill import errors
from tokentill.api.sse import first_error, sse_stream
from tokentill.api.state import services_of
from tokentill.auth.service import Principal
from tokentill.billing.money import format_credits
from tokentill.chat import PreparedChat
from tokentill.engines.base import EngineEvent, Finished, TextDelta
from tokentill.idempotency import Claim, Replay, check_key, fingerprint, track_stream
from tokentill.protocol import responses
from tokentill.protocol.chat import ChatCompletionRequest, parse_chat_request

__all__ = ["router"]

router = APIRouter()


def presented_key(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        return None
    return request.headers.get("x-api-key") or None


async def authenticate(request: Request) -> Principal:
    services = services_of(request)
    principal = await services.keys.authenticate(presented_key(request))
    request.state.remaining_credits = await services.ledger.balance(principal.account_id)
    return principal


Authenticated = Annotated[Principal, Depends(authenticate)]


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise errors.InvalidRequest(
            "We could not parse the JSON body of your request. The OpenAI API expects a JSON payload.",
            code="invalid_json",
        ) from exc


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, principal: Authenticated) -> Response:
    async with _limit_headers(request, principal):
        payload = await _json_body(request)
        body = parse_chat_request(payload)
        if body.model is None:
            raise errors.InvalidRequest(
                "Missing required parameter: 'model'.", code="missing_required_parameter", param="model"
            )
        return await _complete(request, principal, body.model, body, payload)


@router.post("/v1/{model}")
async def chat_by_path(
    request: Request, principal: Authenticated, model: Annotated[str, Path(max_length=128)]
) -> Response:
    async with _limit_headers(request, principal):
        payload = await _json_body(request)
        body = parse_chat_request(payload)
        if body.model is not None and body.model != model:
            raise errors.InvalidRequest(
                f"The body's model '{body.model}' does not match the model in the URL, '{model}'.",
                code="invalid_value",
                param="model",
            )
        return await _complete(request, principal, model, body, payload)


@asynccontextmanager
async def _limit_headers(request: Request, principal: Principal) -> AsyncIterator[None]:
    """Give an error response to a limited key its x-ratelimit-* headers too (a 429 has its own)."""
    try:
        yield
    except errors.APIError as exc:
        if not any(name.startswith("x-ratelimit-") for name in exc.headers):
            with anyio.CancelScope(shield=True):
                exc.headers.update(await services_of(request).chat.limit_headers(principal))
        raise


async def _complete(
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


@router.get("/v1/models")
async def list_models(request: Request, principal: Authenticated) -> dict[str, Any]:
    services = services_of(request)
    created = services.started
    data = [
        responses.model_object(spec.id, created, spec.owned_by)
        for spec in services.catalog
        if principal.models is None or spec.id in principal.models
    ]
    return {"object": "list", "data": data}


@router.get("/v1/models/{model_id}")
async def get_model(request: Request, principal: Authenticated, model_id: str) -> dict[str, Any]:
    services = services_of(request)
    spec = services.chat.model(model_id)
    if principal.models is not None and spec.id not in principal.models:
        principal.check_model(spec.id)
    return responses.model_object(spec.id, services.started, spec.owned_by)


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    services = services_of(request)
    ok = services.ready and await services.db.ping()
    return JSONResponse({"status": "ready" if ok else "not ready"}, status_code=200 if ok else 503)


@router.get("/metrics")
async def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
