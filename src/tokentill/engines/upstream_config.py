"""An `upstream` catalogue entry, checked: its replica URLs, extra headers and API key.

Everything here runs at start-up (`tokentill serve` calls `check_spec` before the server starts, the engine
calls `urls`, `headers` and `resolve_api_key` when it is built and started), so a bad entry is one clear
`CatalogError` naming the model and the field, never a failure of every request. Refused: a `base_url` that
is not http(s), carries `user:password@`, has a bad port, a query or a fragment; `headers` that HTTP cannot
carry or that tokentill sets itself; an `api_key` that is unset (`env:NAME`) or holds line breaks.
"""

from __future__ import annotations

import os
import re

import httpx2
from pydantic import SecretStr

from tokentill.catalog import CatalogError, ModelSpec

__all__ = ["check_spec", "headers", "resolve_api_key", "secrets", "urls"]

# RFC 9110 field names; values: visible ASCII, spaces and tabs (no CR/LF: no header injection, and
# httpx2 refuses anything else at send time, which would fail every request instead of the start-up).
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HEADER_VALUE = re.compile(r"[\x20-\x7e\t]*")
_RESERVED_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection", "content-type"})


def resolve_api_key(spec: ModelSpec) -> SecretStr | None:
    """The upstream key: `api_key` itself, or for `env:NAME` the variable NAME (unset → CatalogError).

    Surrounding whitespace is dropped (a key file's trailing newline); a key that still holds characters
    no HTTP header may carry is a CatalogError. Read here rather than through `Settings` because the
    variable's name is catalogue data, one per model, unknown when Settings is declared; it is read once,
    at start-up.
    """
    if spec.api_key is None:
        return None
    value: str | None = spec.api_key
    where = "api_key"
    if spec.api_key.startswith("env:"):
        name = spec.api_key.removeprefix("env:")
        value = os.environ.get(name)
        where = f"the environment variable {name} (named by api_key)"
        if not value or not value.strip():
            raise CatalogError(
                f"model {spec.id!r}: api_key names the environment variable {name}; it is unset"
            )
    value = (value or "").strip()
    if not value:
        return None
    if not _HEADER_VALUE.fullmatch(value):
        raise CatalogError(f"model {spec.id!r}: {where} holds characters an HTTP header cannot carry")
    return SecretStr(value)


def check_spec(spec: ModelSpec) -> None:
    """Every start-up check of an upstream entry (base_url, headers, api_key), for `tokentill serve` to run
    before the server starts, so a bad entry is one clear error rather than a failed application start-up."""
    urls(spec)
    headers(spec)
    resolve_api_key(spec)


def headers(spec: ModelSpec) -> dict[str, str]:
    """The entry's extra `headers`, checked so that a bad one stops the start-up instead of every request."""
    for name, value in spec.headers.items():
        if not _HEADER_NAME.fullmatch(name):
            raise CatalogError(f"model {spec.id!r}: {name!r} is not a valid HTTP header name")
        if name.lower() in _RESERVED_HEADERS:
            raise CatalogError(
                f"model {spec.id!r}: header {name!r} is set by tokentill and cannot be overridden"
            )
        if not _HEADER_VALUE.fullmatch(value):
            # The value is not shown: headers may carry secrets (Azure's api-key).
            raise CatalogError(
                f"model {spec.id!r}: the value of header {name!r} holds characters an HTTP header cannot "
                "carry (line breaks, control or non-ASCII characters)"
            )
    return dict(spec.headers)


def secrets(spec: ModelSpec) -> list[str]:
    """What of the entry must never be relayed or logged (`tokentill.redact`): the API key and the extra
    header values (Azure's `api-key`, a gateway's token)."""
    key = resolve_api_key(spec)
    return [*([key.get_secret_value()] if key else []), *headers(spec).values()]


def _shown(url: str) -> str:
    """`url` fit for a message: any `user:password@` masked."""
    return re.sub(r"//[^/@]*@", "//***@", url)


def urls(spec: ModelSpec) -> list[str]:
    """The entry's replica base URLs (one or a list), each checked."""
    urls = [spec.base_url] if isinstance(spec.base_url, str) else list(spec.base_url or [])
    if not urls:
        raise CatalogError(f"model {spec.id!r}: engine 'upstream' needs base_url")
    for url in urls:
        if not url.startswith(("http://", "https://")):
            raise CatalogError(f"model {spec.id!r}: base_url {_shown(url)!r} is not an http(s) URL")
        try:
            parsed = httpx2.URL(url)
        except httpx2.InvalidURL:
            raise CatalogError(f"model {spec.id!r}: base_url {_shown(url)!r} is not a valid URL") from None
        if parsed.userinfo:
            # Refused, not redacted: the URL is logged with every replica state change.
            raise CatalogError(
                f"model {spec.id!r}: a base_url must not carry user:password@; put the credential in "
                "api_key or headers"
            )
        if parsed.port is not None and not 0 < parsed.port < 65536:
            raise CatalogError(f"model {spec.id!r}: base_url {_shown(url)!r} has no valid port")
        if not parsed.host or parsed.query or parsed.fragment:
            raise CatalogError(
                f"model {spec.id!r}: base_url {_shown(url)!r} needs a host and no query or fragment"
            )
    return urls
