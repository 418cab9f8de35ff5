"""Parts of the fault-injection suite: a gated upstream, a private Redis, JSON load, and the books check.

`GatedUpstream` is an OpenAI-style server whose streams send their first token, then wait for the test
to open the gate: the test decides exactly when answers finish (during an outage), whatever the speed of
the machine. `PrivateRedis` is a `redis-server` on a free loopback port without persistence, which a test
stops and starts again. `check_books` reads PostgreSQL directly (not through the proxy) and asserts the
ledger invariant and that every delivered answer was billed exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import redis
import requests
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests._services import require, run
from tests.e2e.conftest import TokentillServer, free_port
from tests.engines.upstream_servers import sse_chunk

CLIENT_STATUSES = {200, 402, 429, 503, 504}  # what a client may see under any of these faults
GATED_USAGE = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


class GatedUpstream:
    """Streams "Hello", waits for `gate`, then " world", usage and [DONE]."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.gate = threading.Event()
        self.waiting = 0  # streams that sent their first token and wait at the gate
        app = Starlette(
            routes=[
                Route("/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/v1/models", self._models, methods=["GET"]),
            ]
        )
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        config.timeout_graceful_shutdown = 1
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def start(self) -> GatedUpstream:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            assert time.monotonic() < deadline, "gated upstream did not start"
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.gate.set()
        self._server.should_exit = True
        self._thread.join(10)

    def wait_for(self, streams: int, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while self.waiting < streams:
            assert time.monotonic() < deadline, f"only {self.waiting} of {streams} streams reached the gate"
            time.sleep(0.02)

    async def _models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "m", "object": "model"}]})

    async def _chat(self, request: Request) -> Response:
        await request.json()

        async def events() -> AsyncIterator[bytes]:
            yield sse_chunk({"role": "assistant", "content": ""})
            yield sse_chunk({"content": "Hello"})
            self.waiting += 1
            while not self.gate.is_set():
                await asyncio.sleep(0.01)
            yield sse_chunk({"content": " world"})
            yield sse_chunk({}, "stop")
            yield sse_chunk(None, usage=GATED_USAGE)
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")


class PrivateRedis:
    """`redis-server` on a free loopback port, no RDB, no AOF: what a restart loses, it loses."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            require("Redis", "redis-server is not installed")
        self.binary = binary
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> PrivateRedis:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--appendonly", "no", "--dir", str(self.workdir)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "private redis-server did not start"
                time.sleep(0.05)
        client.close()
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@dataclass
class Outcomes:
    """What clients saw: statuses, and for each delivered answer (200) its request id and tokens."""

    statuses: Counter[int] = field(default_factory=Counter)
    delivered: dict[str, tuple[int, int]] = field(default_factory=dict)  # request id → (prompt, completion)
    streamed: list[str] = field(default_factory=list)  # request ids of streams that reached [DONE]
    failures: list[str] = field(default_factory=list)  # transport errors (resets): must stay empty
    heads: int = 0  # streams whose response head arrived (the gateway answers once its hold committed)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, response: requests.Response, usage: dict[str, Any] | None) -> None:
        with self.lock:
            self.statuses[response.status_code] += 1
            if response.status_code == 200 and usage is not None:
                request_id = response.headers["x-request-id"]
                self.delivered[request_id] = (usage["prompt_tokens"], usage["completion_tokens"])


@contextlib.contextmanager
def json_load(servers: list[TokentillServer], key: str, model: str, outcomes: Outcomes) -> Iterator[None]:
    """Non-streamed requests from two threads (one keep-alive session each), until the block exits."""
    stop = threading.Event()

    def worker(server: TokentillServer) -> None:
        session = requests.Session()
        body = {"model": model, "messages": [{"role": "user", "content": "load one two"}]}
        while not stop.is_set():
            try:
                response = session.post(
                    f"{server.url}/v1/chat/completions",
                    json=body,
                    headers={"Authorization": f"Bearer {key}"},
                    timeout=30,
                )
            except requests.RequestException as exc:
                with outcomes.lock:
                    outcomes.failures.append(repr(exc))
                continue
            outcomes.record(response, response.json().get("usage") if response.status_code == 200 else None)

    threads = [threading.Thread(target=worker, args=(s,), daemon=True) for s in servers]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)


def stream(server: TokentillServer, key: str, model: str, outcomes: Outcomes) -> None:
    """One streamed request read to the end; a 200 counts as delivered only if it reached [DONE]."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "stream please"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    try:
        with requests.post(
            f"{server.url}/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {key}"},
            stream=True,
            timeout=60,
        ) as response:
            with outcomes.lock:
                outcomes.heads += 1
            usage = None
            done = False
            for line in response.iter_lines():
                if line == b"data: [DONE]":
                    done = True
                elif line.startswith(b"data: {") and b'"usage":{' in line:
                    usage = json.loads(line[6:]).get("usage") or usage
            outcomes.record(response, usage if done else None)
            if done and response.status_code == 200:
                with outcomes.lock:
                    outcomes.streamed.append(response.headers["x-request-id"])
    except requests.RequestException as exc:
        with outcomes.lock:
            outcomes.failures.append(repr(exc))


