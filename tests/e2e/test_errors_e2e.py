"""Every status of DESIGN §3 that a client can provoke, with its OpenAI envelope, on a real server."""

from __future__ import annotations

import http.client
import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest
import requests

from tests.e2e.conftest import DEFAULT_MODEL, TokentillServer

pytestmark = [pytest.mark.e2e, pytest.mark.llama]

HELLO = {"messages": [{"role": "user", "content": "Hello"}], "max_completion_tokens": 4}
HELLO_RAW = json.dumps(HELLO).encode()


def post(
    server: TokentillServer, key: str | None, body: Any, path: str = "/v1/o1-preview"
) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return requests.post(server.url + path, data=data, headers=headers, timeout=120)


def envelope(response: requests.Response, status: int, code: str, param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["x-request-id"].startswith("req_")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code, error
    assert error["message"]
    if param is not None:
        assert error["param"] == param, error
    return dict(error)


@pytest.fixture(scope="module")
def key(sqlite_server: TokentillServer) -> str:
    return sqlite_server.new_key("errors", credits="1")


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [
        (b"{not json", "invalid_json", None),
        ({"messages": [{"role": "user", "content": "x"}], "foo": 1}, "unknown_parameter", "foo"),
        ({}, "missing_required_parameter", "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "invalid_value", "messages[0].role"),
        ({"messages": [{"role": "user", "content": 7}]}, "invalid_type", "messages[0].content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}, {"type": "audio"}]}]},
            "invalid_value",
            "messages[0].content[1].type",
        ),
        ({**HELLO, "n": 2}, "unsupported_value", "n"),
        ({**HELLO, "temperature": 5}, "invalid_value", "temperature"),
        ({**HELLO, "max_tokens": 3}, "invalid_value", "max_tokens"),
        ({**HELLO, "reasoning_effort": "extreme"}, "unsupported_value", "reasoning_effort"),
        ({**HELLO, "stream_options": {"include_usage": True}}, "invalid_value", "stream_options"),
        ({**HELLO, "tools": [{"type": "function"}]}, "missing_required_parameter", "tools[0].function"),
        ({**HELLO, "tool_choice": "required"}, "invalid_value", "tool_choice"),  # no tools
        ({**HELLO, "response_format": {"type": "xml"}}, "invalid_value", "response_format.type"),
        ({**HELLO, "logit_bias": {"seven": 1}}, "invalid_value", "logit_bias"),
        ({**HELLO, "logit_bias": {"7": 101}}, "invalid_value", "logit_bias.7"),
        ({**HELLO, "logit_bias": {"99999999": -100}}, "invalid_value", "logit_bias"),  # not in the vocabulary
        ({**HELLO, "presence_penalty": 2.5}, "invalid_value", "presence_penalty"),
        ({**HELLO, "frequency_penalty": "high"}, "invalid_type", "frequency_penalty"),
        ({**HELLO, "model": "other"}, "invalid_value", "model"),
        (
            {"messages": [{"role": "tool", "content": "x"}]},
            "missing_required_parameter",
            "messages[0].tool_call_id",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "https://a.b/c.png"}}],
                    }
                ]
            },
            "image_input_unsupported",
            "messages[0].content[0]",
        ),
        ({"messages": [{"role": "user", "content": "word " * 9000}]}, "context_length_exceeded", "messages"),
        ({**HELLO, "max_completion_tokens": 100_000}, "invalid_value", "max_completion_tokens"),
        (
            {"messages": [{"role": "user", "content": "word " * 7000}], "max_completion_tokens": 2000},
            "context_length_exceeded",
            "messages",
        ),
        # Hostile values that once reached the engine or the database as 500s.
        (HELLO_RAW[:-1] + b', "seed": ' + b"7" * 5000 + b"}", "invalid_json", None),  # past int()'s digit cap
        ({**HELLO, "seed": 2**64}, "invalid_value", "seed"),
        ({**HELLO, "max_completion_tokens": 2**40}, "invalid_value", "max_completion_tokens"),
        ({**HELLO, "logit_bias": {"1" * 5000: 1}}, "invalid_value", "logit_bias"),
        ({"messages": [{"role": "user", "content": "hi \ud800"}]}, "invalid_value", "messages[0].content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]},
            "invalid_value",
            "messages[0].content[0].text",
        ),
        ({**HELLO, "stop": ["ok", "\ud800"]}, "invalid_value", "stop[1]"),
        ({**HELLO, "user": "\ud800"}, "invalid_value", "user"),
        ({**HELLO, "metadata": {"k": "\udc00"}}, "invalid_value", "metadata.k"),
        ({**HELLO, "metadata": {"\ud800": "v"}}, "invalid_value", "metadata"),
        ({**HELLO, "\ud800": 1}, "invalid_value", None),
        # Neutral values of unimplemented parameters are type-strict: 0 is not false, 1 is not true.
        ({**HELLO, "logprobs": 0}, "unsupported_parameter", "logprobs"),
        ({**HELLO, "store": 0}, "unsupported_parameter", "store"),
        ({**HELLO, "parallel_tool_calls": 1}, "invalid_type", "parallel_tool_calls"),
        # OpenAI's limits on `user` and `metadata`.
        ({**HELLO, "user": "u" * 257}, "invalid_value", "user"),
        ({**HELLO, "user": 7}, "invalid_type", "user"),
        ({**HELLO, "metadata": {f"k{i}": "v" for i in range(17)}}, "invalid_value", "metadata"),
        ({**HELLO, "metadata": {"k" * 65: "v"}}, "invalid_value", "metadata"),
        ({**HELLO, "metadata": {"k": "v" * 513}}, "invalid_value", "metadata.k"),
        ({**HELLO, "metadata": {"k": 1}}, "invalid_type", "metadata.k"),
    ],
)
def test_400s(sqlite_server: TokentillServer, key: str, body: Any, code: str, param: str | None) -> None:
    before = sqlite_server.balance("errors")
    response = post(sqlite_server, key, body)
    envelope(response, 400, code, param)
    assert response.headers["x-remaining-credits"] == before  # refused requests cost nothing


