"""Real `tokentill serve` processes on free loopback ports, driven by the openai SDK and requests.

`TokentillServer` runs `tokentill serve` as a subprocess with its own data folder and database, and waits
for `/readyz`. `server` is parametrised over SQLite and PostgreSQL; tests that only need one use
`sqlite_server`. Both are started once per session and shared by every module (HTTPX's suite shares its
server the same way): each test works in accounts of its own, named uniquely in the suite, and
`new_key` refuses an account another module made. A test that needs other settings, a restart or a kill
starts a `TokentillServer` of its own.

The operator commands the tests use as helpers (`new_key`, `balance`, `cli`) run the real CLI in-process
with click's `CliRunner` against the server's database (milliseconds instead of a Python start-up);
`serve`, and `cli(..., in_process=False)`, run the real executable.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests._services import require
from tests.engines.upstream_servers import ScriptedUpstream

DEFAULT_MODEL = "o1-preview"
_CLI_LOCK = threading.Lock()  # CliRunner swaps sys.stdout and os.environ: one command at a time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def llama_available() -> None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError as exc:
        require("llama.cpp", f"llama-cpp-python cannot be imported: {exc}")


class TokentillServer:
    def __init__(self, workdir: Path, database_url: str | None, **env: str) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "TOKENTILL_DATA_DIR": str(workdir / "data"),
            "TOKENTILL_PORT": str(self.port),
            "TOKENTILL_HOST": "127.0.0.1",
            # One llama.cpp thread: its spinning workers collapse when the test process competes for 2 cores.
            "TOKENTILL_N_THREADS": "1",
            "TOKENTILL_HOLD_SWEEP_INTERVAL_S": "1",
            **env,
        }
        if database_url:
            self.env["TOKENTILL_DATABASE_URL"] = database_url
        self.proc: subprocess.Popen[bytes] | None = None
        self._account_modules: dict[str, str] = {}  # account -> the test module whose new_key made it
        self.log_path = workdir / f"server-{self.port}.log"

    def cli(
        self, *args: str, check: bool = True, in_process: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """`tokentill ARGS` with this server's environment: in-process unless `in_process=False` or `serve`.

        In-process runs are what the executable does (exit status, stdout, stderr, and a traceback on
        stderr for an unhandled exception), without a Python start-up per command.
        """
        if not in_process or args[:1] == ("serve",):
            result = subprocess.run(
                [sys.executable, "-m", "tokentill", *args],
                env=self.env,
                capture_output=True,
                text=True,
                timeout=120,
            )
        else:
            result = self._cli_in_process(args)
        if check and result.returncode != 0:
            raise AssertionError(f"tokentill {' '.join(args)} failed: {result.stdout}\n{result.stderr}")
        return result

    def _cli_in_process(self, args: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
        from click.testing import CliRunner, Result

        from tokentill.cli.main import cli

        # Exactly this server's TOKENTILL_* variables: set its own, unset the rest (None removes).
        names = {n for n in (*os.environ, *self.env) if n.startswith("TOKENTILL_")}
        env = {name: self.env.get(name) for name in names}
        outcomes: list[Result] = []

        def invoke() -> None:
            outcomes.append(CliRunner().invoke(cli, list(args), env=env, prog_name="tokentill"))

        # On a thread of its own: the command calls asyncio.run(), which a caller's running loop (the
        # sync Playwright API keeps one) would refuse.
        with _CLI_LOCK:
            worker = threading.Thread(target=invoke)
            worker.start()
            worker.join()
        (outcome,) = outcomes
        stderr = outcome.stderr
        if outcome.exc_info is not None and not isinstance(outcome.exception, SystemExit):
            stderr += "".join(traceback.format_exception(*outcome.exc_info))
        return subprocess.CompletedProcess(["tokentill", *args], outcome.exit_code, outcome.stdout, stderr)

    def cli_json(self, *args: str) -> Any:
        out = self.cli(*args, "--json").stdout.strip().splitlines()
        return json.loads(out[-1])

    def new_key(self, account: str, credits: str = "10", **options: str) -> str:
        """A new key of `account`, created with `credits` if it does not exist yet."""
        module = os.environ.get("PYTEST_CURRENT_TEST", "").split("::")[0]
        owner = self._account_modules.setdefault(account, module)
        if owner != module:
            raise AssertionError(
                f"account {account!r} belongs to {owner}: this server is shared by the session, "
                "so name the accounts of each module uniquely"
            )
        if account not in {a["name"] for a in self.cli_json("accounts", "list")["accounts"]}:
            self.cli("accounts", "create", account, "--credits", credits)
        args = [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
        return str(self.cli_json("keys", "create", "--account", account, *args)["key"])

    def balance(self, account: str) -> str:
        accounts = {a["name"]: a["balance"] for a in self.cli_json("accounts", "list")["accounts"]}
        return str(accounts[account])

    @property
    def request_timeout_s(self) -> float:
        """This server's deadline for one request (TOKENTILL_REQUEST_TIMEOUT_S, else the default): a client
        that waits a little longer sees the server's own 504 instead of a read timeout of its own."""
        from tokentill.settings import Settings

        configured = self.env.get("TOKENTILL_REQUEST_TIMEOUT_S")
        default = Settings.model_fields["request_timeout_s"].default
        return float(configured) if configured else float(default)

    def hold_statuses(self, account: str) -> list[str]:
        """The status of each of the account's holds, read from the server's SQLite file (read-only)."""
        if "TOKENTILL_DATABASE_URL" in self.env:
            raise NotImplementedError(
                "hold_statuses reads the SQLite file of a server without a database URL"
            )
        database = self.workdir / "data" / "tokentill.db"
        with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as conn:
            rows = conn.execute(
                "SELECT holds.status FROM holds JOIN accounts ON accounts.id = holds.account_id "
                "WHERE accounts.name = ?",
                (account,),
            ).fetchall()
        return [status for (status,) in rows]

    def start(self, timeout_s: float = 90) -> TokentillServer:
        with self.log_path.open("ab") as log:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tokentill", "serve"], env=self.env, stdout=log, stderr=log
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if requests.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return self
            except (requests.ConnectionError, requests.Timeout):  # not listening yet, or a busy machine
                pass
            time.sleep(0.2)
        raise AssertionError(f"server not ready after {timeout_s}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tokentill")


