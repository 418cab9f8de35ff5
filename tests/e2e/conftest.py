"""Real `tokentill serve` processes on free loopback ports, driven by the openai SDK and requests.

`TokentillServer` runs the real CLI as a subprocess with its own data folder and database, and waits for
`/readyz`. `server` is parametrised over SQLite and PostgreSQL; tests that only need one use
`sqlite_server`. Each server is module-scoped (starting one costs a model load, about a second).
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
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests._services import require
from tests.engines.upstream_servers import ScriptedUpstream

DEFAULT_MODEL = "o1-preview"


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
        self.log_path = workdir / f"server-{self.port}.log"

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "tokentill", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"tokentill {' '.join(args)} failed: {result.stdout}\n{result.stderr}")
        return result

    def cli_json(self, *args: str) -> Any:
        out = self.cli(*args, "--json").stdout.strip().splitlines()
        return json.loads(out[-1])

    def new_key(self, account: str, credits: str = "10", **options: str) -> str:
        if account not in {a["name"] for a in self.cli_json("accounts", "list")["accounts"]}:
            self.cli("accounts", "create", account, "--credits", credits)
        args = [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
        return str(self.cli_json("keys", "create", "--account", account, *args)["key"])

    def balance(self, account: str) -> str:
        accounts = {a["name"]: a["balance"] for a in self.cli_json("accounts", "list")["accounts"]}
        return str(accounts[account])

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
            except requests.ConnectionError:
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


@pytest.fixture(scope="module")
def sqlite_server(module_dir: Path) -> Iterator[TokentillServer]:
    llama_available()
    server = TokentillServer(module_dir / "sqlite", None).start()
    yield server
    server.stop()


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def server(request: pytest.FixtureRequest, module_dir: Path) -> Iterator[TokentillServer]:
    """The same server on SQLite and on a fresh PostgreSQL database."""
    llama_available()
    if request.param == "sqlite":
        yield request.getfixturevalue("sqlite_server")
        return
    database_url = request.getfixturevalue("pg_module_database_url")
    server = TokentillServer(module_dir / "postgres", database_url).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def pg_module_database_url(pg_server_url: str) -> Iterator[str]:
    """A fresh PostgreSQL database shared by one test module's server, dropped afterwards."""
    from tests._services import run
    from tests.conftest import _pg_execute, _plain_pg

    name = f"tokentill_e2e_{os.getpid()}_{free_port()}"
    run(_pg_execute(pg_server_url, f'CREATE DATABASE "{name}"'))
    try:
        yield _plain_pg(pg_server_url, name)
    finally:
        run(_pg_execute(pg_server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="module")
def scripted() -> Iterator[ScriptedUpstream]:
    """The scripted OpenAI-compatible server of tests/engines/upstream_servers.py, on loopback."""
    server = ScriptedUpstream().start()
    yield server
    server.stop()
