"""The CLI against a real database: bootstrap on first serve, accounts, credits, keys, usage."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import requests

from tests.e2e.conftest import TokentillServer, llama_available

pytestmark = [pytest.mark.e2e]


def test_accounts_credits_keys(tmp_path: Path) -> None:
    cli = TokentillServer(tmp_path, None)
    assert cli.cli_json("accounts", "create", "acme", "--credits", "0.25") == {
        "account": "acme",
        "balance": "0.25",
    }
    assert cli.cli("accounts", "create", "acme", check=False).returncode != 0
    assert cli.cli_json("credits", "add", "acme", "1.000001")["balance"] == "1.250001"
    assert cli.cli("credits", "add", "acme", "0.0000001", check=False).returncode != 0  # below 1 µcr
    assert cli.cli("credits", "add", "nobody", "1", check=False).returncode != 0
    created = cli.cli_json("keys", "create", "--account", "acme", "--models", "o1-preview", "--name", "ci")
    assert re.fullmatch(r"tt-[a-z0-9]{8}-[A-Za-z0-9_\-]{43}", created["key"])
    listed = cli.cli_json("keys", "list")["keys"]
    assert [k["id"] for k in listed] == [created["id"]]
    assert listed[0]["models"] == ["o1-preview"] and not listed[0]["revoked"]
    assert created["key"] not in cli.cli("keys", "list").stdout  # secrets are shown once
    assert cli.cli_json("keys", "revoke", created["id"]) == {"revoked": created["id"]}
    assert cli.cli_json("keys", "list")["keys"][0]["revoked"] is True
    assert cli.cli_json("accounts", "list")["accounts"] == [{"name": "acme", "balance": "1.250001"}]
    assert cli.cli_json("usage")["usage"] == []


@pytest.mark.llama
def test_first_serve_bootstraps_default_account(tmp_path: Path) -> None:
    llama_available()
    server = TokentillServer(tmp_path, None).start()
    try:
        match = re.search(r"tt-[a-z0-9]{8}-[A-Za-z0-9_\-]{43}", server.log())
        assert match, server.log()
        r = requests.post(
            server.url + "/v1/o1-preview",
            json={"messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 4},
            headers={"Authorization": f"Bearer {match.group(0)}"},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        assert server.balance("default") == r.headers["x-remaining-credits"]
        rows = server.cli_json("usage", "--account", "default")["usage"]
        assert len(rows) == 1 and rows[0]["status"] == 200
    finally:
        server.stop()
    # A second start on the same database creates nothing new.
    server.start()
    try:
        assert len(re.findall(r"tt-[a-z0-9]{8}-", server.log())) == 1
    finally:
        server.stop()
