"""Concurrency: many reservers, sweepers and settlers at once, across connections, engines and processes.

Each test runs on a SQLite file (several engines = several connections contending for the write lock)
and on PostgreSQL (many pooled connections, row locks).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from datetime import timedelta

from sqlalchemy import func, select

from tests._services import run, run_with_db, subprocess_env
from tokentill.billing.ledger import BalanceRefused, Hold, Ledger, UsageRecord
from tokentill.errors import InsufficientCredits
from tokentill.storage import Database, open_database
from tokentill.storage.schema import ledger, usage, utcnow

AMOUNT = 1_000
K = 7  # the account can pay for exactly K holds
ATTEMPTS = 20


async def _open_many(url: str, n: int) -> list[Database]:
    return [await open_database(url) for _ in range(n)]


async def _close_all(dbs: list[Database]) -> None:
    for db in dbs:
        await db.aclose()


async def _books_ok(book: Ledger, account_id: int) -> None:
    audit = await book.audit(account_id)
    assert audit.consistent, audit


def _usage(request_id: str) -> UsageRecord:
    return UsageRecord(request_id=request_id, key_id=None, model="m", prompt_tokens=1, completion_tokens=1)


def test_concurrent_reserve_exactly_k_succeed(database_url: str) -> None:
    async def main() -> None:
        dbs = await _open_many(database_url, 2)
        try:
            books = [Ledger(db) for db in dbs]
            acct = await books[0].create_account("racer", K * AMOUNT + AMOUNT - 1)
            lowest: list[int] = []
            done = asyncio.Event()

            async def watch() -> None:
                while not done.is_set():
                    lowest.append(await books[1].balance(acct.id))
                    await asyncio.sleep(0)

            async def attempt(i: int) -> bool:
                try:
                    await books[i % 2].reserve(
                        account_id=acct.id, key_id=None, request_id=f"r{i}", amount=AMOUNT, ttl_s=60
                    )
                except InsufficientCredits:
                    return False
                return True

            watcher = asyncio.create_task(watch())
            results = await asyncio.gather(*(attempt(i) for i in range(ATTEMPTS)))
            done.set()
            await watcher
            assert sum(results) == K
            assert min(lowest) >= 0
            assert await books[0].balance(acct.id) == AMOUNT - 1
            audit = await books[0].audit(acct.id)
            assert audit.open_holds == K * AMOUNT
            assert audit.consistent, audit
        finally:
            await _close_all(dbs)

    run(main())


_RESERVE_SCRIPT = """
import asyncio, sys
from tokentill.billing.ledger import Ledger
from tokentill.errors import InsufficientCredits
from tokentill.storage import open_database

async def main(url, account_id, tag):
    db = await open_database(url)
    ok = 0
    try:
        async def one(i):
            try:
                await Ledger(db).reserve(account_id=account_id, key_id=None, request_id=f"{tag}-{i}",
                                         amount=int(sys.argv[4]), ttl_s=60)
                return 1
            except InsufficientCredits:
                return 0
        ok = sum(await asyncio.gather(*(one(i) for i in range(5))))
    finally:
        await db.aclose()
    print(ok)

asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
"""


def test_concurrent_reserve_from_processes(database_url: str) -> None:
    async def setup(db: Database) -> int:
        return (await Ledger(db).create_account("multi", K * AMOUNT + AMOUNT - 1)).id

    account_id = run_with_db(database_url, setup)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RESERVE_SCRIPT, database_url, str(account_id), f"p{n}", str(AMOUNT)],
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for n in range(4)
    ]
    successes = 0
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
        successes += int(out.decode().strip())
    assert successes == K

    async def check(db: Database) -> None:
        book = Ledger(db)
        assert await book.balance(account_id) == AMOUNT - 1
        await _books_ok(book, account_id)

    run_with_db(database_url, check)


def test_two_sweepers_release_each_hold_once(database_url: str) -> None:
    async def main() -> None:
        dbs = await _open_many(database_url, 2)
        try:
            a, b = (Ledger(db) for db in dbs)
            acct = await a.create_account("swept", 20 * AMOUNT)
            for i in range(12):
                await a.reserve(account_id=acct.id, key_id=None, request_id=f"h{i}", amount=AMOUNT, ttl_s=1)
            later = utcnow() + timedelta(seconds=5)
            counts = await asyncio.gather(a.release_expired(later), b.release_expired(later))
            assert sum(counts) == 12
            assert await a.balance(acct.id) == 20 * AMOUNT
            async with dbs[0].read() as conn:
                releases = (
                    await conn.execute(
                        select(func.count()).select_from(ledger).where(ledger.c.kind == "release")
                    )
                ).scalar_one()
            assert releases == 12
            await _books_ok(a, acct.id)
        finally:
            await _close_all(dbs)

    run(main())


def test_settle_races_sweeper_and_itself(database_url: str) -> None:
    async def main() -> None:
        dbs = await _open_many(database_url, 2)
        try:
            a, b = (Ledger(db) for db in dbs)
            acct = await a.create_account("closer", 20 * AMOUNT)
            held: list[Hold] = [
                await a.reserve(account_id=acct.id, key_id=None, request_id=f"s{i}", amount=AMOUNT, ttl_s=1)
                for i in range(8)
            ]
            later = utcnow() + timedelta(seconds=5)
            jobs = [a.release_expired(later), b.release_expired(later)]
            for i, hold in enumerate(held):
                book = (a, b)[i % 2]
                jobs += [book.settle(hold, cost=300, usage=_usage(hold.id)) for _ in range(2)]
            await asyncio.gather(*jobs)
            # Whoever won each hold, every request is charged 300 exactly once and has one usage row.
            assert await a.balance(acct.id) == 20 * AMOUNT - 8 * 300
            async with dbs[0].read() as conn:
                assert (await conn.execute(select(func.count()).select_from(usage))).scalar_one() == 8
            audit = await a.audit(acct.id)
            assert (audit.open_holds, audit.settled_charges) == (0, 8 * 300)
            assert audit.consistent, audit
        finally:
            await _close_all(dbs)

    run(main())


def test_concurrent_debits_never_overdraw(database_url: str) -> None:
    """Debits from two engines at once: exactly as many succeed as the balance covers, never below zero."""

    async def main() -> None:
        dbs = await _open_many(database_url, 2)
        try:
            books = [Ledger(db) for db in dbs]
            acct = await books[0].create_account("debited", K * AMOUNT + AMOUNT - 1)

            async def attempt(i: int) -> bool:
                try:
                    await books[i % 2].debit("debited", AMOUNT, note=f"debit {i}")
                except BalanceRefused:
                    return False
                return True

            results = await asyncio.gather(*(attempt(i) for i in range(ATTEMPTS)))
            assert sum(results) == K
            assert await books[0].balance(acct.id) == AMOUNT - 1
            audit = await books[0].audit(acct.id)
            assert audit.adjustments == -K * AMOUNT and audit.consistent, audit
        finally:
            await _close_all(dbs)

    run(main())
