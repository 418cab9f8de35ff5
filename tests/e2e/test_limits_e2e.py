"""Rate limits on a real server, with the in-process limiter and with Redis: the x-ratelimit-* headers on
every response to a limited key, 429 with Retry-After as the SDK sees it, a request too large for the
tokens-per-minute limit, and `tokentill keys update` taking effect on the next request."""

from __future__ import annotations

from collections.abc import Iterator
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
    """One server per limiter: in-process (the default), and Redis (TOKENTILL_REDIS_URL)."""
    llama_available()
    env = {}
    if request.param == "redis":
        env["TOKENTILL_REDIS_URL"] = request.getfixturevalue("redis_url")
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
