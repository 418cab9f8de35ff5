"""The CLI against a real database: bootstrap on first serve, accounts, credits, keys, usage.

Most commands run in-process (`TokentillServer.cli`); the ones marked `in_process=False`, and every
`serve`, run the real executable, so its exit status, output and error lines are checked as a shell sees them.
"""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.e2e.conftest import TokentillServer, llama_available

pytestmark = [pytest.mark.e2e]


def test_accounts_credits_keys(tmp_path: Path) -> None:
    cli = TokentillServer(tmp_path, None)
    database = tmp_path / "data" / "tokentill.db"
    # Before `init` (or a first `serve`) there is no database, and the CLI does not quietly make one.
    refused = cli.cli("accounts", "list", check=False, in_process=False)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert f"no tokentill database at {database}" in refused.stderr, refused.stderr
    assert "tokentill init" in refused.stderr and not (tmp_path / "data").exists()
    assert cli.cli("init", in_process=False).stdout.strip() == f"database {database}: created"
    assert cli.cli_json("init") == {"database": str(database), "created": False}
    listed = cli.cli("accounts", "list")
    assert listed.stdout.strip() == "no accounts" and f"database: {database}" in listed.stderr
    assert cli.cli_json("accounts", "create", "acme", "--credits", "0.25") == {
        "account": "acme",
        "balance": "0.25",
    }
    assert cli.cli("accounts", "create", "acme", check=False, in_process=False).returncode != 0
    assert cli.cli_json("credits", "add", "acme", "1.000001")["balance"] == "1.250001"
    assert cli.cli("credits", "add", "acme", "0.0000001", check=False).returncode != 0  # below 1 µcr
    assert cli.cli("credits", "add", "nobody", "1", check=False).returncode != 0
    # Refunds and debits: ledger rows with a note; a debit never takes the balance below zero.
    debited = cli.cli_json("credits", "debit", "acme", "0.25", "--note", "chargeback #4")
    assert debited == {"account": "acme", "debited": "0.25", "balance": "1.000001", "note": "chargeback #4"}
    refused = cli.cli("credits", "debit", "acme", "1.000002", "--note", "too much", check=False)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "its balance is 1.000001 credits" in refused.stderr, refused.stderr
    refunded = cli.cli_json("credits", "refund", "acme", "0.25", "--note", "sorry")
    assert refunded == {"account": "acme", "refunded": "0.25", "balance": "1.250001", "note": "sorry"}
    assert cli.cli("credits", "refund", "acme", "1", check=False).returncode == 2  # --note is required
    created = cli.cli_json("keys", "create", "--account", "acme", "--models", "o1-preview", "--name", "ci")
    assert re.fullmatch(r"tt-[a-z0-9]{8}-[A-Za-z0-9_\-]{43}", created["key"])
    listed = cli.cli_json("keys", "list")["keys"]
    assert [k["id"] for k in listed] == [created["id"]]
    assert listed[0]["models"] == ["o1-preview"] and not listed[0]["revoked"]
    assert created["key"] not in cli.cli("keys", "list", in_process=False).stdout  # secrets are shown once
    assert cli.cli_json("keys", "revoke", created["id"]) == {"revoked": created["id"]}
    assert cli.cli_json("keys", "list")["keys"][0]["revoked"] is True
    assert cli.cli_json("accounts", "list")["accounts"] == [{"name": "acme", "balance": "1.250001"}]
    assert cli.cli_json("usage")["usage"] == []


@pytest.mark.postgres
def test_cli_refuses_an_empty_or_missing_postgres_database(tmp_path: Path, pg_database_url: str) -> None:
    cli = TokentillServer(tmp_path, pg_database_url)  # the database exists and holds no table
    refused = cli.cli("keys", "list", check=False)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert "no tokentill database at postgresql+asyncpg://" in refused.stderr
    assert "(from TOKENTILL_DATABASE_URL)" in refused.stderr and "tokentill init" in refused.stderr
    assert cli.cli_json("init")["created"] is True
    assert cli.cli_json("keys", "list") == {"keys": []}
    missing = pg_database_url.rsplit("/", 1)[0] + "/tokentill_no_such_database"
    gone = TokentillServer(tmp_path / "gone", missing).cli("accounts", "list", check=False)
    assert gone.returncode == 1 and "Traceback" not in gone.stderr, gone.stderr
    assert 'database "tokentill_no_such_database" does not exist' in gone.stderr


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


