"""`/openapi.json` as the server behaves, not as FastAPI guesses.

FastAPI's generated document is wrong for this server in ways clients and fuzzers notice: it lists 422
(every input error here is a 400 envelope), the chat routes parse their own body so it shows none, and
`/metrics` is Prometheus text, not JSON. `openapi_schema(app)` takes FastAPI's document and fixes it:

* every input error is a 400 whose body is the `Error` envelope; FastAPI's validation schemas go;
* each operation lists the statuses it can answer (DESIGN §3), all with the `Error` envelope;
* the chat routes declare `ChatCompletionRequest` (the protocol model itself) and answer JSON or SSE;
* the routes that need a key declare it (Bearer or `x-api-key`; the admin routes want the admin key);
* `/metrics` is `text/plain`, `/readyz` documents its 503.

`bench/schemathesis_run.py` checks the result against a running server.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from tokentill.protocol.chat import ChatCompletionRequest
from tokentill.protocol.responses_api import ResponsesRequest

__all__ = ["install_openapi", "openapi_schema"]

_CHAT_PATHS = frozenset({"/v1/chat/completions", "/v1/{model}"})
_RESPONSES_PATH = "/v1/responses"  # parses its own body too
_OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"})

# Statuses beyond the ones every operation of its kind gets (see `_statuses`).
_EXTRA: dict[tuple[str, str], set[int]] = {
    ("post", "/v1/chat/completions"): {402, 403, 404, 409, 429, 502, 504},
    ("post", "/v1/{model}"): {402, 403, 404, 409, 429, 502, 504},
    ("post", _RESPONSES_PATH): {402, 403, 404, 409, 429, 502, 504},
    ("get", "/v1/models/{model_id}"): {403},
    ("post", "/v1/account/redeem"): {404, 409, 429},
    ("post", "/admin/accounts"): {409},
    ("post", "/admin/keys"): {404},
}

_DESCRIPTIONS = {
    400: "Invalid request: not JSON, a schema violation, or a value the server refuses (`param` names it).",
    401: "No key, or an unknown or revoked key.",
    402: "The balance cannot cover the request.",
    403: "The key may not use this model, or the route needs the admin key.",
    404: "Unknown model, account, key or code.",
    408: "The client did not send the request in time (TOKENTILL_READ_TIMEOUT_S).",
    409: "Already exists, already redeemed, or an Idempotency-Key reused with another body.",
    413: "The body is larger than TOKENTILL_MAX_BODY_BYTES.",
    429: "Rate limited (Retry-After says when to retry).",
    500: "A bug: a generic message with the request id; details are in the server log.",
    502: "The engine or upstream failed.",
    503: "Overloaded (queue full, rate limiter or database unreachable); Retry-After says when to retry.",
    504: "The request's deadline passed.",
}

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}

_USAGE = {
    "type": "object",
    "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
    "properties": {
        "prompt_tokens": {"type": "integer"},
        "completion_tokens": {"type": "integer"},
        "total_tokens": {"type": "integer"},
        "prompt_tokens_details": {"type": "object"},
        "completion_tokens_details": {"type": "object"},
    },
}

_CHAT_COMPLETION = {
    "type": "object",
    "required": ["id", "object", "created", "model", "choices", "usage"],
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "chat.completion"},
        "created": {"type": "integer"},
        "model": {"type": "string"},
        "system_fingerprint": {"type": ["string", "null"]},
        "choices": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["index", "message", "finish_reason"],
                "properties": {
                    "index": {"type": "integer"},
                    "message": {
                        "type": "object",
                        "required": ["role", "content"],
                        "properties": {
                            "role": {"const": "assistant"},
                            "content": {"type": ["string", "null"]},
                            "refusal": {"type": ["string", "null"]},
                            "reasoning_content": {"type": "string"},
                        },
                    },
                    "logprobs": {"type": ["object", "null"]},
                    "finish_reason": {"type": "string"},
                },
            },
        },
        "usage": {"$ref": "#/components/schemas/Usage"},
    },
}

_RESPONSE = {
    "type": "object",
    "required": ["id", "object", "created_at", "status", "model", "output"],
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "response"},
        "created_at": {"type": "integer"},
        "status": {"enum": ["completed", "incomplete", "in_progress", "failed"]},
        "model": {"type": "string"},
        "output": {"type": "array", "items": {"type": "object"}},
        "usage": {"type": ["object", "null"]},
    },
}

_MODEL = {
    "type": "object",
    "required": ["id", "object", "created", "owned_by"],
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "model"},
        "created": {"type": "integer"},
        "owned_by": {"type": "string"},
    },
}

_READINESS = {
    "type": "object",
    "required": ["status"],
    "properties": {"status": {"enum": ["ready", "not ready"]}},
}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _statuses(method: str, path: str, operation: dict[str, Any]) -> set[int]:
    """The error statuses `operation` can answer."""
    if path in _OPEN_PATHS:
        return {500}
    codes = {401, 500, 503}  # a key is needed; a bug; the database (or limiter) unreachable
    if path.startswith("/admin/"):
        codes.add(403)
    if "requestBody" in operation or path in _CHAT_PATHS or (method, path) == ("post", _RESPONSES_PATH):
        codes |= {400, 408, 413}
    parameters = operation.get("parameters", [])
    if parameters:
        codes.add(400)
    if any(p.get("in") == "path" for p in parameters):
        codes.add(404)
    return codes | _EXTRA.get((method, path), set())


def _fix_operation(method: str, path: str, operation: dict[str, Any]) -> None:
    responses: dict[str, Any] = operation.setdefault("responses", {})
    responses.pop("422", None)
    for status in sorted(_statuses(method, path, operation)):
        responses.setdefault(
            str(status), {"description": _DESCRIPTIONS[status], "content": _json(_ref("Error"))}
        )
    if path in _CHAT_PATHS:
        operation["requestBody"] = {
            "required": True,
            "content": _json(_ref("ChatCompletionRequest")),
        }
        responses["200"] = {
            "description": "The completion; with `stream: true`, server-sent events of chunks ending "
            "with `data: [DONE]`.",
            "content": {
                **_json(_ref("ChatCompletion")),
                "text/event-stream": {"schema": {"type": "string"}},
            },
        }
    elif (method, path) == ("post", _RESPONSES_PATH):
        operation["requestBody"] = {"required": True, "content": _json(_ref("ResponsesRequest"))}
        responses["200"] = {
            "description": "The response; with `stream: true`, server-sent `response.*` events.",
            "content": {**_json(_ref("Response")), "text/event-stream": {"schema": {"type": "string"}}},
        }
    elif path == "/v1/responses/{response_id}":
        deleted = {
            "type": "object",
            "required": ["id", "object", "deleted"],
            "properties": {
                "id": {"type": "string"},
                "object": {"const": "response.deleted"},
                "deleted": {"const": True},
            },
        }
        responses["200"]["content"] = _json(_ref("Response") if method == "get" else deleted)
    elif path == "/v1/models":
        responses["200"]["content"] = _json(
            {
                "type": "object",
                "required": ["object", "data"],
                "properties": {
                    "object": {"const": "list"},
                    "data": {"type": "array", "items": _ref("Model")},
                },
            }
        )
    elif path == "/v1/models/{model_id}":
        responses["200"]["content"] = _json(_ref("Model"))
    elif path == "/metrics":
        responses["200"]["content"] = {"text/plain": {"schema": {"type": "string"}}}
        responses["401"] = {
            "description": "TOKENTILL_METRICS_KEY is set: no or another key.",
            "content": _json(_ref("Error")),
        }
    elif path == "/readyz":
        responses["200"]["content"] = _json(_READINESS)
        responses["503"] = {
            "description": "Not ready (starting, or the database does not answer).",
            "content": _json(_READINESS),
        }
    if path not in _OPEN_PATHS:
        operation["security"] = [{"bearer": []}, {"xApiKey": []}]
        if path.startswith("/admin/"):
            operation["description"] = (operation.get("description", "") + "\n\nNeeds the admin key.").strip()


def openapi_schema(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document for `app`, fixed as the module docstring says."""
    schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
    components = schema.setdefault("components", {})
    schemas: dict[str, Any] = components.setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    chat = ChatCompletionRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(chat.pop("$defs", {}))
    responses_request = ResponsesRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(responses_request.pop("$defs", {}))
    schemas.update(
        ChatCompletionRequest=chat,
        ChatCompletion=_CHAT_COMPLETION,
        ResponsesRequest=responses_request,
        Response=_RESPONSE,
        Usage=_USAGE,
        Model=_MODEL,
        Error=_ERROR,
    )
    components["securitySchemes"] = {
        "bearer": {
            "type": "http",
            "scheme": "bearer",
            "description": "An API key (the admin key on /admin).",
        },
        "xApiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
    }
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            _fix_operation(method, path, operation)
    return schema


def install_openapi(app: FastAPI) -> None:
    """Serve `openapi_schema(app)` (built once, on first request) as `/openapi.json`."""

    def cached() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = openapi_schema(app)
        return app.openapi_schema

    app.openapi = cached  # type: ignore[method-assign]  # FastAPI's documented way to replace the schema
