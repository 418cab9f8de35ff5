"""Chat completions from a validated request to a response: JSON, SSE, or a stored answer replayed.

`complete` is what both chat routes call. It hands the request to the lifecycle (`tokentill.lifecycle`:
idempotency claim, admission, the run, settlement, release) and renders what comes back: a replayed
answer, the collected answer as one JSON object, or the events as server-sent events.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import Request
from fastapi.responses import Response

from tokentill import errors
from tokentill.api.sse import EventStreamResponse, until_disconnect
from tokentill.api.state import services_of
from tokentill.auth.service import Principal
from tokentill.billing.money import format_credits
from tokentill.jsonbytes import dumps
from tokentill.lifecycle import Answer, Replayed, Run
from tokentill.limits import LimiterUnavailable
from tokentill.protocol.chat import ChatCompletionRequest
from tokentill.types import EngineEvent, Finished, TextDelta, ToolCallDelta, Usage

__all__ = [
    "HTTPClient",
    "JSONBytesResponse",
    "complete",
    "limit_headers_on_errors",
    "replay_headers",
    "stream_headers",
]


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


class HTTPClient:
    """The lifecycle's view of the HTTP client: has it hung up, and the balance its response shows
    (`x-remaining-credits`, also on error responses: see api/errors.py)."""

    def __init__(self, request: Request) -> None:
        self._request = request

    async def gone(self) -> None:
        await until_disconnect(self._request.receive)

    def show_balance(self, ucr: int) -> None:
        self._request.state.remaining_credits = ucr


class JSONBytesResponse(Response):
    """Starlette's `JSONResponse`, rendered by `jsonbytes.dumps` (orjson) like the stream's chunks."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return dumps(content)


_STREAM_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


async def complete(
    request: Request, principal: Principal, model: str, body: ChatCompletionRequest, payload: Any
) -> Response:
    """Answer once per Idempotency-Key: replay a stored answer, or run and record (see lifecycle)."""
    completion_id = "chatcmpl-" + secrets.token_hex(12)
    created = int(time.time())

    def render(answer: Answer) -> dict[str, Any]:
        return answer.completion(
            completion_id=completion_id,
            created=created,
            model=model,
            include_reasoning=bool(body.include_reasoning),
        )

    admitted = await services_of(request).lifecycle.admit(
        principal,
        model,
        body,
        request_id=request.state.request_id,
        client=HTTPClient(request),
        render=render,
        idempotency_key=request.headers.get("idempotency-key"),
        route="chat.completions" if request.url.path == "/v1/chat/completions" else "model",
        payload=payload,
    )
    if isinstance(admitted, Replayed):
        # Read now: a principal from the key cache carries a balance up to a second old.
        now = await services_of(request).chat.balance(principal.account_id)
        return _replay(admitted, body, format_credits(now))
    if not body.stream:
        collected = await admitted.collect()
        if collected is None:  # the client went away; nobody reads this response
            return Response(status_code=499)
        balance = format_credits(collected.balance)
        return JSONBytesResponse(collected.body, headers={"x-remaining-credits": balance, **admitted.headers})
    events = await admitted.stream()
    if events is None:
        return Response(status_code=499)
    return EventStreamResponse(
        events,
        completion_id=completion_id,
        created=created,
        model=model,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
        include_reasoning=bool(body.include_reasoning),
        headers=stream_headers(admitted),
        on_close=admitted.aclose,
    )


def _replay(replayed: Replayed, body: ChatCompletionRequest, balance: str) -> Response:
    stored = replayed.stored
    headers = replay_headers(replayed, balance)
    if stored.streamed:
        return _replay_stream(stored.body, body, headers)
    return JSONBytesResponse(stored.body, status_code=stored.status, headers=headers)


def stream_headers(run: Run) -> dict[str, str]:
    """A stream's headers: the balance after the hold (the bill comes at its end), no caching, and the
    run's rate-limit headers."""
    return {
        "x-remaining-credits": format_credits(run.prepared.balance_after_hold),
        **_STREAM_HEADERS,
        **run.headers,
    }


def replay_headers(replayed: Replayed, balance: str) -> dict[str, str]:
    """A replayed answer's headers: the first answer's, the key's limits as they stand, `balance`, and
    `idempotent-replayed`; a stream's are a stream's."""
    headers = {
        **replayed.stored.headers,
        **replayed.limit_headers,
        "x-remaining-credits": balance,
        "idempotent-replayed": "true",
    }
    return {**headers, **_STREAM_HEADERS} if replayed.stored.streamed else headers


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
