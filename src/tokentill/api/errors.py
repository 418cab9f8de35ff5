"""Render every failure once, as the OpenAI error envelope with the status from DESIGN §3."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.routing import compile_path

from tokentill import errors
from tokentill.billing.money import format_credits

__all__ = ["error_response", "install_error_handlers", "render_bug", "render_handled"]

log = logging.getLogger(__name__)


def error_response(request: Request, error: errors.APIError) -> JSONResponse:
    request.state.error_code = error.code  # for the response counter (api/middleware.py)
    headers = dict(error.headers)
    balance = getattr(request.state, "remaining_credits", None)
    if balance is not None:
        headers["x-remaining-credits"] = format_credits(balance)
    body = error.body()
    services = getattr(request.app.state, "services", None)
    if services is not None:  # a message may quote an upstream, which may quote our key
        body["error"]["message"] = services.redact(body["error"]["message"])
    return JSONResponse(body, status_code=error.status, headers=headers)


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, errors.APIError)
    if exc.status >= 500:
        log.warning("request %s failed: %s %s", getattr(request.state, "request_id", "-"), exc.status, exc)
    return error_response(request, exc)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    error: errors.APIError
    if isinstance(exc.__cause__, errors.APIError):
        # FastAPI turns whatever fails while it reads a body into "400 error parsing the body": ours (the
        # body read timeout's 408) keeps its own status.
        error = exc.__cause__
    elif exc.status_code == 404:
        error = errors.NotFound(
            f"Unknown request URL: {request.method} {request.url.path}. Please check the URL for typos.",
            code="unknown_url",
        )
    elif exc.status_code == 405:
        error = errors.MethodNotAllowed(
            f"Method {request.method} is not allowed for {request.url.path}.",
            headers={**(exc.headers or {}), **_allow_header(request)},
        )
    elif exc.status_code == 413:
        error = errors.RequestTooLarge("The request body is larger than this server accepts.")
    else:
        error = errors.InvalidRequest(str(exc.detail), code="invalid_request")
    return error_response(request, error)


def _allow_header(request: Request) -> dict[str, str]:
    """`Allow` listing every method of the path, not only those of the one route Starlette tried (GET and
    POST /admin/accounts are two routes). Read from the OpenAPI document, which lists each path once: the
    literal path if there is one (/v1/models, not the POST /v1/{model} template that also matches it)."""
    paths: dict[str, dict[str, Any]] = request.app.openapi().get("paths", {})
    operations = paths.get(request.url.path)
    if operations is None:
        operations = next(
            (ops for template, ops in paths.items() if compile_path(template)[0].match(request.url.path)), {}
        )
    methods = sorted(m.upper() for m in operations if m in _METHODS)
    return {"Allow": ", ".join(methods)} if methods else {}


_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})


async def render_handled(request: Request, exc: Exception) -> Response | None:
    """What the exception middleware would answer for `exc` (an `APIError`, an `HTTPException`, a client
    gone mid-body); None for anything else, which is a bug for the outermost handler (`_bug`). For routes
    served outside FastAPI's router (api/fastpath.py)."""
    if isinstance(exc, errors.APIError):
        return await _api_error(request, exc)
    if isinstance(exc, HTTPException):
        return await _http_error(request, exc)
    if isinstance(exc, ClientDisconnect):
        return await _client_gone(request, exc)
    return None


async def _client_gone(request: Request, exc: Exception) -> Response:
    """A client that hung up before its request body arrived: nobody is left to answer, and nothing was
    admitted. A 499 (the status nginx logs for it, and the usage rows' "client went away") for the
    response counter, logged as an event, not as a server error."""
    request_id = getattr(request.state, "request_id", "-")
    log.info("request %s: the client closed the connection before its body arrived", request_id)
    request.state.error_code = "client_closed_request"
    return Response(status_code=499)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's own body validation (admin routes); the chat routes validate in `protocol`."""
    assert isinstance(exc, RequestValidationError)
    problems = exc.errors()
    first = problems[0] if problems else {}
    param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
    missing = first.get("type") == "missing"
    message = (
        f"Missing required parameter: '{param}'."
        if missing
        else f"Invalid value for '{param}': {first.get('msg')}."
    )
    code = "missing_required_parameter" if missing else "invalid_value"
    return error_response(request, errors.InvalidRequest(message, code=code, param=param))


def render_bug(request: Request, exc: Exception) -> JSONResponse:
    """An unexpected exception: logged with its traceback, answered 500 with the request id (which
    `RequestMiddleware`, outside every handler, also sends as `x-request-id`)."""
    request_id = getattr(request.state, "request_id", "-")
    log.error("request %s: unhandled error", request_id, exc_info=exc, extra={"request_id": request_id})
    return error_response(
        request,
        errors.InternalError(
            f"The server had an error while processing your request. Request id: {request_id}."
        ),
    )


async def _bug(request: Request, exc: Exception) -> JSONResponse:
    return render_bug(request, exc)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(errors.APIError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(ClientDisconnect, _client_gone)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _bug)
