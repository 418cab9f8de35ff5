"""A replica SIGKILLed under concurrent load with group commit on (the default): batches in flight die
with it, and still no answer was delivered without its rows.

Two replicas on one PostgreSQL serve 32 concurrent JSON requests of one account; replica A is killed
mid-load and started again on its data folder while B keeps serving. Then: every 200 has its usage row
and exactly one charge of its cost, the only usage rows without a 200 are of requests whose connection
died with A (their settlement committed, the answer was lost in flight), the sum of ledger rows is the
balance of every account, none is negative, and no hold stays open past its TTL.
"""

from __future__ import annotations

import asyncio
import threading
import time

import asyncpg
import httpx2
import pytest

from tests._services import run
from tests.e2e.conftest import TokentillServer
from tests.faults.conftest import ECHO_MODEL, HOLD_TTL_S, PRICE_IN, PRICE_OUT, Cluster
from tests.faults.harness import Outcomes, check_books, metric_counts, wait_swept

pytestmark = [pytest.mark.faults, pytest.mark.e2e, pytest.mark.postgres, pytest.mark.redis]

CONCURRENCY = 32  # in flight at once, half on each replica
BODY = {
    "model": ECHO_MODEL,
    "messages": [{"role": "user", "content": "crash load"}],
    "max_completion_tokens": 4,
}


class Load:
    """`CONCURRENCY` async clients in a thread of their own, alternating between `servers[0]` and
    `servers[1]` (read again on every request: a restarted replica takes over its slot)."""

    def __init__(self, servers: list[TokentillServer], key: str) -> None:
        self.servers = servers
        self.key = key
        self.outcomes = Outcomes()
        self.lost: dict[int, int] = {0: 0, 1: 0}  # transport failures per slot (a dead replica's)
        self.cut = 0  # of those, requests cut off in flight (not refused at connect)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(120)

    def wait_for(self, answers: int, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while self.outcomes.statuses[200] < answers:
            assert time.monotonic() < deadline, f"only {self.outcomes.statuses[200]} answers"
            time.sleep(0.05)

    async def _run(self) -> None:
        limits = httpx2.Limits(max_connections=CONCURRENCY)
        async with httpx2.AsyncClient(timeout=httpx2.Timeout(60.0), limits=limits, trust_env=False) as client:
            await asyncio.gather(*(self._worker(client, w % 2) for w in range(CONCURRENCY)))

    async def _worker(self, client: httpx2.AsyncClient, slot: int) -> None:
        headers = {"Authorization": f"Bearer {self.key}"}
        while not self._stop.is_set():
            url = f"{self.servers[slot].url}/v1/chat/completions"
            try:
                response = await client.post(url, json=BODY, headers=headers)
            except httpx2.TransportError as exc:
                with self.outcomes.lock:
                    self.lost[slot] += 1
                    self.cut += not isinstance(exc, httpx2.ConnectError)
                await asyncio.sleep(0.05)  # the replica is down: do not spin
                continue
            usage = response.json().get("usage") if response.status_code == 200 else None
            with self.outcomes.lock:
                self.outcomes.statuses[response.status_code] += 1
                if usage is not None:
                    self.outcomes.delivered[response.headers["x-request-id"]] = (
                        usage["prompt_tokens"],
                        usage["completion_tokens"],
                    )


async def _fetch(database_url: str, query: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        return list(await conn.fetch(query))
    finally:
        await conn.close()


def _open_holds(database_url: str) -> int:
    return int(run(_fetch(database_url, "SELECT count(*) AS n FROM holds WHERE status = 'open'"))[0]["n"])


def test_replica_sigkilled_under_group_committed_load(cluster: Cluster) -> None:
    key = cluster.a.new_key("crash", credits="1000")
    servers = [cluster.a, cluster.b]
    with Load(servers, key) as load:
        load.wait_for(150)
        cluster.a.kill()  # batches queued and in flight die with it
        killed_with = load.outcomes.statuses[200]
        load.wait_for(killed_with + 100)  # B serves on alone
        servers[0] = cluster.a = cluster.restart(cluster.a)
        load.wait_for(load.outcomes.statuses[200] + 100)
    outcomes = load.outcomes
    assert set(outcomes.statuses) == {200}, outcomes.statuses
    assert load.lost[1] == 0, load.lost  # B never dropped a connection
    assert load.lost[0] > 0  # A's clients did see it die

    stranded = _open_holds(cluster.direct_url)  # the load has stopped: only the dead replica's are open
    deadline = time.monotonic() + HOLD_TTL_S + 10
    while _open_holds(cluster.direct_url):  # they expire after their TTL and a sweeper gives them back
        assert time.monotonic() < deadline, "holds of the killed replica were never released"
        time.sleep(0.5)
    wait_swept(cluster.direct_url, timeout_s=1)
    books = check_books(cluster.direct_url, outcomes, PRICE_IN, PRICE_OUT)
    assert books.billed == len(outcomes.delivered)  # every 200 has its usage row and its one charge
    usage_ids = {r["request_id"] for r in run(_fetch(cluster.direct_url, "SELECT request_id FROM usage"))}
    unanswered = usage_ids - set(outcomes.delivered)
    # A usage row without a 200 can only be a request cut off in flight by the kill (settled, not sent).
    assert len(unanswered) + stranded <= load.cut, (len(unanswered), stranded, load.cut)
    counts = metric_counts(cluster.b, "tokentill_group_commit_total", "what")
    ops, batches = counts["ops"], counts["batches"]
    assert batches < ops, (ops, batches)  # B did batch
    print(
        f"\n[faults] replica SIGKILLed under {CONCURRENCY} concurrent group-committed requests: "
        f"{outcomes.statuses[200]} answers, all billed once; of {load.cut} requests cut off in flight, "
        f"{len(unanswered)} settled (answer lost) and {stranded} held until the sweeper released them; "
        f"B: {ops:.0f} ops in {batches:.0f} batches"
    )