@dataclass
class Books:
    accounts: int
    open_past_ttl: int
    billed: int  # delivered answers with exactly one usage row and one charge of the right amount


def check_books(database_url: str, outcomes: Outcomes, price_in: int, price_out: int) -> Books:
    """Assert the ledger invariant on every account and that every delivered answer is billed once."""

    async def read() -> Books:
        conn = await asyncpg.connect(database_url, timeout=10)
        try:
            rows = await conn.fetch(
                "SELECT a.id, a.balance, COALESCE(SUM(l.amount), 0) AS ledger_sum FROM accounts a "
                "LEFT JOIN ledger l ON l.account_id = a.id GROUP BY a.id, a.balance"
            )
            for row in rows:
                assert row["balance"] == row["ledger_sum"], dict(row)  # sum of ledger rows = balance
                assert row["balance"] >= 0, dict(row)
            past_ttl = int(
                await conn.fetchval("SELECT count(*) FROM holds WHERE status = 'open' AND expires_at < now()")
            )
            # usage rows = requests billed: every settled hold has exactly one usage row, and back.
            unmatched = await conn.fetchval(
                "SELECT count(*) FROM holds h WHERE h.status = 'settled' AND "
                "(SELECT count(*) FROM usage u WHERE u.request_id = h.id) <> 1"
            )
            assert unmatched == 0, f"{unmatched} settled hold(s) without exactly one usage row"
            billed = 0
            for request_id, (prompt, completion) in outcomes.delivered.items():
                usage = await conn.fetch("SELECT cost FROM usage WHERE request_id = $1", request_id)
                charges = await conn.fetch(
                    "SELECT amount FROM ledger WHERE kind = 'charge' AND ref = $1", request_id
                )
                cost = prompt * price_in + completion * price_out
                assert [r["cost"] for r in usage] == [cost], (request_id, usage)
                assert [r["amount"] for r in charges] == [-cost], (request_id, charges)
                billed += 1
            return Books(accounts=len(rows), open_past_ttl=past_ttl, billed=billed)
        finally:
            await conn.close()

    return run(read())


def wait_billed(database_url: str, request_ids: list[str], timeout_s: float) -> float:
    """Seconds until every one of `request_ids` has its usage row (the books closed)."""

    async def count() -> int:
        conn = await asyncpg.connect(database_url, timeout=10)
        try:
            return int(
                await conn.fetchval(
                    "SELECT count(*) FROM usage WHERE request_id = ANY($1::text[])", request_ids
                )
            )
        finally:
            await conn.close()

    started = time.monotonic()
    while run(count()) < len(request_ids):
        assert time.monotonic() - started < timeout_s, "delivered answers not billed in time"
        time.sleep(0.1)
    return time.monotonic() - started


def wait_swept(database_url: str, timeout_s: float) -> None:
    """Until no open hold is past its expiry (the sweepers ran)."""

    async def count() -> int:
        conn = await asyncpg.connect(database_url, timeout=10)
        try:
            return int(
                await conn.fetchval("SELECT count(*) FROM holds WHERE status = 'open' AND expires_at < now()")
            )
        finally:
            await conn.close()

    started = time.monotonic()
    while run(count()):
        assert time.monotonic() - started < timeout_s, "open holds past their TTL were not swept"
        time.sleep(0.2)


def deferred_settlements(server: TokentillServer) -> dict[str, float]:
    """`tokentill_settlements_deferred_total` by event, from the replica's /metrics."""
    return metric_counts(server, "tokentill_settlements_deferred_total", "event")


def metric_counts(server: TokentillServer, metric: str, label: str) -> dict[str, float]:
    """The samples of counter `metric` by the value of its one `label`, from the server's /metrics."""
    text = requests.get(f"{server.url}/metrics", timeout=10).text
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(metric + "{"):
            labels, value = line.rsplit(" ", 1)
            counts[labels.split(f'{label}="')[1].split('"')[0]] = float(value)
    return counts
