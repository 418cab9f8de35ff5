"""Server-side failures on a real server: a full queue (503), a passed deadline (504), and the money after."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest
import requests

from tests.e2e.conftest import DEFAULT_MODEL, TokentillServer, llama_available

pytestmark = [pytest.mark.e2e, pytest.mark.llama]


def _post(server: TokentillServer, key: str, body: dict[str, Any]) -> requests.Response:
    return requests.post(
        server.url + "/v1/o1-preview", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=300
    )


def _envelope(response: requests.Response, status: int, code: str) -> None:
    """The whole OpenAI error envelope, with the headers every authenticated response carries."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["x-request-id"].startswith("req_")
    assert Decimal(response.headers["x-remaining-credits"]) >= 0
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["type"], error["code"], error["param"]) == ("server_error", code, None)


def _charges(server: TokentillServer, account: str) -> Decimal:
    rows = server.cli_json("usage", "--account", account, "--limit", "1000")["usage"]
    return sum((Decimal(r["cost"]) for r in rows), Decimal(0))


def test_full_queue_is_503_and_costs_nothing(tmp_path: Path) -> None:
    llama_available()
    # One slot and one queue place: the rest of six concurrent requests must be turned away.
    server = TokentillServer(tmp_path, None, TOKENTILL_QUEUE_SIZE="1", TOKENTILL_MAX_PARALLEL="1").start()
    try:
        key = server.new_key("busy", credits="2")
        body = {
            "messages": [{"role": "user", "content": "Write a poem about the moon."}],
            "max_completion_tokens": 140,
            "reasoning_effort": "low",
        }
        with ThreadPoolExecutor(max_workers=6) as pool:
            responses = list(pool.map(lambda _: _post(server, key, body), range(6)))
        statuses = [r.status_code for r in responses]
        assert 503 in statuses and 200 in statuses, statuses
        for r in responses:
            if r.status_code == 503:
                _envelope(r, 503, "overloaded")
                assert int(r.headers["retry-after"]) >= 1
            else:
                assert r.status_code == 200, r.text  # admitted requests finish, both passes included
        ok = [r.json()["usage"] for r in responses if r.status_code == 200]
        billed = sum(u["prompt_tokens"] * 15 + u["completion_tokens"] * 60 for u in ok)
        assert _charges(server, "busy") == Decimal(billed) / 10**6
        assert Decimal(server.balance("busy")) == Decimal(2) - Decimal(billed) / 10**6
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
        assert client.models.retrieve(DEFAULT_MODEL).id == DEFAULT_MODEL  # still healthy
    finally:
        server.stop()


def test_deadline_is_504_and_costs_nothing(tmp_path: Path) -> None:
    llama_available()
    server = TokentillServer(tmp_path, None, TOKENTILL_REQUEST_TIMEOUT_S="1.5").start()
    try:
        key = server.new_key("slow", credits="1")
        r = _post(
            server,
            key,
            {
                "messages": [{"role": "user", "content": "Write a very long story about the sea."}],
                "max_completion_tokens": 2000,
                "reasoning_effort": "high",
            },
        )
        _envelope(r, 504, "timeout")
        # The whole request's time, whichever pass (hidden reasoning or answer) ran out of it.
        assert r.json()["error"]["message"] == "The request timed out after 1.5 seconds."
        assert r.headers["x-remaining-credits"] == "1"
        assert server.balance("slow") == "1"
        rows = server.cli_json("usage", "--account", "slow")["usage"]
        assert [(row["status"], row["cost"]) for row in rows] == [(504, "0")]
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
        with pytest.raises(openai.APIStatusError) as info:
            client.chat.completions.create(
                model=DEFAULT_MODEL,
                messages=[{"role": "user", "content": "Write a very long story about the sea."}],
                max_completion_tokens=2000,
                reasoning_effort="high",
            )
        assert info.value.status_code == 504
        assert requests.get(server.url + "/healthz", timeout=5).status_code == 200
    finally:
        server.stop()
