"""`jsonbytes.dumps`: orjson's bytes, and the standard library's for what orjson refuses."""

from __future__ import annotations

import json

import pytest

from tokentill.jsonbytes import dumps


@pytest.mark.parametrize(
    "value",
    [
        {"id": "chatcmpl-1", "choices": [{"delta": {"content": "naïve 🙂 日本"}}], "usage": None},
        [1, -2, 2**63 - 1, 1.5, True, None, ""],
        {"seed": 2**64},  # past 64 bits: orjson refuses it
        {1: "a", "b": 2},  # a key that is not a string
        {"content": "half a pair \ud83d"},  # a lone surrogate (an upstream may send one escaped)
    ],
)
def test_dumps_is_compact_utf8_json_that_reads_back(value: object) -> None:
    out = dumps(value)
    assert b"\n" not in out and b", " not in out and b": " not in out
    text = out.decode("utf-8")  # always valid UTF-8, even for the lone surrogate
    assert json.loads(text) == json.loads(json.dumps(value))


def test_non_ascii_is_written_as_itself_unless_the_fallback_escapes_it() -> None:
    assert dumps({"t": "é"}) == '{"t":"é"}'.encode()
    assert dumps({"t": "é", "n": 2**70}) == b'{"t":"\\u00e9","n":1180591620717411303424}'
