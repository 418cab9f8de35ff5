"""Settlements through a database outage (issue 15, item 2): spooled durably, retried until they commit,
replayed by the next process after a crash, never released by the sweeper while pending, never billed twice.

The outage is real: PostgreSQL behind a TCP proxy that the test cuts. On SQLite (which cannot be cut) the
replay of a dead process's spool and its idempotence are checked."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

from tests._services import run, run_with_db
from tests.billing.test_ledger import _assert_books, _count, _reserve, _usage
from tests.faults.proxy import TcpProxy, through
from tokentill.billing.ledger import Ledger
from tokentill.billing.settlement import Settlements
from tokentill.storage import Database
from tokentill.storage.db import open_database
from tokentill.storage.schema import usage, utcnow
from tokentill.storage.spool import Spool


async def _until(condition: Callable[[], bool], timeout_s: float) -> None:
    """Wait for `condition()` (the retry backoff is at most 5 s a step, so a few steps suffice)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.05)


def _spool(folder: Path) -> Spool:
    spool = Spool(folder)
    spool.open()
    return spool


def test_spool_adopts_only_dead_files_and_skips_torn_lines(tmp_path: Path) -> None:
    live = _spool(tmp_path)
    live.append({"id": "live-1", "x": 1})
    live_path = live.path
    assert live_path is not None
    dead = tmp_path / "123-dead.jsonl"
    dead.write_text(
        '{"id":"a","n":1}\n{"id":"b","n":2}\n{"id":"a","done":true}\n{"id":"c","n":', encoding="utf-8"
    )
    mine = _spool(tmp_path)
    adopted = mine.adopt()
    assert adopted == [{"id": "b", "n": 2}]  # "a" was done, "c" torn; the live file is not touched
    assert not dead.exists()
    assert live_path.exists()
    assert mine.pending() == [{"id": "b", "n": 2}]
    mine.done("b")
    own = mine.path
    assert own is not None and own.stat().st_size == 0  # emptied once nothing is pending
    mine.close()
    assert not own.exists()  # closed with nothing pending: deleted
    live.close()
    assert [p.name for p in tmp_path.iterdir()] == [live_path.name]  # pending: kept for the next start


def test_replay_of_a_dead_process_bills_once(database_url: str, tmp_path: Path) -> None:
    """What a crashed process spooled is settled by the next start; a second replay (or a replay of a
    settlement that had committed) changes nothing."""

    async def body(db: Database) -> None:
        book = Ledger(db)
        acct = await book.create_account("spooled", 10_000)
        hold = await _reserve(book, acct, "req_spooled", 3_000)
        settled = await _reserve(book, acct, "req_settled", 1_000)
        await book.settle(settled, cost=400, usage=_usage("req_settled"))
        crashed = _spool(tmp_path)  # a process that spooled two settlements and died
        for h, cost in ((hold, 1_200), (settled, 400)):
            crashed.append(
                {
                    "op": "settle",
                    "id": h.id,
                    "account_id": h.account_id,
                    "key_id": h.key_id,
                    "amount": h.amount,
                    "expires_at": h.expires_at.isoformat(),
                    "cost": cost,
                    "usage": json.loads(json.dumps(_usage(h.id).__dict__)),
                }
            )
        crashed.close()  # pending records: the file stays for the next start

        for _ in range(2):
            settlements = Settlements(book, _spool(tmp_path), retry_s=5)
            await settlements.replay()
            assert settlements.pending == set()
            await settlements.aclose()
        assert await book.balance(acct.id) == 10_000 - 1_200 - 400
        assert await _count(db, usage) == 2  # one usage row each, never two
        await _assert_books(book, acct)

    run_with_db(database_url, body)


@pytest.mark.postgres
def test_outage_spools_retries_and_bills_once(
    pg_database_url: str, pg_proxy: TcpProxy, tmp_path: Path
) -> None:
    async def body() -> None:
        db = await open_database(through(pg_database_url, pg_proxy), connect_timeout_s=1, pool_timeout_s=1)
        try:
            book = Ledger(db)
            acct = await book.create_account("outage", 10_000)
            hold = await _reserve(book, acct, "req_outage", 3_000, ttl_s=1)
            spool = _spool(tmp_path)
            settlements = Settlements(book, spool, retry_s=60)

            pg_proxy.cut()
            assert await settlements.settle(hold, cost=1_200, usage=_usage(hold.id)) is None
            assert settlements.pending == {hold.id}
            spooled = [json.loads(line) for line in Path(str(spool.path)).read_text().splitlines()]
            assert [r["id"] for r in spooled] == [hold.id]  # durable before settle() returned

            # The hold is past its TTL when the database returns: the sweeper must leave it alone.
            future = utcnow() + timedelta(hours=1)
            pg_proxy.restore()
            assert await book.release_expired(future, skip=settlements.pending | {hold.id}) == 0
            await _until(lambda: not settlements.pending, timeout_s=30)
            assert await book.release_expired(future) == 0  # settled: nothing left to release
            assert await book.balance(acct.id) == 10_000 - 1_200
            assert await _count(db, usage) == 1
            # A retry whose commit had gone through (lost acknowledgement) is a no-op.
            assert await settlements.settle(hold, cost=1_200, usage=_usage(hold.id)) == 10_000 - 1_200
            assert await _count(db, usage) == 1
            await _assert_books(book, acct)
            await settlements.aclose()
        finally:
            await db.aclose()

    run(body())


