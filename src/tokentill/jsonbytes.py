"""Compact JSON bytes for what the hot path writes (responses, stream chunks, the upstream's request,
spool lines): `dumps` (`api.completions.JSONBytesResponse` renders a response body with it).

orjson writes JSON several times faster than the standard library. What orjson refuses (an integer past
64 bits, a key that is not a string, a string holding a lone UTF-16 surrogate) is written by `json`
instead, with non-ASCII characters escaped, so anything `json` could write is still written and the
bytes are always valid UTF-8. orjson writes other non-ASCII characters as themselves (as Starlette's
`JSONResponse` does), and NaN or infinity as `null` (nothing we write holds one).
"""

from __future__ import annotations

import json
from typing import Any

import orjson

__all__ = ["dumps"]


def dumps(obj: Any) -> bytes:
    try:
        return orjson.dumps(obj)
    except TypeError:
        return json.dumps(obj, separators=(",", ":")).encode()
