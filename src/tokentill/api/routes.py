"""The HTTP routes: parse, call one service, render."""

from __future__ import annotations

import contextlib
import hmac
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from tokentill import errors, metrics
from tokentill.api.completions import complete, limit_headers_on_errors
from tokentill.api.state import services_of
from tokentill.auth.service import Principal
from tokentill.billing.money import format_credits
from tokentill.limits import LimiterUnavailable
from tokentill.protocol import responses
from tokentill.protocol.chat import ChatCompletionRequest, decode_chat_body

__all__ = ["router"]

router = APIRouter()


def presented_key(request: Request) -> str | None:
    """The Bearer token, else `x-api-key`; another Authorization scheme (a proxy's Basic) does not hide
    the x-api-key header."""
    header = request.headers.get("authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    return request.headers.get("x-api-key") or None


async def authenticate(request: Request) -> Principal:
    services = services_of(request)
    principal = await services.keys.authenticate(presented_key(request))
    request.state.remaining_credits = principal.balance  # read with the key, no second query
    return principal


Authenticated = Annotated[Principal, Depends(authenticate)]


async def authenticate_cached(request: Request) -> Principal:
    """`authenticate` from this replica's key cache (the chat routes: see `_answer`)."""
    principal = await services_of(request).keys.authenticate(presented_key(request), cached=True)
    request.state.remaining_credits = principal.balance  # as old as the cached key; fresh on errors
    return principal


CachedKey = Annotated[Principal, Depends(authenticate_cached)]


async def _answer(
    request: Request, principal: Principal, answer: Callable[[Principal], Awaitable[Response]]
) -> Response:
    """`answer(principal)`, where `principal` may come from the key cache: a refusal is given only once
    the key is read afresh. A key revoked meanwhile is then the 401; a hold refused because the key
    changed (`StaleKey`), or a 429 under limits that have changed since, is admitted once more under the
    key as it is now. Every error shows the balance, and the rate limits, as they are now."""
    try:
        return await answer(principal)
    except errors.APIError as exc:
        if isinstance(exc, errors.ServiceUnavailable | LimiterUnavailable):
            raise  # the database or the limiter is out: asking again would only wait again
        with anyio.CancelScope(shield=True):
            try:
                fresh = await authenticate(request)  # raises the 401 if the key is gone now
            except errors.AuthenticationFailed:
                raise
            except errors.APIError:
                raise exc from None  # the key cannot be read now: the original refusal stands
        limits_changed = (fresh.rpm, fresh.tpm, fresh.max_concurrent) != (
            principal.rpm,
            principal.tpm,
            principal.max_concurrent,
        )
        if isinstance(exc, errors.StaleKey) or (isinstance(exc, errors.RateLimited) and limits_changed):
            return await answer(fresh)
        if limits_changed:  # the refusal stands; its x-ratelimit-* headers are the key's as it is now
            for name in [name for name in exc.headers if name.startswith("x-ratelimit-")]:
                del exc.headers[name]
            with anyio.CancelScope(shield=True), contextlib.suppress(errors.APIError):
                exc.headers.update(await services_of(request).chat.limit_headers(fresh))
        raise


# Bodies above this are decoded and validated in a worker thread: a 32 MiB body of a million tiny parts
# takes seconds of CPU, which on the event loop would stall every other request and stream.
THREAD_PARSE_BYTES = 1024 * 1024
MAX_MODEL_ID_CHARS = 128


async def _chat_body(request: Request) -> tuple[Any, ChatCompletionRequest]:
    raw = await request.body()
    if len(raw) > THREAD_PARSE_BYTES:
        return await anyio.to_thread.run_sync(decode_chat_body, raw)
    return decode_chat_body(raw)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, principal: CachedKey) -> Response:
    async def answer(principal: Principal) -> Response:
        async with limit_headers_on_errors(request, principal):
            payload, body = await _chat_body(request)
            if body.model is None:
                raise errors.InvalidRequest(
                    "Missing required parameter: 'model'.", code="missing_required_parameter", param="model"
                )
            return await complete(request, principal, body.model, body, payload)

    return await _answer(request, principal, answer)


def _with_balance(request: Request, content: dict[str, Any]) -> JSONResponse:
    """Every authenticated response carries the balance `authenticate` read (Segmind's header)."""
    balance = format_credits(request.state.remaining_credits)
    return JSONResponse(content, headers={"x-remaining-credits": balance})


@router.get("/v1/models")
async def list_models(request: Request, principal: Authenticated) -> JSONResponse:
    services = services_of(request)
    created = services.started
    data = [
        responses.model_object(spec.id, created, spec.owned_by)
        for spec in services.catalog
        if principal.models is None or spec.id in principal.models
    ]
    return _with_balance(request, {"object": "list", "data": data})


@router.get("/v1/models/{model_id}")
async def get_model(request: Request, principal: Authenticated, model_id: str) -> JSONResponse:
    services = services_of(request)
    spec = services.chat.model(model_id)
    if principal.models is not None and spec.id not in principal.models:
        principal.check_model(spec.id)
    return _with_balance(request, responses.model_object(spec.id, services.started, spec.owned_by))


# After the GET /v1/models routes: for OPTIONS or PUT on /v1/models, Starlette answers 405 with the Allow
# header of the first route whose path matches, which must be theirs (GET), not this POST.
@router.post("/v1/{model}")
async def chat_by_path(request: Request, principal: CachedKey, model: str) -> Response:
    async def answer(principal: Principal) -> Response:
        async with limit_headers_on_errors(request, principal):
            if len(model) > MAX_MODEL_ID_CHARS:  # no catalogue id is this long; don't echo it back whole
                raise errors.NotFound(
                    f"The model '{model[:32]}…' does not exist or you do not have access to it.",
                    code="model_not_found",
                    param="model",
                )
            payload, body = await _chat_body(request)
            if body.model is not None and body.model != model:
                raise errors.InvalidRequest(
                    f"The body's model '{body.model}' does not match the model in the URL, '{model}'.",
                    code="invalid_value",
                    param="model",
                )
            return await complete(request, principal, model, body, payload)

    return await _answer(request, principal, answer)


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    services = services_of(request)
    ok = services.ready and await services.db.ping()
    return JSONResponse({"status": "ready" if ok else "not ready"}, status_code=200 if ok else 503)


def _require_metrics_key(request: Request) -> None:
    """With TOKENTILL_METRICS_KEY set, /metrics wants it (or the admin key) as a Bearer token, else 401."""
    settings = services_of(request).settings
    if settings.metrics_key is None:
        return
    given = presented_key(request)
    challenge = {"WWW-Authenticate": 'Bearer realm="metrics"'}
    if given is None:
        raise errors.AuthenticationFailed(
            "/metrics needs the metrics key (TOKENTILL_METRICS_KEY) as a Bearer token.",
            code="missing_api_key",
            headers=challenge,
        )
    for secret in (settings.metrics_key, settings.admin_key):
        if secret is not None and hmac.compare_digest(given.encode(), secret.get_secret_value().encode()):
            return
    raise errors.AuthenticationFailed("Incorrect metrics key.", code="invalid_api_key", headers=challenge)


@router.get("/metrics")
async def prometheus_metrics(request: Request) -> Response:
    _require_metrics_key(request)
    source = metrics.registry(services_of(request).settings.metrics_multiproc_dir)
    return Response(generate_latest(source), media_type=CONTENT_TYPE_LATEST)
