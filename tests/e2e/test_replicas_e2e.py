"""Two `tokentill serve` replicas on different ports sharing one PostgreSQL database and one Redis behave as
one service: one exact rpm limit, credits never overdrawn and exact to the micro-credit, a revocation
honoured by both within a second, idempotent replays charged once, `--workers 2` the same, and a replica
killed with SIGKILL mid-load leaves no hold and no concurrency slot stranded."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import openai
import pytest
import requests

from tests._services import run
from tests.e2e.conftest import DEFAULT_MODEL, TokentillServer, llama_available

pytestmark = [pytest.mark.e2e, pytest.mark.llama, pytest.mark.postgres, pytest.mark.redis]

LEASE_TTL_S = 20  # concurrency slots of a dead replica free themselves after this
HOLD_TTL_S = LEASE_TTL_S + 5  # holds of a dead replica: must outlive the request deadline (LEASE_TTL_S)
SHORT: dict[str, Any] = {
    "messages": [{"role": "user", "content": "Say hi."}],
    "max_completion_tokens": 8,  # the hidden reasoning pass uses it all: empty answer, "length"; fine
    "reasoning_effort": "low",
}
MICRO = Decimal("0.000001")


@dataclass
class Pair:
    a: TokentillServer
    b: TokentillServer
    database_url: str
    env: dict[str, str]

    def servers(self) -> Iterator[TokentillServer]:
        return itertools.cycle([self.a, self.b])


@pytest.fixture(scope="module")
def pair(module_dir: Path, pg_module_database_url: str, redis_url: str) -> Iterator[Pair]:
    llama_available()
    env = {
        "TOKENTILL_REDIS_URL": redis_url,
        "TOKENTILL_HOLD_TTL_S": str(HOLD_TTL_S),
        "TOKENTILL_HOLD_SWEEP_INTERVAL_S": "1",
        "TOKENTILL_REQUEST_TIMEOUT_S": str(LEASE_TTL_S),
        "TOKENTILL_RATE_LIMIT_LEASE_TTL_S": str(LEASE_TTL_S),
        "TOKENTILL_QUEUE_SIZE": "64",
        # Two replicas decoding at once on a small machine: llama.cpp's spinning worker threads must not
        # outnumber the cores, or every request slows down many times over.
        "TOKENTILL_N_THREADS": "1",
    }
    # One after the other: the first creates the default account, the second finds it.
    a = TokentillServer(module_dir / "replica-a", pg_module_database_url, **env).start()
    b = TokentillServer(module_dir / "replica-b", pg_module_database_url, **env).start()
    try:
        yield Pair(a, b, pg_module_database_url, env)
    finally:
        a.stop()
        b.stop()


def _post(
    server: TokentillServer, key: str, body: dict[str, Any] | None = None, **headers: str
) -> requests.Response:
    return requests.post(
        f"{server.url}/v1/{DEFAULT_MODEL}",
        json=SHORT if body is None else body,
        headers={"Authorization": f"Bearer {key}", **headers},
        timeout=120,
    )


def _hammer(pair: Pair, key: str, n: int, body: dict[str, Any] | None = None) -> list[requests.Response]:
    """`n` requests from 8 threads, alternating between the replicas."""
    targets = list(itertools.islice(pair.servers(), n))
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(lambda s: _post(s, key, body), targets))


def _charged(server: TokentillServer, account: str) -> Decimal:
    rows = server.cli_json("usage", "--account", account, "--limit", "10000")["usage"]
    return sum((Decimal(r["cost"]) for r in rows), Decimal(0))


def _open_holds(pair: Pair) -> int:
    async def count() -> int:
        conn = await asyncpg.connect(pair.database_url, timeout=5)
        try:
            return int(await conn.fetchval("SELECT count(*) FROM holds WHERE status = 'open'"))
        finally:
            await conn.close()

    return run(count())


def test_rpm_is_exact_across_replicas(pair: Pair) -> None:
    key = pair.a.new_key("rep-rpm", rpm="5")
    # One admitted request on each replica first, so that both provably serve this key; the other three
    # of the five go to whichever replica wins the race.
    for server in (pair.a, pair.b):
        first = _post(server, key)
        assert first.status_code == 200, (server.url, first.text)
    responses = _hammer(pair, key, 14)
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 3 + [429] * 11, statuses  # per-replica limits would admit 4 more each


def test_account_is_never_overdrawn_and_exact(pair: Pair) -> None:
    credits = Decimal("0.004")  # a few short answers' worth of holds
    key = pair.a.new_key("rep-money", credits=str(credits))
    responses = _hammer(pair, key, 14)
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 402}, statuses
    assert 200 in statuses and 402 in statuses, statuses
    billed = sum(
        r.json()["usage"]["prompt_tokens"] * 15 + r.json()["usage"]["completion_tokens"] * 60
        for r in responses
        if r.status_code == 200
    )
    charged = _charged(pair.b, "rep-money")
    assert charged == Decimal(billed) * MICRO
    balance = Decimal(pair.b.balance("rep-money"))
    assert balance >= 0
    assert balance == credits - charged  # no hold left, nothing lost, to the micro-credit


def test_revocation_on_one_is_refused_by_both_within_a_second(pair: Pair) -> None:
    key = pair.a.new_key("rep-revoke")
    assert _post(pair.b, key).status_code == 200
    pair.a.cli("keys", "revoke", key.split("-")[1])
    revoked_at = time.monotonic()
    for server in (pair.a, pair.b):
        while True:
            sent_at = time.monotonic()  # a request sent a second after the revocation must be refused
            if _post(server, key).status_code == 401:
                break
            assert sent_at - revoked_at < 1.0, f"{server.url} still accepts a revoked key"


def test_a_key_in_a_replicas_cache_takes_nothing_once_revoked(pair: Pair) -> None:
    """B has just authenticated the key (its key cache holds it for TOKENTILL_KEY_CACHE_S); the key is
    revoked in the shared database; B's very next request is refused, and nothing is held or charged."""
    key = pair.a.new_key("rep-cached")
    assert _post(pair.b, key).status_code == 200

    async def books(revoke: bool) -> tuple[int, int]:
        conn = await asyncpg.connect(pair.database_url, timeout=5)
        try:
            if revoke:
                await conn.execute("UPDATE api_keys SET revoked_at = now() WHERE id = $1", key.split("-")[1])
            account = "(SELECT id FROM accounts WHERE name = 'rep-cached')"
            balance = await conn.fetchval(f"SELECT balance FROM accounts WHERE id = {account}")
            ledger_rows = await conn.fetchval(f"SELECT count(*) FROM ledger WHERE account_id = {account}")
            return int(balance), int(ledger_rows)
        finally:
            await conn.close()

    before = run(books(revoke=True))
    refused = _post(pair.b, key)
    assert refused.status_code == 401, refused.text
    assert refused.json()["error"]["code"] == "invalid_api_key"
    assert run(books(revoke=False)) == before  # no hold was taken: no ledger row, the same balance


