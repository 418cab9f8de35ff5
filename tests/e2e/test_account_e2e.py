"""The self-serve API against real `tokentill serve` processes (SQLite and PostgreSQL): requests made through
the `openai` SDK show up exactly in `/v1/usage` and `/v1/usage/requests`; codes made with the CLI are
redeemed over HTTP once; two replicas redeeming the same codes at once credit each code exactly once."""

from __future__ import annotations

import threading
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest
import requests

from tests.e2e.conftest import DEFAULT_MODEL, TokentillServer

pytestmark = [pytest.mark.e2e, pytest.mark.llama]

PRICE_IN, PRICE_OUT = 15, 60  # the built-in o1-preview entry, µcr per token


def _get(server: TokentillServer, key: str, path: str, **params: Any) -> requests.Response:
    return requests.get(
        server.url + path, params=params, headers={"Authorization": f"Bearer {key}"}, timeout=30
    )


def _redeem(server: TokentillServer, key: str, code: str) -> requests.Response:
    return requests.post(
        server.url + "/v1/account/redeem",
        json={"code": code},
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )


def _race(
    barrier: threading.Barrier, results: list[int], i: int, server: TokentillServer, key: str, code: str
) -> None:
    barrier.wait()
    results[i] = _redeem(server, key, code).status_code


def test_usage_matches_what_the_sdk_saw(server: TokentillServer) -> None:
    key = server.new_key("viewer", credits="10")
    other = server.new_key("bystander", credits="1")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=300)
    made = []
    for prompt in ("Say hi.", "Name a colour.", "Count to three."):
        raw = client.chat.completions.with_raw_response.create(
            model=DEFAULT_MODEL,
            messages=[{"role": "user", "content": prompt}],
            max_completion_tokens=12,
            reasoning_effort="low",
        )
        made.append((raw.headers["x-request-id"], raw.parse().usage))
    balance = Decimal(server.balance("viewer"))

    usage = _get(server, key, "/v1/usage").json()
    total = usage["total"]
    assert total["requests"] == 3
    assert total["prompt_tokens"] == sum(u.prompt_tokens for _, u in made)
    assert total["completion_tokens"] == sum(u.completion_tokens for _, u in made)
    assert total["reasoning_tokens"] == sum(u.completion_tokens_details.reasoning_tokens for _, u in made)
    billed = sum(u.prompt_tokens * PRICE_IN + u.completion_tokens * PRICE_OUT for _, u in made)
    assert Decimal(total["cost"]) == Decimal(billed) / 1_000_000 == Decimal("10") - balance
    by_model = _get(server, key, "/v1/usage", group_by="day,model").json()["data"]
    assert [(row["model"], row["requests"], row["cost"]) for row in by_model] == [
        (DEFAULT_MODEL, 3, total["cost"])
    ]

    log = _get(server, key, "/v1/usage/requests", limit=2).json()
    rest = _get(server, key, "/v1/usage/requests", limit=2, before=log["next"]).json()
    rows = log["data"] + rest["data"]
    assert rest["next"] is None
    assert [row["id"] for row in rows] == [request_id for request_id, _ in reversed(made)]
    for row, (_, u) in zip(rows, reversed(made), strict=True):
        assert (row["prompt_tokens"], row["completion_tokens"], row["reasoning_tokens"]) == (
            u.prompt_tokens,
            u.completion_tokens,
            u.completion_tokens_details.reasoning_tokens,
        )
        assert row["status"] == 200 and row["model"] == DEFAULT_MODEL and row["latency_ms"] >= 0
        assert (
            Decimal(row["cost"]) * 1_000_000 == u.prompt_tokens * PRICE_IN + u.completion_tokens * PRICE_OUT
        )

    # Another account's key sees none of it; the account route names the right account and key.
    assert _get(server, other, "/v1/usage").json()["total"]["requests"] == 0
    assert _get(server, other, "/v1/usage/requests").json()["data"] == []
    account = _get(server, key, "/v1/account").json()
    assert account["account"] == "viewer" and account["balance"] == str(balance)
    assert key.startswith(f"tt-{account['key']['id']}-")


