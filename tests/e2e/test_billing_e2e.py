"""Money under pressure: concurrent requests against a small balance, and a server killed mid-generation."""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.e2e.conftest import TokentillServer

pytestmark = [pytest.mark.e2e, pytest.mark.llama]


def _charges(server: TokentillServer, account: str) -> Decimal:
    rows = server.cli_json("usage", "--account", account, "--limit", "1000")["usage"]
    return sum((Decimal(r["cost"]) for r in rows), Decimal(0))


def test_race_never_overdraws(server: TokentillServer) -> None:
    key = server.new_key("racer", credits="0.003")  # ~3 worst-case holds of a short prompt + 8 tokens
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 8, "temperature": 0}

    def call(_: int) -> requests.Response:
        return requests.post(
            server.url + "/v1/o1-preview", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=300
        )

    with ThreadPoolExecutor(max_workers=12) as pool:
        responses = list(pool.map(call, range(12)))
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {200, 402}, [r.text for r in responses if r.status_code not in {200, 402}]
    ok = [r for r in responses if r.status_code == 200]
    assert 1 <= len(ok) < 12
    for r in responses:
        assert Decimal(r.headers["x-remaining-credits"]) >= 0
    balance = Decimal(server.balance("racer"))
    charged = _charges(server, "racer")
    assert balance >= 0
    assert balance == Decimal("0.003") - charged  # to the micro-credit
    billed = sum(
        r.json()["usage"]["prompt_tokens"] * 15 + r.json()["usage"]["completion_tokens"] * 60 for r in ok
    )
    assert charged == Decimal(billed) / 1_000_000


def test_crash_releases_hold(tmp_path: Path) -> None:
    from tests.e2e.conftest import llama_available

    llama_available()
    # Holds expire after HOLD_TTL_S; the request deadline must be shorter (a live request never loses its
    # hold). The kill must come before that deadline: it follows the hold's appearance at once.
    hold_ttl_s, sweep_s = 20, 1
    server = TokentillServer(
        tmp_path,
        None,
        TOKENTILL_HOLD_TTL_S=str(hold_ttl_s),
        TOKENTILL_REQUEST_TIMEOUT_S=str(hold_ttl_s - 1),
        TOKENTILL_HOLD_SWEEP_INTERVAL_S=str(sweep_s),
    ).start()
    try:
        key = server.new_key("crash", credits="1")
        body = {
            "messages": [
                {"role": "user", "content": "Write a very long story about the sea, with many chapters."}
            ],
            "max_completion_tokens": 2000,
            "temperature": 1.0,
            "logit_bias": {"0": -100, "2": -100},  # no end token: it cannot finish before the kill
        }

        def doomed_request() -> None:
            with contextlib.suppress(requests.RequestException):  # the server dies under it
                requests.post(
                    server.url + "/v1/o1-preview", json=body, headers={"x-api-key": key}, timeout=120
                )

        thread = threading.Thread(target=doomed_request, daemon=True)
        thread.start()
        deadline = time.monotonic() + 60
        while not server.hold_statuses("crash"):  # read from the database file: no process to start
            assert time.monotonic() < deadline, "the hold never appeared"
            time.sleep(0.05)
        server.kill()  # SIGKILL mid-generation: no settlement ran
        assert server.hold_statuses("crash") == ["open"]
        held = Decimal(1) - Decimal(server.balance("crash"))
        assert held >= Decimal(2000 * 60) / 1_000_000  # the worst case is reserved up front
        server.start()
        deadline = time.monotonic() + hold_ttl_s + sweep_s + 60  # expiry + a sweep, with room to spare
        while server.hold_statuses("crash") == ["open"]:
            assert time.monotonic() < deadline, "the stranded hold was never released"
            time.sleep(0.2)
        assert server.hold_statuses("crash") == ["expired"]
        assert Decimal(server.balance("crash")) == Decimal(1)
        thread.join(timeout=10)
    finally:
        server.stop()


def _wait_for_a_token_after(server: TokentillServer) -> None:
    """Return once a streamed request admitted now has its first token.

    The engine admits requests in order and decodes all of them in each step (continuous batching), so a
    request admitted earlier has generated at least one token by then, without guessing how long a token
    takes on this machine.
    """
    probe_key = server.new_key("json-leaver-probe", credits="1")
    with requests.post(
        server.url + "/v1/o1-preview",
        json={
            "messages": [{"role": "user", "content": "Hi"}],
            "max_completion_tokens": 16,
            "stream": True,
            "include_reasoning": True,
        },
        headers={"Authorization": f"Bearer {probe_key}"},
        stream=True,
        timeout=server.request_timeout_s + 30,
    ) as probe:
        assert probe.status_code == 200, probe.text
        for line in probe.iter_lines():
            if line.startswith(b"data: {"):
                choices = json.loads(line[len(b"data: ") :])["choices"]
                delta = choices[0]["delta"] if choices else {}
                if delta.get("content") or delta.get("reasoning_content"):
                    return
    raise AssertionError("the probe request ended without a token")


def test_client_leaving_a_json_request_pays_for_what_was_generated(sqlite_server: TokentillServer) -> None:
    """A non-streamed request whose client hangs up mid-generation: the generation stops, the usage row
    says 499, the tokens generated are charged to the micro-credit and the rest of the hold returns."""
    key = sqlite_server.new_key("json-leaver", credits="1")
    body = {
        "messages": [{"role": "user", "content": "Write a very long story about a lighthouse keeper."}],
        "max_completion_tokens": 2000,
        "reasoning_effort": "low",
        "logit_bias": {"0": -100, "2": -100},  # no end token: it would decode its whole budget
    }
    conn = http.client.HTTPConnection("127.0.0.1", sqlite_server.port, timeout=30)
    conn.request(
        "POST",
        "/v1/o1-preview",
        body=json.dumps(body),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    deadline = time.monotonic() + 60
    while not sqlite_server.hold_statuses("json-leaver"):  # the hold is taken: it is admitted
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.05)
    _wait_for_a_token_after(sqlite_server)  # so it has generated some, however slow the machine
    conn.close()  # the client goes away before any byte of the answer
    rows: list[dict[str, Any]] = []
    deadline = time.monotonic() + 60
    while not rows:
        assert time.monotonic() < deadline, "the abandoned request was never settled"
        time.sleep(0.5)
        rows = sqlite_server.cli_json("usage", "--account", "json-leaver")["usage"]
    (row,) = rows
    assert row["status"] == 499
    assert 0 < row["completion_tokens"] < 2000  # it stopped long before its budget
    cost = Decimal(row["cost"])
    assert cost == Decimal(row["prompt_tokens"] * 15 + row["completion_tokens"] * 60) / 10**6
    assert sqlite_server.hold_statuses("json-leaver") == ["settled"]  # no hold left open
    assert Decimal(sqlite_server.balance("json-leaver")) == Decimal(1) - cost
    time.sleep(1)  # and nothing more is generated or charged afterwards
    assert sqlite_server.cli_json("usage", "--account", "json-leaver")["usage"] == rows
