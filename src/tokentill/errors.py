"""Every error a client can see, as one tree; `api/` renders them once as the OpenAI envelope.

    APIError                      (status, type, code fixed by each class)
    ├── InvalidRequest            400 invalid_request_error   invalid_value, invalid_type, ...
    ├── AuthenticationFailed      401 invalid_request_error   missing_api_key / invalid_api_key
    │   └── StaleKey              401 invalid_request_error   invalid_api_key  (key changed under a hold)
    ├── InsufficientCredits       402 insufficient_credits    insufficient_credits
    ├── PermissionDenied          403 permission_error        model_not_permitted / admin_required
    ├── NotFound                  404 invalid_request_error   model_not_found / unknown_url /
    │                                                         response_not_found
    │   └── CodeNotFound          404 invalid_request_error   code_not_found
    ├── MethodNotAllowed          405 invalid_request_error   method_not_allowed
    ├── RequestTimeout            408 invalid_request_error   request_timeout      (+ Connection: close)
    ├── Conflict                  409 invalid_request_error   idempotency_key_reused
    │   └── CodeAlreadyRedeemed   409 invalid_request_error   code_already_redeemed
    ├── RequestTooLarge           413 invalid_request_error   request_too_large
    ├── RateLimited               429 requests | tokens       rate_limit_exceeded  (+ Retry-After)
    ├── InternalError             500 server_error            internal_error (generic message only)
    ├── UpstreamError             502 server_error            upstream_error
    ├── Overloaded                503 server_error            overloaded           (+ Retry-After)
    ├── ServiceUnavailable        503 server_error            service_unavailable  (+ Retry-After)
    └── DeadlineExceeded          504 server_error            timeout

Services raise these; they never return error objects. A builtin exception that escapes is a bug and
becomes a 500 with a generic message (details go to the log with the request id).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

__all__ = [
    "APIError",
    "AuthenticationFailed",
    "CodeAlreadyRedeemed",
    "CodeNotFound",
    "Conflict",
    "DeadlineExceeded",
    "InsufficientCredits",
    "InternalError",
    "InvalidRequest",
    "MethodNotAllowed",
    "NotFound",
    "Overloaded",
    "PermissionDenied",
    "RateLimited",
    "RequestTimeout",
    "RequestTooLarge",
    "ServiceUnavailable",
    "StaleKey",
    "UpstreamError",
]


class APIError(Exception):
    """An error with a fixed HTTP status and OpenAI `type`; `code` and `param` vary per raise."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    default_code: ClassVar[str] = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.param = param
        self.headers: dict[str, str] = dict(headers or {})

    @property
    def error_type(self) -> str:
        return self.type

    def body(self) -> dict[str, Any]:
        """The OpenAI error envelope."""
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


def _retry_after(error: APIError, seconds: float) -> None:
    error.headers.setdefault("Retry-After", str(max(1, math.ceil(seconds))))


class InvalidRequest(APIError):
    status = 400
    type = "invalid_request_error"
    default_code = "invalid_value"


class AuthenticationFailed(APIError):
    status = 401
    type = "invalid_request_error"
    default_code = "invalid_api_key"


class StaleKey(AuthenticationFailed):
    """The key was revoked, or its limits changed, after the request was authenticated: the credit hold
    refused it. The chat routes then read the key afresh and admit the request once more (a key cached
    by this replica may be up to `key_cache_s` old); a revoked key stays this 401."""


class InsufficientCredits(APIError):
    status = 402
    type = "insufficient_credits"
    default_code = "insufficient_credits"


class PermissionDenied(APIError):
    status = 403
    type = "permission_error"
    default_code = "model_not_permitted"


class NotFound(APIError):
    status = 404
    type = "invalid_request_error"
    default_code = "model_not_found"


class CodeNotFound(NotFound):
    """A redemption code that does not exist, does not match, or has expired (indistinguishable)."""

    default_code = "code_not_found"


class MethodNotAllowed(APIError):
    status = 405
    type = "invalid_request_error"
    default_code = "method_not_allowed"


class RequestTimeout(APIError):
    """The client took longer than TOKENTILL_READ_TIMEOUT_S to send its request; the connection closes
    (the rest of a trickled body is not worth waiting for)."""

    status = 408
    type = "invalid_request_error"
    default_code = "request_timeout"

    def __init__(self, message: str, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.headers.setdefault("Connection", "close")


class Conflict(APIError):
    status = 409
    type = "invalid_request_error"
    default_code = "idempotency_key_reused"


class CodeAlreadyRedeemed(Conflict):
    """A valid redemption code that was redeemed before (by anyone)."""

    default_code = "code_already_redeemed"


class RequestTooLarge(APIError):
    status = 413
    type = "invalid_request_error"
    default_code = "request_too_large"


class RateLimited(APIError):
    """429; `limit_type` is `requests` or `tokens`, which becomes the envelope's `type`."""

    status = 429
    type = "requests"
    default_code = "rate_limit_exceeded"

    def __init__(self, message: str, *, limit_type: str, retry_after_s: float, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.limit_type = limit_type
        _retry_after(self, retry_after_s)

    @property
    def error_type(self) -> str:
        return self.limit_type


class InternalError(APIError):
    status = 500
    type = "server_error"
    default_code = "internal_error"


class UpstreamError(APIError):
    status = 502
    type = "server_error"
    default_code = "upstream_error"


class Overloaded(APIError):
    """503; always carries Retry-After."""

    status = 503
    type = "server_error"
    default_code = "overloaded"

    def __init__(self, message: str, *, retry_after_s: float = 1.0, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        _retry_after(self, retry_after_s)


class ServiceUnavailable(APIError):
    """503: a backing store (the database) cannot be reached; always carries Retry-After. Raised by
    `storage.db` at the boundary for connection failures, so every route answers it the same way."""

    status = 503
    type = "server_error"
    default_code = "service_unavailable"

    def __init__(self, message: str, *, retry_after_s: float = 1.0, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        _retry_after(self, retry_after_s)


class DeadlineExceeded(APIError):
    status = 504
    type = "server_error"
    default_code = "timeout"