KEY = re.compile(r"tt-[a-z0-9]{8}-[A-Za-z0-9_\-]{43}")


def _echo_server(workdir: Path, database_url: str | None = None, **env: str) -> TokentillServer:
    """A real `tokentill serve` on the echo engine: starts in a second, no model to load."""
    workdir.mkdir(parents=True, exist_ok=True)
    catalogue = workdir / "models.toml"
    catalogue.write_text('[[models]]\nid = "echo"\nengine = "echo"\n')
    return TokentillServer(workdir, database_url, TOKENTILL_CONFIG=str(catalogue), **env)


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (("credits", "add", "acme", "1e999999"), "too many credits"),
        (("credits", "add", "acme", "abc"), "not a number"),
        (("credits", "add", "acme", "--", "-1"), "cannot be negative"),
        (("credits", "add", "acme", "-5"), "use `tokentill credits debit NAME AMOUNT --note TEXT`"),
        (("credits", "debit", "acme", "-5", "--note", "x"), "a positive number"),
        (("credits", "refund", "acme", "0.5", "--note", " "), "--note"),
        (("credits", "add", "acme", "0"), "must be more than 0"),
        (("accounts", "create", ""), "1-64 characters"),
        (("accounts", "create", "n" * 65), "1-64 characters"),
        (("accounts", "create", "other", "--credits", "-2"), "cannot be negative"),
        # tokentill.names, shared with the admin API (issue 15.5)
        (("accounts", "create", "a\x1c"), "U+001C, which is not printable"),
        (("keys", "create", "--account", "acme", "--name", "x\x1fy"), "U+001F, which is not printable"),
        (("keys", "create", "--account", "acme", "--models", "ok,a\u2028b"), "'models[1]'"),
        (("keys", "revoke", "ab\x1dcd"), "'key_id'"),
    ],
)
def test_bad_operator_input_is_a_usage_error(tmp_path: Path, args: tuple[str, ...], said: str) -> None:
    cli = TokentillServer(tmp_path, None)
    cli.cli("init")
    cli.cli("accounts", "create", "acme", "--credits", "1")
    result = cli.cli(*args, check=False)
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr and said in result.stderr, result.stderr
    assert cli.cli_json("accounts", "list")["accounts"] == [{"name": "acme", "balance": "1"}]


def test_admin_refunds_and_debits_over_http(tmp_path: Path) -> None:
    server = _echo_server(tmp_path, TOKENTILL_ADMIN_KEY="admin-e2e-0123456789").start()
    try:

        def post(path: str, body: dict[str, str]) -> requests.Response:
            headers = {"Authorization": "Bearer admin-e2e-0123456789"}
            return requests.post(server.url + path, json=body, headers=headers, timeout=10)

        r = post("/admin/accounts/default/debits", {"credits": "4", "note": "trial ended"})
        assert r.status_code == 200 and r.json()["balance"] == "6", r.text
        r = post("/admin/accounts/default/debits", {"credits": "7", "note": "too much"})
        assert r.status_code == 409 and r.headers["content-type"] == "application/json", r.text
        assert r.json()["error"]["code"] == "insufficient_balance"
        r = post("/admin/accounts/default/refunds", {"credits": "1.5", "note": "outage credit"})
        assert r.json() == {"name": "default", "refunded": "1.5", "balance": "7.5", "note": "outage credit"}
        assert server.balance("default") == "7.5"
    finally:
        server.stop()


