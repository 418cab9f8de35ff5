"""Idempotency claims are leases (issue 15, item 4), on a real SQLite file and a real PostgreSQL database:
a running request's heartbeat keeps its claim past the lease, and a claim whose process died is taken over
one lease later instead of staying locked until the request deadline (630 s before).

The waits are multiples of the lease under test (1 s), never tuned to the machine."""

from __future__ import annotations

import asyncio
import time

import pytest
from sqlalchemy import select

from tests._services import run, run_with_db
from tests.faults.proxy import TcpProxy, through
from tokentill import errors
from tokentill.billing.ledger import Ledger
from tokentill.idempotency import Claim, IdempotencyStore, Replay
from tokentill.storage.db import Database, open_database
from tokentill.storage.schema import idempotency_keys

LEASE_S = 1.0


async def _status(db: Database, account: int, key: str) -> str | None:
    try:
        async with db.read() as conn:
            query = select(idempotency_keys.c.status).where(
                idempotency_keys.c.account_id == account, idempotency_keys.c.key == key
            )
            return (await conn.execute(query)).scalar_one_or_none()
    except errors.ServiceUnavailable:
        return None


def _store(db: Database) -> IdempotencyStore:
    return IdempotencyStore(db, ttl_s=3600, abandon_after_s=LEASE_S, max_claim_s=60)


def test_heartbeat_keeps_a_running_claim(database_url: str) -> None:
    async def body(db: Database) -> None:
        account = (await Ledger(db).create_account("lease", 1000)).id
        running, other = _store(db), _store(db)  # two replicas
        claim = await running.claim(account, "k1", "fp", "req_1")
        assert isinstance(claim, Claim)
        await asyncio.sleep(3 * LEASE_S)  # three leases: only the heartbeat keeps it
        with pytest.raises(errors.Conflict) as info:
            await other.claim(account, "k1", "fp", "req_2")
        assert info.value.headers["x-should-retry"] == "true"  # still in progress
        await running.complete(claim, status=200, body={"ok": 1}, headers={})
        replay = await other.claim(account, "k1", "fp", "req_3")
        assert isinstance(replay, Replay) and replay.body == {"ok": 1}
        await running.aclose()
        await other.aclose()

    run_with_db(database_url, body)


def test_claim_of_a_dead_request_is_taken_over_after_the_lease(database_url: str) -> None:
    async def body(db: Database) -> None:
        account = (await Ledger(db).create_account("dead", 1000)).id
        dying, survivor = _store(db), _store(db)
        claim = await dying.claim(account, "k2", "fp", "req_1")
        assert isinstance(claim, Claim)
        await dying.aclose()  # the process dies: no heartbeat, no release
        started = time.monotonic()
        while True:
            try:
                taken = await survivor.claim(account, "k2", "fp", "req_2")
                break
            except errors.Conflict:
                assert time.monotonic() - started < 10 * LEASE_S, "claim never taken over"
                await asyncio.sleep(LEASE_S / 10)
        assert isinstance(taken, Claim) and taken.token != claim.token
        # The presumed-dead request cannot overwrite its successor's row.
        await dying.complete(claim, status=200, body={"late": 1}, headers={})
        await survivor.complete(taken, status=200, body={"new": 1}, headers={})
        replay = await survivor.claim(account, "k2", "fp", "req_3")
        assert isinstance(replay, Replay) and replay.body == {"new": 1}
        await survivor.aclose()

    run_with_db(database_url, body)


@pytest.mark.postgres
def test_an_answer_given_during_an_outage_is_stored_once_the_database_returns(
    pg_database_url: str, pg_proxy: TcpProxy
) -> None:
    """An answer stored while the database was out is stored once it returns (the close is retried), so
    the client's retry replays the answer it paid for instead of running again."""

    async def body() -> None:
        db = await open_database(
            through(pg_database_url, pg_proxy), connect_timeout_s=1, pool_timeout_s=1, statement_timeout_s=2
        )
        try:
            account = (await Ledger(db).create_account("outage", 1000)).id
            store = _store(db)
            claim = await store.claim(account, "k3", "fp", "req_1")
            assert isinstance(claim, Claim)
            pg_proxy.cut()
            await store.complete(claim, status=200, body={"paid": 1}, headers={})  # never raises
            await asyncio.sleep(3 * LEASE_S)  # the outage outlasts the lease
            pg_proxy.restore()
            started = time.monotonic()
            while await _status(db, account, "k3") != "completed":  # stored by the retrying close
                assert time.monotonic() - started < 10, "the answer was never stored"
                await asyncio.sleep(LEASE_S / 10)
            replay = await _store(db).claim(account, "k3", "fp", "req_2")
            assert isinstance(replay, Replay) and replay.body == {"paid": 1}
            await store.aclose()
        finally:
            await db.aclose()

    run(body())
