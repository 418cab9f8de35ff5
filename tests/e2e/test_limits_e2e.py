"""Rate limits on a real server, with the in-process limiter and with Redis: the x-ratelimit-* headers on
every response to a limited key, 429 with Retry-After as the SDK sees it, a request too large for the
tokens-per-minute limit, `tokentill keys update` taking effect on the next request and the listings showing
the limits, idempotency through the SDK (ConflictError, a streamed replay, a client that leaves), and the
503 of a server whose Redis is unreachable."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest
import requests

from tests.e2e.conftest import DEFAULT_MODEL, TokentillServer, llama_available

pytestmark = [pytest.mark.e2e, pytest.mark.llama]

SIX = [
    f"x-ratelimit-{kind}-{family}"
    for kind in ("limit", "remaining", "reset")
    for family in ("requests", "tokens")
]
SHORT: dict[str, Any] = {
    "messages": [{"role": "user", "content": "Say hi."}],
    "max_completion_tokens": 8,
    "reasoning_effort": "low",
}


@pytest.fixture(scope="module", params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def limited_server(request: pytest.FixtureRequest, module_dir: Path) -> Iterator[TokentillServer]:
    """One server per limiter: in-process (the default: the session's SQLite server), and Redis
    (TOKENTILL_REDIS_URL)."""
    llama_available()
    if request.param == "memory":
        yield request.getfixturevalue("sqlite_server")
        return
    env = {"TOKENTILL_REDIS_URL": request.getfixturevalue("redis_url")}
    server = TokentillServer(module_dir / f"limits-{request.param}", None, **env).start()
    yield server
    server.stop()


def _post(server: TokentillServer, key: str, body: dict[str, Any] | None = None) -> requests.Response:
    return requests.post(
        f"{server.url}/v1/{DEFAULT_MODEL}",
        json=SHORT if body is None else body,
        headers={"Authorization": f"Bearer {key}"},
        timeout=120,
    )


def _key_id(key: str) -> str:
    return key.split("-")[1]


def test_headers_on_success_and_on_429(limited_server: TokentillServer) -> None:
    key = limited_server.new_key("lim-headers", rpm="2", tpm="5000")
    first = _post(limited_server, key)
    assert first.status_code == 200, first.text
    assert all(h in first.headers for h in SIX), dict(first.headers)
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert first.headers["x-ratelimit-limit-tokens"] == "5000"
    assert first.headers["x-ratelimit-reset-requests"].endswith("s")

    bad = _post(limited_server, key, {**SHORT, "n": 2})  # a 4xx after authentication, never admitted
    assert bad.status_code == 400 and all(h in bad.headers for h in SIX)
    assert bad.headers["x-ratelimit-remaining-requests"] == "1"

    assert _post(limited_server, key).status_code == 200
    refused = _post(limited_server, key)
    assert refused.status_code == 429
    assert all(h in refused.headers for h in SIX)
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    retry_after = refused.headers["retry-after"]
    assert retry_after.isdigit() and 1 <= int(retry_after) <= 60
    error = refused.json()["error"]
    assert error["type"] == "requests" and error["code"] == "rate_limit_exceeded"
    assert "requests per minute" in error["message"] and "Limit 2" in error["message"]

    client = openai.OpenAI(base_url=limited_server.url + "/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model=DEFAULT_MODEL, **SHORT)
    assert info.value.status_code == 429
    assert int(info.value.response.headers["retry-after"]) >= 1


def test_request_too_large_for_tpm(limited_server: TokentillServer) -> None:
    key = limited_server.new_key("lim-large", tpm="40")
    client = openai.OpenAI(base_url=limited_server.url + "/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model=DEFAULT_MODEL, **{**SHORT, "max_completion_tokens": 100})
    body = info.value.response.json()["error"]
    assert body["type"] == "tokens" and body["code"] == "rate_limit_exceeded"
    assert "request too large" in body["message"].lower() and "40 tokens per minute" in body["message"]
    assert int(info.value.response.headers["retry-after"]) >= 1
    assert info.value.response.headers["x-ratelimit-limit-tokens"] == "40"


def test_keys_update_applies_to_the_next_request(limited_server: TokentillServer) -> None:
    key = limited_server.new_key("lim-update", rpm="1")
    assert _post(limited_server, key).status_code == 200
    assert _post(limited_server, key).status_code == 429
    updated = limited_server.cli_json("keys", "update", _key_id(key), "--rpm", "3")
    assert updated == {"updated": _key_id(key), "rpm": 3}
    second = _post(limited_server, key)
    assert second.status_code == 200, second.text
    assert second.headers["x-ratelimit-limit-requests"] == "3"
    assert second.headers["x-ratelimit-remaining-requests"] == "1"
    limited_server.cli_json("keys", "update", _key_id(key), "--no-rpm", "--max-concurrent", "2")
    unlimited = _post(limited_server, key)
    assert unlimited.status_code == 200 and "x-ratelimit-limit-requests" not in unlimited.headers
    listed = {k["id"]: k for k in limited_server.cli_json("keys", "list")["keys"]}
    assert listed[_key_id(key)]["rpm"] is None and listed[_key_id(key)]["max_concurrent"] == 2
    both = limited_server.cli("keys", "update", _key_id(key), "--rpm", "2", "--no-rpm", check=False)
    assert both.returncode != 0 and "not both" in both.stderr
    missing = limited_server.cli("keys", "update", "zzzzzzzz", "--rpm", "2", check=False)
    assert missing.returncode != 0 and "no active key" in missing.stderr


def test_keys_update_tpm_and_listings_show_the_limits(limited_server: TokentillServer) -> None:
    limited_server.new_key("lim-list")  # creates the account
    created = limited_server.cli_json(
        "keys", "create", "--account", "lim-list", "--rpm", "7", "--tpm", "5000", "--max-concurrent", "3"
    )
    assert (created["rpm"], created["tpm"], created["max_concurrent"]) == (7, 5000, 3)
    key, key_id = created["key"], created["id"]
    assert limited_server.cli_json("keys", "update", key_id, "--tpm", "900") == {
        "updated": key_id,
        "tpm": 900,
    }
    ok = _post(limited_server, key)
    assert ok.status_code == 200 and ok.headers["x-ratelimit-limit-tokens"] == "900"
    too_large = _post(limited_server, key, {**SHORT, "max_completion_tokens": 1000})
    assert too_large.status_code == 429 and too_large.headers["x-should-retry"] == "false"
    text = limited_server.cli("keys", "list").stdout
    line = next(row for row in text.splitlines() if row.startswith(key_id))
    assert "rpm=7 tpm=900 concurrent=3" in line, line
    limited_server.cli_json("keys", "update", key_id, "--no-tpm")
    line = next(r for r in limited_server.cli("keys", "list").stdout.splitlines() if r.startswith(key_id))
    assert "rpm=7 tpm=* concurrent=3" in line, line


def test_sdk_conflict_error_and_streamed_replay(limited_server: TokentillServer) -> None:
    key = limited_server.new_key("lim-idem", rpm="50")
    client = openai.OpenAI(base_url=limited_server.url + "/v1", api_key=key, max_retries=0)
    body = {**SHORT, "max_completion_tokens": 40, "reasoning_effort": "low"}
    first = client.chat.completions.create(
        model=DEFAULT_MODEL, **body, extra_headers={"Idempotency-Key": "sdk-1"}
    )
    with pytest.raises(openai.ConflictError) as info:  # same key, another body
        client.chat.completions.create(
            model=DEFAULT_MODEL,
            **{**body, "max_completion_tokens": 41},
            extra_headers={"Idempotency-Key": "sdk-1"},
        )
    assert info.value.response.json()["error"]["code"] == "idempotency_key_reused"
    assert info.value.response.headers["x-should-retry"] == "false"
    assert first.id.startswith("chatcmpl-")

    def streamed() -> tuple[str, str, Any]:
        stream = client.chat.completions.create(
            model=DEFAULT_MODEL,
            **body,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers={"Idempotency-Key": "sdk-stream"},
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return chunks[0].id, text, chunks[-1].usage

    balance = limited_server.balance("lim-idem")
    original = streamed()
    charged = limited_server.balance("lim-idem")
    assert charged != balance
    replayed = streamed()
    assert replayed == original and original[2] is not None
    assert limited_server.balance("lim-idem") == charged  # the replay cost nothing
    rows = limited_server.cli_json("usage", "--account", "lim-idem")["usage"]
    assert len(rows) == 2  # sdk-1 and sdk-stream, once each


def test_idempotent_request_survives_the_client_leaving(limited_server: TokentillServer) -> None:
    """The SDK's retry after a read timeout replays the first attempt's answer: one charge, not two."""
    key = limited_server.new_key("lim-leave")
    long = {
        "messages": [{"role": "user", "content": "Count from one to two hundred in words."}],
        "max_completion_tokens": 300,
        "reasoning_effort": "high",
    }
    headers = {"Authorization": f"Bearer {key}", "Idempotency-Key": "leave-1"}
    with pytest.raises(requests.Timeout):  # the client gives up while the answer is being made
        requests.post(  # the very request the SDK sends below (route and body make the fingerprint)
            f"{limited_server.url}/v1/chat/completions",
            json={**long, "model": DEFAULT_MODEL},
            headers=headers,
            timeout=(5, 0.3),
        )
    client = openai.OpenAI(base_url=limited_server.url + "/v1", api_key=key, max_retries=60)
    raw = client.chat.completions.with_raw_response.create(
        model=DEFAULT_MODEL, **long, extra_headers={"Idempotency-Key": "leave-1"}
    )
    assert raw.headers["idempotent-replayed"] == "true"  # waited (409 + Retry-After) for the stored answer
    rows = limited_server.cli_json("usage", "--account", "lim-leave")["usage"]
    assert len(rows) == 1 and rows[0]["status"] == 200, rows
    assert Decimal(limited_server.balance("lim-leave")) == Decimal(10) - Decimal(rows[0]["cost"])


@pytest.mark.redis
def test_unreachable_redis_is_503_with_no_hold(module_dir: Path) -> None:
    llama_available()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"redis://127.0.0.1:{sock.getsockname()[1]}/0"
    server = TokentillServer(module_dir / "limits-no-redis", None, TOKENTILL_REDIS_URL=closed).start()
    try:
        key = server.new_key("no-redis", rpm="5")
        started = time.monotonic()
        refused = _post(server, key)
        assert time.monotonic() - started < 3
        assert refused.status_code == 503, refused.text
        error = refused.json()["error"]
        assert error["code"] == "overloaded" and error["type"] == "server_error"
        assert "Rate limiter unavailable" in error["message"] and "failing closed" in error["message"]
        assert refused.headers["retry-after"] == "1"
        assert server.balance("no-redis") == "10"  # no hold was taken, nothing charged
        assert server.cli_json("usage", "--account", "no-redis")["usage"] == []
        free = server.new_key("no-redis")  # a key without limits never needs Redis
        assert _post(server, free).status_code == 200
    finally:
        server.stop()