def test_cli_codes_redeemed_over_http(server: TokentillServer) -> None:
    key = server.new_key("redeemer", credits="1")
    made = server.cli_json("codes", "create", "--credits", "2.5", "--count", "2", "--expires", "3")["codes"]
    assert len(made) == 2 and all(c["credits"] == "2.5" and c["expires_at"] for c in made)
    r = _redeem(server, key, made[0]["code"])
    assert r.status_code == 200, r.text
    assert r.json()["balance"] == "3.5" == server.balance("redeemer") == r.headers["x-remaining-credits"]
    again = _redeem(server, key, made[0]["code"])
    assert again.status_code == 409 and again.json()["error"]["code"] == "code_already_redeemed"
    missing = _redeem(server, key, made[0]["code"][:-6] + "aaaaaa")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "code_not_found"
    listed = {c["id"]: c for c in server.cli_json("codes", "list")["codes"]}
    assert (
        listed[made[0]["id"]]["status"] == "redeemed" and listed[made[0]["id"]]["redeemed_by"] == "redeemer"
    )
    assert listed[made[1]["id"]]["status"] == "active"
    assert made[0]["code"] not in server.cli("codes", "list").stdout  # shown once
    assert server.balance("redeemer") == "3.5"

    revoked = server.new_key("redeemer")
    server.cli("keys", "revoke", revoked.split("-")[1])
    assert _redeem(server, revoked, made[1]["code"]).status_code == 401
    assert _get(server, revoked, "/v1/account").status_code == 401


def test_concurrent_redeems_credit_each_code_once(server: TokentillServer, module_dir: Path) -> None:
    """On PostgreSQL the two redeemers are two replicas sharing the database; on SQLite, one server."""
    replica = server
    database_url = server.env.get("TOKENTILL_DATABASE_URL")
    if database_url is not None:
        replica = TokentillServer(module_dir / "postgres-replica", database_url).start()
    try:
        keys = [server.new_key("race-a", credits="0"), server.new_key("race-b", credits="0")]
        codes = [
            c["code"] for c in server.cli_json("codes", "create", "--credits", "1", "--count", "5")["codes"]
        ]
        statuses: list[tuple[int, int]] = []
        for code in codes:
            results: list[int] = [0, 0]
            barrier = threading.Barrier(2)
            threads = [
                threading.Thread(target=_race, args=(barrier, results, i, target, keys[i], code))
                for i, target in enumerate((server, replica))
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            statuses.append((results[0], results[1]))
        assert all(sorted(pair) == [200, 409] for pair in statuses), statuses
        wins_a = sum(1 for a, _ in statuses if a == 200)
        assert Decimal(server.balance("race-a")) == wins_a
        assert Decimal(server.balance("race-b")) == len(codes) - wins_a
    finally:
        if replica is not server:
            replica.stop()


def test_codes_cli_refuses_bad_input(tmp_path: Path) -> None:
    cli = TokentillServer(tmp_path, None)
    cli.cli("init")
    for args in (
        ["--credits", "0"],
        ["--credits", "-1"],
        ["--credits", "0.0000001"],
        ["--credits", "ten"],
        ["--credits", "1", "--count", "0"],
        ["--credits", "1", "--count", "1001"],
        ["--credits", "1", "--expires", "0"],
    ):
        result = cli.cli("codes", "create", *args, check=False)
        assert result.returncode == 2 and "Traceback" not in result.stderr, (args, result.stderr)
    assert cli.cli_json("codes", "list") == {"codes": []}
    made = cli.cli("codes", "create", "--credits", "0.5", "--count", "2").stdout
    assert len([line for line in made.splitlines() if line.startswith("ttc-")]) == 2
    listed = cli.cli_json("codes", "list")["codes"]
    assert [(c["credits"], c["status"], c["expires_at"]) for c in listed] == [("0.5", "active", None)] * 2