def test_400_sdk_raises_bad_request(sqlite_server: TokentillServer, key: str) -> None:
    client = openai.OpenAI(base_url=sqlite_server.url + "/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=DEFAULT_MODEL, messages=[{"role": "user", "content": "x"}], n=3)
    assert info.value.code == "unsupported_value"


def test_401s(sqlite_server: TokentillServer, key: str) -> None:
    envelope(post(sqlite_server, None, HELLO), 401, "missing_api_key")
    bad = post(sqlite_server, "tt-abcdefgh-" + "x" * 43, HELLO)
    envelope(bad, 401, "invalid_api_key")
    assert "x" * 43 not in bad.text  # the secret is never echoed
    envelope(post(sqlite_server, "not-a-key", HELLO), 401, "invalid_api_key")
    r = requests.post(
        sqlite_server.url + "/v1/o1-preview", json=HELLO, headers={"x-api-key": key}, timeout=60
    )
    assert r.status_code == 200, r.text
    client = openai.OpenAI(base_url=sqlite_server.url + "/v1", api_key="tt-zzzzzzzz-nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_revoked_key_401(sqlite_server: TokentillServer) -> None:
    key = sqlite_server.new_key("errors")
    assert post(sqlite_server, key, HELLO).status_code == 200
    sqlite_server.cli("keys", "revoke", key.split("-")[1])
    envelope(post(sqlite_server, key, HELLO), 401, "invalid_api_key")


def test_402_explicit_budget_and_clamp(sqlite_server: TokentillServer) -> None:
    # 1500 µcr: a 76-token prompt (reasoning instruction included) and a few completion tokens
    key = sqlite_server.new_key("poor", credits="0.0015")
    r = post(sqlite_server, key, {**HELLO, "max_completion_tokens": 1000})
    error = envelope(r, 402, "insufficient_credits")
    assert error["type"] == "insufficient_credits"
    assert "0.0015" in error["message"]
    assert r.headers["x-remaining-credits"] == "0.0015"
    client = openai.OpenAI(base_url=sqlite_server.url + "/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(
            model=DEFAULT_MODEL, messages=[{"role": "user", "content": "x"}], max_completion_tokens=1000
        )
    assert info.value.status_code == 402
    # Without an explicit budget the completion is clamped to what the balance affords.
    ok = post(sqlite_server, key, {"messages": [{"role": "user", "content": "Tell me a long story."}]})
    assert ok.status_code == 200, ok.text
    assert ok.json()["choices"][0]["finish_reason"] == "length"
    assert Decimal(ok.headers["x-remaining-credits"]) >= 0


def test_403_model_not_permitted(tmp_path: Path, sqlite_server: TokentillServer) -> None:
    key = sqlite_server.new_key("errors", models="some-other-model")
    error = envelope(post(sqlite_server, key, HELLO), 403, "model_not_permitted")
    assert error["type"] == "permission_error"


def test_404s(sqlite_server: TokentillServer, key: str) -> None:
    envelope(post(sqlite_server, key, HELLO, path="/v1/no-such-model"), 404, "model_not_found", "model")
    r = post(sqlite_server, key, HELLO, path="/v1/" + "m" * 5000)  # no id is this long: not found either
    error = envelope(r, 404, "model_not_found", "model")
    assert len(error["message"]) < 200 and r.headers["x-remaining-credits"]
    r = requests.get(sqlite_server.url + "/v2/whatever", timeout=10)
    envelope(r, 404, "unknown_url")
    r = requests.get(sqlite_server.url + "/v1/models/nope", headers={"x-api-key": key}, timeout=10)
    envelope(r, 404, "model_not_found")
    client = openai.OpenAI(base_url=sqlite_server.url + "/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-17", messages=[{"role": "user", "content": "x"}])


def test_405(sqlite_server: TokentillServer) -> None:
    envelope(requests.get(sqlite_server.url + "/v1/o1-preview", timeout=10), 405, "method_not_allowed")
    envelope(
        requests.delete(sqlite_server.url + "/v1/chat/completions", timeout=10), 405, "method_not_allowed"
    )


def test_413_declared_and_chunked(sqlite_server: TokentillServer, key: str) -> None:
    big = b'{"messages": "' + b"x" * (33 * 1024 * 1024) + b'"}'
    envelope(post(sqlite_server, key, big), 413, "request_too_large")

    def chunks() -> Any:
        for _ in range(40):
            yield b"x" * (1024 * 1024)

    r = requests.post(
        sqlite_server.url + "/v1/o1-preview",
        data=chunks(),
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    )
    envelope(r, 413, "request_too_large")
    assert requests.get(sqlite_server.url + "/healthz", timeout=5).status_code == 200


def test_429_rpm(sqlite_server: TokentillServer) -> None:
    key = sqlite_server.new_key("limited", rpm="2")
    assert post(sqlite_server, key, HELLO).status_code == 200
    ok = post(sqlite_server, key, HELLO)
    assert ok.headers["x-ratelimit-limit-requests"] == "2"
    r = post(sqlite_server, key, HELLO)
    error = envelope(r, 429, "rate_limit_exceeded")
    assert error["type"] == "requests"
    assert int(r.headers["retry-after"]) >= 1
    client = openai.OpenAI(base_url=sqlite_server.url + "/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model=DEFAULT_MODEL, messages=[{"role": "user", "content": "x"}])


def test_hostile_inputs_leave_server_healthy(sqlite_server: TokentillServer, key: str) -> None:
    bodies: list[bytes] = [
        b"",
        b"null",
        b"[]",
        b'"text"',
        b"\xff\xfe\x00",
        b"{" * 10000,
        b'{"messages": null}',
    ]
    for raw in bodies:
        r = post(sqlite_server, key, raw)
        assert r.status_code == 400, (raw[:20], r.text)
        assert r.json()["error"]["code"] in {"invalid_json", "invalid_type", "missing_required_parameter"}
    # A client that disconnects halfway through sending its body.
    conn = http.client.HTTPConnection("127.0.0.1", sqlite_server.port, timeout=5)
    conn.putrequest("POST", "/v1/o1-preview")
    conn.putheader("Authorization", f"Bearer {key}")
    conn.putheader("Content-Length", "1000")
    conn.endheaders()
    conn.send(b'{"messages": [')
    conn.close()
    assert requests.get(sqlite_server.url + "/healthz", timeout=5).status_code == 200
    assert post(sqlite_server, key, HELLO).status_code == 200


def test_auth_money_and_model_errors_on_both_databases(server: TokentillServer) -> None:
    """401, 402, 403 and 404 come from the key store and the ledger: check them on SQLite and PostgreSQL."""
    envelope(post(server, None, HELLO), 401, "missing_api_key")
    envelope(post(server, "tt-abcdefgh-" + "x" * 43, HELLO), 401, "invalid_api_key")
    poor = server.new_key("errors-db-poor", credits="0.0015")
    r = post(server, poor, {**HELLO, "max_completion_tokens": 1000})
    error = envelope(r, 402, "insufficient_credits")
    assert error["type"] == "insufficient_credits" and "0.0015" in error["message"]
    assert r.headers["x-remaining-credits"] == "0.0015" == server.balance("errors-db-poor")
    narrow = server.new_key("errors-db", credits="1", models="some-other-model")
    r = post(server, narrow, HELLO)
    assert envelope(r, 403, "model_not_permitted")["type"] == "permission_error"
    assert r.headers["x-remaining-credits"] == "1"
    key = server.new_key("errors-db")
    r = post(server, key, HELLO, path="/v1/no-such-model")
    envelope(r, 404, "model_not_found", "model")
    assert r.headers["x-remaining-credits"] == "1"
    envelope(
        requests.get(server.url + "/v1/models/nope", headers={"x-api-key": key}, timeout=10),
        404,
        "model_not_found",
    )
    assert server.balance("errors-db") == "1"  # none of it cost anything