def test_bad_environment_names_the_variable(tmp_path: Path) -> None:
    cli = TokentillServer(tmp_path, None, TOKENTILL_PORT="abc")
    result = cli.cli("accounts", "list", check=False, in_process=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "TOKENTILL_PORT='abc'" in result.stderr, result.stderr
    cli = _echo_server(tmp_path / "credits", TOKENTILL_INITIAL_CREDITS="lots")
    result = cli.cli("serve", check=False)
    assert result.returncode == 1 and "TOKENTILL_INITIAL_CREDITS='lots': not a number" in result.stderr
    # A hold released while its request still runs would undercharge it: refused at start-up.
    cli = _echo_server(tmp_path / "hold", TOKENTILL_HOLD_TTL_S="600")
    result = cli.cli("serve", check=False)
    assert result.returncode == 1, result
    assert "TOKENTILL_HOLD_TTL_S (600) must be more than TOKENTILL_REQUEST_TIMEOUT_S" in result.stderr


def test_workers_without_redis_are_refused(tmp_path: Path) -> None:
    cli = _echo_server(tmp_path)
    cli.env.pop("TOKENTILL_REDIS_URL", None)
    result = cli.cli("serve", "--workers", "2", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "TOKENTILL_REDIS_URL" in result.stderr and "2x" in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("entry", "said"),
    [
        ('id = "echo"\nengine = "echo"\nprice_input = "x"\n', "model 'echo': price_input"),
        ('id = "echo"\nengine = "echo"\ncolour = "red"\n', "model 'echo': colour"),
        ('id = "echo"\nweights = "/no/such.gguf"\n', "weights: Value error, file not found: /no/such.gguf"),
        ('id = "echo"\nengine = "echo"\n[[models]]\nid = "echo"\nengine = "echo"\n', "duplicate model id"),
        ('id = "echo"\nengine = echo\n', "not valid TOML"),
        # Upstream entries are checked before the server starts, not in its lifespan.
        (
            'id = "up"\nengine = "upstream"\nbase_url = "http://127.0.0.1:9/v1"\n'
            'api_key = "env:TOKENTILL_TEST_NO_SUCH_VARIABLE"\n',
            "api_key names the environment variable TOKENTILL_TEST_NO_SUCH_VARIABLE; it is unset",
        ),
        (
            'id = "up"\nengine = "upstream"\nbase_url = "http://u:p@127.0.0.1:9/v1"\n',
            "must not carry user:password@",
        ),
        (
            'id = "up"\nengine = "upstream"\nbase_url = "http://127.0.0.1:9/v1"\nheaders = {"x a" = "1"}\n',
            "'x a' is not a valid HTTP header name",
        ),
    ],
)
def test_serve_refuses_a_bad_catalogue(tmp_path: Path, entry: str, said: str) -> None:
    cli = _echo_server(tmp_path)
    Path(cli.env["TOKENTILL_CONFIG"]).write_text("[[models]]\n" + entry)
    result = cli.cli("serve", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert said in result.stderr, result.stderr


@pytest.mark.postgres
def test_replicas_bootstrap_an_empty_database_together(tmp_path: Path, pg_database_url: str) -> None:
    replicas = [_echo_server(tmp_path / name, pg_database_url) for name in ("a", "b")]
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(TokentillServer.start, replicas))  # both must come up: the loser does nothing
    try:
        keys = [k for r in replicas for k in KEY.findall(r.log())]
        assert len(keys) == 1, [r.log() for r in replicas]
        assert replicas[0].cli_json("accounts", "list")["accounts"] == [{"name": "default", "balance": "10"}]
        assert len(replicas[0].cli_json("keys", "list", "--account", "default")["keys"]) == 1
        for replica in replicas:
            r = requests.get(replica.url + "/v1/models", headers={"x-api-key": keys[0]}, timeout=10)
            assert r.status_code == 200 and r.headers["x-remaining-credits"] == "10"
    finally:
        for replica in replicas:
            replica.stop()


def test_serve_gives_a_keyless_default_its_key(tmp_path: Path) -> None:
    """A bootstrap that died between the account and its key is finished by the next start."""
    server = _echo_server(tmp_path)
    server.cli("init")
    server.cli("accounts", "create", "default", "--credits", "3")
    server.start()
    try:
        (key,) = KEY.findall(server.log())
        r = requests.get(server.url + "/v1/models", headers={"x-api-key": key}, timeout=10)
        assert r.status_code == 200 and r.headers["x-remaining-credits"] == "3"
        assert "with 3 credits" in server.log()
        # Log lines about a request carry its id (here uvicorn's access line, written as it ends).
        line = f"[{r.headers['x-request-id']}]: 127.0.0.1"
        deadline = time.monotonic() + 10
        while line not in server.log():
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.1)
    finally:
        server.stop()
    server.start()  # it has a key now: nothing more is created
    try:
        assert len(KEY.findall(server.log())) == 1
    finally:
        server.stop()