@pytest.fixture(scope="session")
def sqlite_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokentillServer]:
    """The session's server on SQLite with the default settings, shared by every module."""
    llama_available()
    server = TokentillServer(tmp_path_factory.mktemp("shared-sqlite"), None).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres_server(
    tmp_path_factory: pytest.TempPathFactory, pg_server_url: str
) -> Iterator[TokentillServer]:
    """The session's server on a fresh PostgreSQL database, shared by every module."""
    llama_available()
    with _pg_database(pg_server_url, "tokentill_e2e_shared") as database_url:
        server = TokentillServer(tmp_path_factory.mktemp("shared-postgres"), database_url).start()
        yield server
        server.stop()


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def server(request: pytest.FixtureRequest) -> TokentillServer:
    """The same server on SQLite and on a fresh PostgreSQL database (the session's shared ones)."""
    shared = request.getfixturevalue(f"{request.param}_server")
    assert isinstance(shared, TokentillServer)
    return shared


@contextlib.contextmanager
def _pg_database(pg_server_url: str, prefix: str) -> Iterator[str]:
    from tests._services import run
    from tests.conftest import _pg_execute, _plain_pg

    name = f"{prefix}_{os.getpid()}_{free_port()}"
    run(_pg_execute(pg_server_url, f'CREATE DATABASE "{name}"'))
    try:
        yield _plain_pg(pg_server_url, name)
    finally:
        run(_pg_execute(pg_server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="module")
def pg_module_database_url(pg_server_url: str) -> Iterator[str]:
    """A fresh PostgreSQL database shared by one test module's servers, dropped afterwards."""
    with _pg_database(pg_server_url, "tokentill_e2e") as database_url:
        yield database_url


@pytest.fixture(scope="module")
def scripted() -> Iterator[ScriptedUpstream]:
    """The scripted OpenAI-compatible server of tests/engines/upstream_servers.py, on loopback."""
    server = ScriptedUpstream().start()
    yield server
    server.stop()
