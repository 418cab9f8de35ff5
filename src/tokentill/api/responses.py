"""The Responses API: `POST /v1/responses`, `GET` and `DELETE /v1/responses/{id}`.

A Responses request is translated into the chat completion it amounts to (`protocol.responses_api`) and
goes through the same lifecycle as chat — keys, credits, holds, rate limits, Idempotency-Key — then is
rendered by `protocol.response_objects.ResponseBuilder`: one `response` object, or its `response.*`
server-sent events. With `store` (the default) the final object is kept (`stored_responses`) before the
client sees its end, so a `retrieve` or a `previous_response_id` right after finds it.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from tokentill import errors
from tokentill.api.account import parse_limit
from tokentill.api.completions import (
    HTTPClient,
    JSONBytesResponse,
    limit_headers_on_errors,
    replay_headers,
    stream_headers,
)
from tokentill.api.routes import THREAD_PARSE_BYTES, Authenticated, _with_balance
from tokentill.api.sse import Item, KeepAlive, PumpedEventStream, next_item
from tokentill.api.state import services_of
from tokentill.auth.service import Principal
from tokentill.billing.money import format_credits
from tokentill.jsonbytes import dumps
from tokentill.lifecycle import Answer, Replayed, first_error
from tokentill.protocol.response_objects import ResponseBuilder
from tokentill.protocol.responses_api import ResponsesRequest, decode_responses_body, to_chat
from tokentill.protocol.stored_objects import input_items, item_page, replay_events
from tokentill.types import Finished

__all__ = ["responses_router"]

log = logging.getLogger(__name__)

responses_router = APIRouter()

MAX_PAGE = 100  # input items per page (OpenAI's limit)


@responses_router.post("/v1/responses")
async def create_response(request: Request, principal: Authenticated) -> Response:
    async with limit_headers_on_errors(request, principal):
        raw = await request.body()
        if len(raw) > THREAD_PARSE_BYTES:
            payload, body = await anyio.to_thread.run_sync(decode_responses_body, raw)
        else:
            payload, body = decode_responses_body(raw)
        return await _respond(request, principal, body, payload)


@responses_router.get("/v1/responses/{response_id}")
async def retrieve_response(request: Request, principal: Authenticated, response_id: str) -> JSONResponse:
    found = await services_of(request).responses.get(principal.account_id, response_id)
    return _with_balance(request, found.body)


@responses_router.get("/v1/responses/{response_id}/input_items")
async def list_input_items(
    request: Request,
    principal: Authenticated,
    response_id: str,
    limit: str | None = None,
    order: str = "desc",
    after: str | None = None,
) -> JSONResponse:
    count = 20 if limit is None else parse_limit(limit)
    if not 1 <= count <= MAX_PAGE or order not in {"asc", "desc"}:
        bad = "limit" if order in {"asc", "desc"} else "order"
        raise errors.InvalidRequest(
            f"Invalid '{bad}': 'limit' is 1 to {MAX_PAGE}, 'order' is 'asc' or 'desc'.", param=bad
        )
    found = await services_of(request).responses.get(principal.account_id, response_id)
    items = input_items(found.conversation, response_id)
    return _with_balance(request, item_page(items, order=order, limit=count, after=after))


@responses_router.delete("/v1/responses/{response_id}")
async def delete_response(request: Request, principal: Authenticated, response_id: str) -> JSONResponse:
    await services_of(request).responses.delete(principal.account_id, response_id)
    return _with_balance(request, {"id": response_id, "object": "response.deleted", "deleted": True})


async def _respond(request: Request, principal: Principal, body: ResponsesRequest, payload: Any) -> Response:
    services = services_of(request)
    history: list[dict[str, Any]] = []
    if body.previous_response_id is not None:
        history = await services.responses.history(principal.account_id, body.previous_response_id)
    chat = to_chat(body, history)
    response_id = "resp_" + secrets.token_hex(24)
    created = int(time.time())

    def builder() -> ResponseBuilder:
        return ResponseBuilder(response_id=response_id, created_at=created, model=body.model, request=body)

    rendered: list[ResponseBuilder] = []  # the finished answer, once the lifecycle rendered it

    def render(answer: Answer) -> dict[str, Any]:
        made = builder()
        rendered.append(made)
        return made.from_answer(answer)

    async def keep(made: ResponseBuilder) -> None:
        await services.responses.keep(
            made, request=body, history=history, account_id=principal.account_id, key_id=principal.key_id
        )

    admitted = await services.lifecycle.admit(
        principal,
        body.model,
        chat,
        request_id=request.state.request_id,
        client=HTTPClient(request),
        render=render,
        idempotency_key=request.headers.get("idempotency-key"),
        route="responses",
        payload=payload,
    )
    if isinstance(admitted, Replayed):
        stored = admitted.stored
        headers = replay_headers(admitted, format_credits(principal.balance))
        if stored.streamed:
            return _replay_stream(stored.body, headers)
        return JSONBytesResponse(stored.body, status_code=stored.status, headers=headers)
    if not body.stream:
        collected = await admitted.collect()
        if rendered:
            # Also when the client left: an Idempotency-Key's answer runs to its end and is replayed
            # to the retry, whose `retrieve` must then find it.
            with anyio.CancelScope(shield=True):
                await keep(rendered[-1])
        if collected is None:  # the client went away; nobody reads this response
            return Response(status_code=499)
        balance = format_credits(collected.balance)
        return JSONBytesResponse(collected.body, headers={"x-remaining-credits": balance, **admitted.headers})
    events = await admitted.stream()
    if events is None:
        return Response(status_code=499)
    made = builder()

    def frames(items: MemoryObjectReceiveStream[Item]) -> AsyncGenerator[bytes, None]:
        return _frames(items, made, keep)

    return PumpedEventStream(events, frames, headers=stream_headers(admitted), on_close=admitted.aclose)


def _sse(event: dict[str, Any]) -> bytes:
    return f"event: {event['type']}\ndata: ".encode() + dumps(event) + b"\n\n"


async def _frames(
    items: MemoryObjectReceiveStream[Item],
    made: ResponseBuilder,
    keep: Callable[[ResponseBuilder], Awaitable[None]],
) -> AsyncGenerator[bytes, None]:
    """The `response.*` events of what the pump sends; the final object is stored (when asked) before
    `response.completed` goes out. An error after the start is an `error` event and `response.failed`."""
    alive = KeepAlive()
    async with items:
        yield b"".join(_sse(event) for event in made.start())
        while True:
            try:
                item = await next_item(items)
            except anyio.EndOfStream:
                return
            if isinstance(item, Exception):
                yield _failure(item, made)
                return
            if item is None:
                out = alive.tick()  # nothing visible for a while: keep proxies from timing out
            else:
                out = b"".join(_sse(event) for event in made.feed(item))
            if isinstance(item, Finished):
                with anyio.CancelScope(shield=True):
                    await keep(made)
            if out:
                alive.sent()
            yield out  # b"" too (see `Frames`)


def _failure(exc: BaseException, made: ResponseBuilder) -> bytes:
    failure = first_error(exc)
    if not isinstance(failure, errors.APIError):
        log.error("stream %s failed", made.response_id, exc_info=failure)
        failure = errors.InternalError("The server had an error while streaming the response.")
    return b"".join(_sse(event) for event in made.failed(failure.body()["error"]))


def _replay_stream(stored: dict[str, Any], headers: dict[str, str]) -> PumpedEventStream:
    """A stored `response` sent again as the events it was streamed as (each text in one delta)."""

    async def nothing() -> AsyncGenerator[Any, None]:
        return
        yield

    async def frames(items: MemoryObjectReceiveStream[Item]) -> AsyncGenerator[bytes, None]:
        async with items:
            yield b"".join(_sse(event) for event in replay_events(stored))

    return PumpedEventStream(nothing(), frames, headers=headers)
