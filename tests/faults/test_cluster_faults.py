"""Faults injected into two replicas on PostgreSQL + Redis (issue 15): the database cut during streaming
and JSON load, a replica killed with settlements spooled, Redis stopped and restarted.

After each: every client-visible status is in {200, 402, 429, 503, 504} with no reset connection, every
delivered answer is billed exactly once, the sum of ledger rows is the balance of every account, no
balance is negative, no open hold outlives its TTL, and every settled hold has one usage row. The figures
printed (`-s`) are the ones docs/operations.md quotes.
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
import requests

from tests.e2e.conftest import TokentillServer
from tests.faults.conftest import ECHO_MODEL, GATED_MODEL, HOLD_TTL_S, PRICE_IN, PRICE_OUT, Cluster
from tests.faults.harness import (
    CLIENT_STATUSES,
    Outcomes,
    check_books,
    deferred_settlements,
    json_load,
    stream,
    wait_billed,
    wait_swept,
)

pytestmark = [pytest.mark.faults, pytest.mark.e2e, pytest.mark.postgres, pytest.mark.redis]

STREAMS = 6
OUTAGE_S = 4.0  # how long the database stays cut (the fault's size, not a wait for the machine)


def _start_streams(
    cluster: Cluster, key: str, outcomes: Outcomes, servers: list[object]
) -> list[threading.Thread]:
    threads = [
        threading.Thread(target=stream, args=(server, key, GATED_MODEL, outcomes), daemon=True)
        for server in servers
    ]
    for thread in threads:
        thread.start()
    # Every stream's first token is sent, and its client has the response: the upstream may be asked
    # while the hold still commits (docs/decisions.md "Hot path"), the client is answered only after.
    cluster.upstream.wait_for(len(threads))
    deadline = time.monotonic() + 30
    while outcomes.heads < len(threads):
        assert time.monotonic() < deadline, f"only {outcomes.heads} of {len(threads)} streams were answered"
        time.sleep(0.02)
    return threads


def _assert_clean(outcomes: Outcomes, cluster: Cluster) -> None:
    assert not outcomes.failures, outcomes.failures[:5]  # no reset connection, no ReadError
    assert set(outcomes.statuses) <= CLIENT_STATUSES, outcomes.statuses
    for server in (cluster.a, cluster.b):
        assert "Traceback" not in server.log_path.read_text(errors="replace"), server.log()


def test_database_cut_during_streaming_and_json_load(cluster: Cluster) -> None:
    key = cluster.a.new_key("cut", credits="1000")
    outcomes = Outcomes()
    with json_load([cluster.a, cluster.b], key, ECHO_MODEL, outcomes):
        streams = _start_streams(cluster, key, outcomes, [cluster.a, cluster.b] * (STREAMS // 2))
        time.sleep(0.5)  # some JSON load before the cut
        cluster.proxy.cut()
        cluster.upstream.gate.set()  # the streams finish while the database is away: [DONE] delivered
        for thread in streams:
            thread.join(60)
        time.sleep(OUTAGE_S)
        during = Counter(outcomes.statuses)
        cluster.proxy.restore()
        closed_s = wait_billed(cluster.direct_url, list(outcomes.delivered), timeout_s=40)
        time.sleep(0.5)  # JSON load again after the restore
    _assert_clean(outcomes, cluster)
    assert during[503] > 0, during  # the load did meet the outage
    assert outcomes.statuses[200] > during[200], outcomes.statuses  # and served again after it
    streamed = outcomes.streamed
    assert len(streamed) == STREAMS  # every stream reached [DONE] although the database was cut
    wait_swept(cluster.direct_url, timeout_s=HOLD_TTL_S + 10)
    books = check_books(cluster.direct_url, outcomes, PRICE_IN, PRICE_OUT)
    deferred = [deferred_settlements(s) for s in (cluster.a, cluster.b)]
    spooled = sum(d.get("spooled", 0) for d in deferred)
    assert spooled >= STREAMS  # at least the streams' settlements waited for the database
    assert spooled == sum(d.get("committed", 0) for d in deferred)  # and all of them committed
    print(
        f"\n[faults] database cut {OUTAGE_S:.0f} s under streaming + JSON load on 2 replicas: "
        f"statuses {dict(outcomes.statuses)}, delivered {len(outcomes.delivered)} "
        f"(streams {len(streamed)}), settlements spooled {spooled:.0f}, billed exactly once {books.billed}, "
        "every delivered answer's usage "
        f"row written {closed_s:.1f} s after the restore"
    )


def test_replica_killed_with_spooled_settlements_bills_after_restart(cluster: Cluster) -> None:
    key = cluster.a.new_key("killed", credits="1000")
    outcomes = Outcomes()
    streams = _start_streams(cluster, key, outcomes, [cluster.a] * 3)
    cluster.proxy.cut()
    cluster.upstream.gate.set()
    for thread in streams:
        thread.join(60)
    assert len(outcomes.delivered) == 3, outcomes
    spool = cluster.a.workdir / "data" / "spool"
    deadline = time.monotonic() + 30
    while sum(len(p.read_text().splitlines()) for p in spool.glob("*.jsonl")) < 3:
        assert time.monotonic() < deadline, "settlements were not spooled"
        time.sleep(0.05)
    cluster.a.kill()  # SIGKILL with three settlements spooled and none committed
    cluster.proxy.restore()
    restored = time.monotonic()
    cluster.a = cluster.restart(cluster.a)  # replays the spool before it is ready
    wait_billed(cluster.direct_url, list(outcomes.delivered), timeout_s=30)
    closed_s = time.monotonic() - restored
    _assert_clean(outcomes, cluster)
    assert list(spool.glob("*.jsonl")) == [] or all(p.stat().st_size == 0 for p in spool.glob("*.jsonl"))
    wait_swept(cluster.direct_url, timeout_s=HOLD_TTL_S + 10)
    books = check_books(cluster.direct_url, outcomes, PRICE_IN, PRICE_OUT)
    print(
        f"\n[faults] replica SIGKILLed with 3 spooled settlements: billed exactly once {books.billed}, "
        f"books closed {closed_s:.1f} s after the database came back (the restart included)"
    )


def test_redis_stopped_and_restarted(cluster: Cluster) -> None:
    key = cluster.a.new_key("redis", credits="1000", rpm="3")
    outcomes = Outcomes()
    session = requests.Session()
    body = {"model": ECHO_MODEL, "messages": [{"role": "user", "content": "limited"}]}
    headers = {"Authorization": f"Bearer {key}"}

    def post(server: TokentillServer) -> requests.Response:
        response = session.post(f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=30)
        outcomes.record(response, response.json().get("usage") if response.status_code == 200 else None)
        return response

    before = [post(s).status_code for s in (cluster.a, cluster.b, cluster.a, cluster.b)]
    assert before == [200, 200, 200, 429]
    cluster.redis.kill()
    down = [post(s) for s in (cluster.a, cluster.b)]
    assert [r.status_code for r in down] == [503, 503]  # fails closed
    assert all(r.headers.get("Retry-After") for r in down)
    cluster.redis.start()  # same port, empty: no persistence
    restarted = time.monotonic()
    after = [post(s).status_code for s in (cluster.a, cluster.b, cluster.a, cluster.b)]
    recovered_s = time.monotonic() - restarted
    # The documented risk (docs/scaling.md): the minute's window was lost with the restart, so the key
    # gets its limit again within the same minute.
    assert after == [200, 200, 200, 429], after
    _assert_clean(outcomes, cluster)
    wait_swept(cluster.direct_url, timeout_s=HOLD_TTL_S + 10)
    books = check_books(cluster.direct_url, outcomes, PRICE_IN, PRICE_OUT)
    print(
        f"\n[faults] Redis killed and restarted empty: statuses {dict(outcomes.statuses)}, 200s in one "
        f"minute {outcomes.statuses[200]} for rpm=3, first answers {recovered_s:.2f} s after restart, "
        f"billed exactly once {books.billed}"
    )


def test_idempotent_request_on_a_killed_replica_is_taken_over_after_the_lease(cluster: Cluster) -> None:
    """Item 4 across replicas: the SDK-style retry of a request whose replica died is answered by the other
    replica one lease (TOKENTILL_IDEMPOTENCY_LEASE_S = 2 s) after the last heartbeat, not 630 s later."""
    key = cluster.a.new_key("idem", credits="1000")
    headers = {"Authorization": f"Bearer {key}", "Idempotency-Key": "retry-me-1"}
    body = {"model": GATED_MODEL, "messages": [{"role": "user", "content": "once"}]}
    lost: list[BaseException] = []

    def first() -> None:
        try:
            requests.post(f"{cluster.a.url}/v1/chat/completions", json=body, headers=headers, timeout=60)
        except requests.RequestException as exc:
            lost.append(exc)

    thread = threading.Thread(target=first, daemon=True)
    thread.start()
    cluster.upstream.wait_for(1)  # the first attempt runs and holds the key
    cluster.a.kill()
    killed = time.monotonic()
    thread.join(30)
    assert lost, "the first attempt's connection should have died with its replica"
    cluster.upstream.gate.set()
    outcomes = Outcomes()
    conflicts = 0
    url = f"{cluster.b.url}/v1/chat/completions"
    while True:  # what the SDK does: retry a 409 after its Retry-After
        response = requests.post(url, json=body, headers=headers, timeout=30)
        if response.status_code != 409:
            break
        assert response.headers["x-should-retry"] == "true", response.text
        conflicts += 1
        assert time.monotonic() - killed < 30, "the dead request's claim was never taken over"
        time.sleep(float(response.headers["Retry-After"]))
    taken_over_s = time.monotonic() - killed
    outcomes.record(response, response.json().get("usage"))
    assert response.status_code == 200, response.text
    replay = requests.post(url, json=body, headers=headers, timeout=30)
    assert replay.headers.get("idempotent-replayed") == "true"  # answered once, charged once
    assert set(outcomes.statuses) <= CLIENT_STATUSES
    wait_swept(cluster.direct_url, timeout_s=HOLD_TTL_S + 10)  # the dead request's hold comes back
    books = check_books(cluster.direct_url, outcomes, PRICE_IN, PRICE_OUT)
    print(
        f"\n[faults] idempotent request's replica SIGKILLed: {conflicts} × 409 in progress, then taken over "
        f"and answered {taken_over_s:.1f} s after the kill (lease 2 s); billed exactly once {books.billed}"
    )