def test_limit_change_on_one_is_honoured_by_the_other_within_a_second(pair: Pair) -> None:
    key = pair.a.new_key("rep-relimit")
    assert _post(pair.b, key).status_code == 200  # no limit yet
    pair.a.cli("keys", "update", key.split("-")[1], "--rpm", "1")
    changed_at = time.monotonic()
    # A 400 after authentication runs no model but carries the key's limits as B sees them now.
    while True:
        sent_at = time.monotonic()
        if "x-ratelimit-limit-requests" in (seen := _post(pair.b, key, {**SHORT, "n": 2})).headers:
            break
        assert sent_at - changed_at < 1.0, "B did not see the new limit within a second"
    assert seen.headers["x-ratelimit-limit-requests"] == "1"
    first = _post(pair.b, key)
    assert first.status_code == 200 and first.headers["x-ratelimit-remaining-requests"] == "0"
    second = _post(pair.b, key)
    assert second.status_code == 429 and "Limit 1" in second.json()["error"]["message"]
    assert _post(pair.a, key).status_code == 429  # one limit for both replicas


def test_idempotent_replay_across_replicas_is_charged_once(pair: Pair) -> None:
    key = pair.a.new_key("rep-idem")
    first = _post(pair.a, key, **{"Idempotency-Key": "order-1"})
    assert first.status_code == 200, first.text
    replay = _post(pair.b, key, **{"Idempotency-Key": "order-1"})
    assert replay.status_code == 200 and replay.headers["idempotent-replayed"] == "true"
    assert replay.json() == first.json()
    conflict = _post(pair.b, key, {**SHORT, "max_completion_tokens": 9}, **{"Idempotency-Key": "order-1"})
    assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "idempotency_key_reused"

    # Two clients racing on both replicas with one key: the SDK retries the in-progress 409 by itself.
    def sdk_call(server: TokentillServer) -> str:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=6)
        completion = client.chat.completions.create(
            model=DEFAULT_MODEL, **SHORT, extra_headers={"Idempotency-Key": "order-2"}
        )
        return completion.id

    with ThreadPoolExecutor(max_workers=2) as pool:
        ids = list(pool.map(sdk_call, [pair.a, pair.b]))
    assert ids[0] == ids[1]
    rows = pair.a.cli_json("usage", "--account", "rep-idem")["usage"]
    assert len(rows) == 2  # order-1 and order-2, each charged once
    assert Decimal(pair.a.balance("rep-idem")) == Decimal(10) - _charged(pair.a, "rep-idem")