@pytest.mark.postgres
def test_sweeper_skips_only_pending_holds(pg_database_url: str) -> None:
    async def body(db: Database) -> None:
        book = Ledger(db)
        acct = await book.create_account("sweep", 10_000)
        pending = await _reserve(book, acct, "req_pending", 1_000, ttl_s=1)
        dead = await _reserve(book, acct, "req_dead", 2_000, ttl_s=1)
        future = utcnow() + timedelta(hours=1)
        assert await book.release_expired(future, skip={pending.id}) == 1
        assert await book.balance(acct.id) == 10_000 - 1_000
        assert await book.settle(pending, cost=500, usage=_usage(pending.id)) == 10_000 - 500
        assert dead.id != pending.id
        await _assert_books(book, acct)

    run_with_db(pg_database_url, body)


def test_spool_compacts_to_the_pending_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tokentill.storage.spool.COMPACT_BYTES", 2000)
    spool = _spool(tmp_path)
    spool.append({"id": "keep", "pad": "x" * 100})
    for i in range(40):
        spool.append({"id": f"r{i}", "pad": "x" * 100})
        spool.done(f"r{i}")
    path = spool.path
    assert path is not None and path.stat().st_size < 2000  # rewritten, the same path
    spool.close()
    assert len(path.read_text().splitlines()) < 10  # not 81 lines: the finished ones were dropped
    again = _spool(tmp_path)
    assert again.adopt() == [{"id": "keep", "pad": "x" * 100}]
    again.close()


@pytest.mark.postgres
def test_settlement_is_spooled_before_its_first_attempt(
    pg_database_url: str, pg_proxy: TcpProxy, tmp_path: Path
) -> None:
    """A process killed while the first attempt waits on a partitioned database loses nothing: the
    settlement was written before the attempt, and the next start replays it (billed once)."""

    async def body() -> None:
        url = through(pg_database_url, pg_proxy)
        db = await open_database(url, connect_timeout_s=30, pool_timeout_s=30, statement_timeout_s=30)
        try:
            book = Ledger(db)
            acct = await book.create_account("killed", 10_000)
            hold = await _reserve(book, acct, "req_killed", 3_000)
            spool = _spool(tmp_path)
            settlements = Settlements(book, spool, retry_s=60)
            pg_proxy.hang()
            attempt = asyncio.create_task(settlements.settle(hold, cost=1_000, usage=_usage(hold.id)))
            await _until(lambda: bool(spool.path and spool.path.read_text()), timeout_s=10)
            attempt.cancel()  # the process dies mid-attempt
            with pytest.raises(asyncio.CancelledError):
                await attempt
            spool.close()  # what the kernel keeps of a killed process's file
            pg_proxy.restore()
            await db.engine.dispose()
            successor = Settlements(book, _spool(tmp_path), retry_s=60)
            assert await successor.replay() == 1
            assert successor.pending == set()
            assert await book.balance(acct.id) == 10_000 - 1_000
            assert await _count(db, usage) == 1
            await _assert_books(book, acct)
            await successor.aclose()
        finally:
            await db.aclose()

    run(body())


def test_a_spooled_settlement_that_cannot_apply_does_not_stop_the_start(
    sqlite_database_url: str, tmp_path: Path
) -> None:
    async def body(db: Database) -> None:
        book = Ledger(db)
        stale = _spool(tmp_path)  # a spool from another database: its account does not exist here
        stale.append(
            {
                "op": "release",
                "id": "req_elsewhere",
                "account_id": 999,
                "key_id": None,
                "amount": 5,
                "expires_at": utcnow().isoformat(),
                "usage": None,
            }
        )
        stale.close()
        settlements = Settlements(book, _spool(tmp_path), retry_s=5)
        assert await settlements.replay() == 1
        assert settlements.pending == set()
        await settlements.aclose()

    run_with_db(sqlite_database_url, body)
