"""Group commit across replicas: two `tokentill serve` processes on one PostgreSQL (and one Redis), group
commit on, hammered with concurrent requests on ONE account that cannot pay for all of them.

Checked from the database itself: the final balance is exact to the micro-credit, no balance any ledger
row records was ever negative, every 200 has its settled hold, its usage row and its release and charge
ledger rows, there is a usage row for nothing else, and the replicas did batch (their /metrics count
fewer transactions than operations)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx2
import pytest

from tests._services import run
from tests.conftest import _plain_pg
from tests.e2e.conftest import TokentillServer
from tests.faults.harness import metric_counts

pytestmark = [pytest.mark.e2e, pytest.mark.postgres, pytest.mark.redis]

PRICE_IN, PRICE_OUT = 1000, 2000  # µcr per token
MAX_TOKENS = 6
REQUESTS = 240
CONCURRENCY = 48  # in flight at once, half on each replica
CATALOG = f'[[models]]\nid = "echo"\nengine = "echo"\nprice_input = {PRICE_IN}\nprice_output = {PRICE_OUT}\n'
BODY: dict[str, Any] = {
    "model": "echo",
    "messages": [{"role": "user", "content": "one two three"}],
    "max_completion_tokens": MAX_TOKENS,
}


@pytest.fixture
def replicas(tmp_path: Path, pg_database_url: str, redis_url: str) -> Iterator[list[TokentillServer]]:
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(CATALOG, encoding="utf-8")
    env = {
        "TOKENTILL_CONFIG": str(catalog),
        "TOKENTILL_REDIS_URL": redis_url,
        "TOKENTILL_GROUP_COMMIT": "true",
        "TOKENTILL_QUEUE_SIZE": "256",
    }
    servers = [TokentillServer(tmp_path / name, pg_database_url, **env).start() for name in ("a", "b")]
    try:
        yield servers
    finally:
        for server in servers:
            server.stop()


async def _hammer(servers: list[TokentillServer], key: str) -> list[httpx2.Response]:
    todo = iter(range(REQUESTS))
    responses: list[httpx2.Response] = []
    limits = httpx2.Limits(max_connections=CONCURRENCY)
    async with httpx2.AsyncClient(timeout=httpx2.Timeout(120.0), limits=limits, trust_env=False) as client:

        async def worker(w: int) -> None:
            server = servers[w % 2]
            for _ in todo:
                responses.append(
                    await client.post(
                        f"{server.url}/v1/chat/completions",
                        json=BODY,
                        headers={"Authorization": f"Bearer {key}"},
                    )
                )

        await asyncio.gather(*(worker(w) for w in range(CONCURRENCY)))
    return responses


async def _books(database_url: str, account: str) -> dict[str, Any]:
    conn = await asyncpg.connect(_plain_pg(database_url), timeout=10)
    try:
        account_id = await conn.fetchval("SELECT id FROM accounts WHERE name = $1", account)
        return {
            "balance": await conn.fetchval("SELECT balance FROM accounts WHERE id = $1", account_id),
            "ledger_sum": await conn.fetchval(
                "SELECT COALESCE(SUM(amount), 0) FROM ledger WHERE account_id = $1", account_id
            ),
            "lowest": await conn.fetchval(
                "SELECT MIN(balance_after) FROM ledger WHERE account_id = $1", account_id
            ),
            "usage": {
                r["request_id"]: (r["cost"], r["status"])
                for r in await conn.fetch(
                    "SELECT request_id, cost, status FROM usage WHERE account_id = $1", account_id
                )
            },
            "holds": dict(await conn.fetch("SELECT id, status FROM holds WHERE account_id = $1", account_id)),
            "ledger": Counter(
                (r["ref"], r["kind"])
                for r in await conn.fetch("SELECT ref, kind FROM ledger WHERE account_id = $1", account_id)
            ),
        }
    finally:
        await conn.close()


def test_one_account_hammered_from_two_replicas_is_exact(
    replicas: list[TokentillServer], pg_database_url: str
) -> None:
    # Enough for about half of the requests: both outcomes happen, under full concurrency.
    credits = "1.5"
    key = replicas[0].new_key("hot-account", credits=credits)
    responses = run(_hammer(replicas, key))

    statuses = Counter(r.status_code for r in responses)
    assert set(statuses) <= {200, 402}, statuses
    assert statuses[200] > 0 and statuses[402] > 0, statuses
    refused = [r.json()["error"] for r in responses if r.status_code == 402]
    assert {e["code"] for e in refused} == {"insufficient_credits"}, refused[:3]
    delivered = {
        r.headers["x-request-id"]: r.json()["usage"]["prompt_tokens"] * PRICE_IN
        + r.json()["usage"]["completion_tokens"] * PRICE_OUT
        for r in responses
        if r.status_code == 200
    }

    books = run(_books(pg_database_url, "hot-account"))
    assert books["balance"] == 1_500_000 - sum(delivered.values())  # exact to the micro-credit
    assert books["balance"] == books["ledger_sum"]
    assert books["lowest"] >= 0  # no balance along the way was negative
    assert books["usage"] == {rid: (cost, 200) for rid, cost in delivered.items()}  # a row per 200, no other
    assert books["holds"] == dict.fromkeys(delivered, "settled")  # a refused hold left no row
    for rid in delivered:
        assert books["ledger"][rid, "hold"] == 1, rid
        assert books["ledger"][rid, "release"] == 1, rid
        assert books["ledger"][rid, "charge"] == 1, rid
    assert books["ledger"][None, "credit"] == 1
    assert sum(books["ledger"].values()) == 1 + 3 * len(delivered)  # nothing for the refused requests

    counts = [metric_counts(s, "tokentill_group_commit_total", "what") for s in replicas]
    assert all(c["ops"] > 0 for c in counts), counts  # both replicas served the account
    assert sum(c["batches"] for c in counts) < sum(c["ops"] for c in counts), counts  # and batched
    print(
        f"\n[group commit] {REQUESTS} requests, {CONCURRENCY} concurrent on one account over 2 replicas: "
        f"{dict(statuses)}; ops/batches per replica: "
        + ", ".join(f"{c['ops']:.0f}/{c['batches']:.0f}" for c in counts)
    )