def test_workers_share_one_limit(pair: Pair, module_dir: Path) -> None:
    """`tokentill serve --workers 2` (here via TOKENTILL_WORKERS) on the same PostgreSQL and Redis."""
    workers = TokentillServer(
        module_dir / "workers", pair.database_url, **pair.env, TOKENTILL_WORKERS="2"
    ).start()
    try:
        key = workers.new_key("rep-workers", rpm="4")
        with ThreadPoolExecutor(max_workers=8) as pool:
            statuses = sorted(pool.map(lambda _: _post(workers, key).status_code, range(12)))
        assert statuses == [200] * 4 + [429] * 8, statuses
        # And the limit is the same one the replicas use.
        assert _post(pair.a, key).status_code == 429
    finally:
        workers.stop()


def _children(pid: int) -> set[int]:
    return {
        int(c)
        for task in Path(f"/proc/{pid}/task").iterdir()
        for c in (task / "children").read_text().split()
    }


def test_a_slow_worker_is_kept_for_the_set_healthcheck(pair: Pair, module_dir: Path) -> None:
    """TOKENTILL_WORKER_HEALTHCHECK_S reaches uvicorn's supervisor: with 600 s, a worker that answers no
    health ping for three times uvicorn's default (5 s) is still the same process afterwards (with the
    default it is killed and replaced after 5 s)."""
    workers = TokentillServer(
        module_dir / "healthcheck",
        pair.database_url,
        **pair.env,
        TOKENTILL_WORKERS="2",
        TOKENTILL_WORKER_HEALTHCHECK_S="600",
    ).start()
    before: set[int] = set()
    try:
        assert workers.proc is not None
        supervisor = workers.proc.pid
        before = {
            pid for pid in _children(supervisor) if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
        }
        assert len(before) == 2, before
        stopped = min(before)
        os.kill(stopped, signal.SIGSTOP)  # alive, but it answers no ping
        time.sleep(3 * 5)
        assert stopped in _children(supervisor), "the supervisor replaced the worker before 600 s"
        os.kill(stopped, signal.SIGCONT)
        key = workers.new_key("rep-healthcheck")
        assert [_post(workers, key).status_code for _ in range(4)] == [200] * 4
    finally:
        for pid in before:  # a worker left stopped would not end with the server
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        workers.stop()


def test_sigkill_during_load_strands_nothing(pair: Pair) -> None:
    credits = Decimal(5)
    key = pair.a.new_key("rep-kill", credits=str(credits), max_concurrent="2")
    other = pair.b.new_key("rep-kill-other")
    long = {**SHORT, "max_completion_tokens": 400, "reasoning_effort": "high"}
    on_b: list[int] = []  # statuses of a client that keeps sending to B while A dies
    stop = threading.Event()

    def keep_sending() -> None:
        while not stop.is_set():
            on_b.append(_post(pair.b, other).status_code)

    with ThreadPoolExecutor(max_workers=4) as pool:
        steady = pool.submit(keep_sending)
        in_flight = [pool.submit(_post, pair.a, key, long) for _ in range(2)]
        deadline = time.monotonic() + 20
        while _open_holds(pair) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _open_holds(pair) >= 2, "the long requests never started"
        sent_before_kill = len(on_b)
        pair.a.kill()
        killed_at = time.monotonic()
        for future in in_flight:
            with pytest.raises(requests.ConnectionError):
                future.result()
        # The dead replica's two concurrency slots block the key until their lease TTL, not forever
        # (asked at once: on a busy machine the wait below could outlast the lease).
        first = _post(pair.b, key)
        assert first.status_code == 429 and "concurrent" in first.json()["error"]["message"]
        while len(on_b) < sent_before_kill + 3 and time.monotonic() - killed_at < 30:
            time.sleep(0.1)
        stop.set()
        steady.result()  # no connection error from B at any time
    assert len(on_b) >= sent_before_kill + 3, "B answered nothing after A died"
    assert set(on_b) == {200}, on_b  # B kept serving, before, during and after the kill
    while (status := _post(pair.b, key).status_code) == 429:
        assert time.monotonic() - killed_at < LEASE_TTL_S + 10, "slots of the dead replica never freed"
        time.sleep(1)
    assert status == 200

    pair.a.start()  # restart on the same port
    assert _post(pair.a, key).status_code == 200
    deadline = time.monotonic() + HOLD_TTL_S + 10
    while _open_holds(pair) and time.monotonic() < deadline:
        time.sleep(0.5)  # the killed requests' holds expire after TOKENTILL_HOLD_TTL_S
    assert _open_holds(pair) == 0
    assert Decimal(pair.b.balance("rep-kill")) == credits - _charged(pair.b, "rep-kill")
