"""Credit holds + settlements per second straight against the billing service: one request at a time per
transaction (`Ledger`) against group commit (`GroupCommit`), same run, same database.

Each simulated request is what a chat request does to the books: `reserve` (balance check, hold row,
ledger row), then `settle` (close the hold, release + charge ledger rows, usage row, hourly bucket).
`--concurrency` tasks run requests back to back on ONE account (the hot row of a customer with many
concurrent requests) or, with `--accounts N`, spread over N accounts. Printed per row: requests/s, this
process's CPU ms per request (`time.process_time`: the event loop plus aiosqlite's thread; PostgreSQL's
own server CPU is not in it), p50/p99 of one request's reserve+settle latency, the mean batch size, and
the group/direct ratios. The two modes alternate for `--rounds` rounds (the median is printed), and every
row ends with the ledger invariant checked (sum of ledger rows = balance, no open hold, one usage row per
request).

    .venv/bin/python bench/ledger_throughput.py                       # SQLite file in a temp folder
    .venv/bin/python bench/ledger_throughput.py --pg-url postgresql://postgres@127.0.0.1:5432/postgres
    .venv/bin/python bench/ledger_throughput.py --profile /tmp/ledger.prof   # cProfile of everything

With `--pg-url` a fresh database is created on that server and dropped after.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import secrets
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import asyncpg
from sqlalchemy import func, select

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from tokentill.billing.group_commit import GroupCommit, HoldBook  # noqa: E402
from tokentill.billing.ledger import Ledger, UsageRecord  # noqa: E402
from tokentill.storage import Database, open_database  # noqa: E402
from tokentill.storage.schema import usage  # noqa: E402

HOLD = 10_000  # µcr held per request
COST = 3_000  # µcr charged per request


@dataclass
class Row:
    rps: float
    cpu_ms: float
    p50_ms: float
    p99_ms: float
    batch: float


async def _one_row(db: Database, mode: str, concurrency: int, requests: int, accounts: list[int]) -> Row:
    ledger = Ledger(db)
    group = GroupCommit(ledger, db) if mode == "group" else None
    book: HoldBook = group or ledger
    tag = secrets.token_hex(4)
    latencies: list[float] = []
    left = requests

    async def worker(w: int) -> None:
        nonlocal left
        n = 0
        while left > 0:
            left -= 1
            n += 1
            request_id = f"{tag}-{w}-{n}"
            account = accounts[(w + n) % len(accounts)]
            started = time.perf_counter()
            hold = await book.reserve(
                account_id=account, key_id=None, request_id=request_id, amount=HOLD, ttl_s=600
            )
            record = UsageRecord(
                request_id=request_id, key_id=None, model="bench", prompt_tokens=20, completion_tokens=40
            )
            await book.settle(hold, cost=COST, usage=record)
            latencies.append(time.perf_counter() - started)

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    batch = 1.0
    if group is not None:
        batch = group.ops / group.batches
        await group.aclose()
    latencies.sort()
    return Row(
        rps=requests / wall,
        cpu_ms=cpu * 1000 / requests,
        p50_ms=latencies[len(latencies) // 2] * 1000,
        p99_ms=latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000,
        batch=batch,
    )


async def _check_books(db: Database, accounts: list[int], expected_usage: int) -> None:
    ledger = Ledger(db)
    for account in accounts:
        audit = await ledger.audit(account)
        assert audit.consistent and audit.open_holds == 0, audit
    async with db.read() as conn:
        rows = (await conn.execute(select(func.count()).select_from(usage))).scalar_one()
    assert rows == expected_usage, (rows, expected_usage)


async def _bench(url: str, args: argparse.Namespace) -> None:
    db = await open_database(url)
    try:
        ledger = Ledger(db)
        tag = secrets.token_hex(3)
        accounts = [
            (await ledger.create_account(f"bench-{tag}-{i}", 10**15)).id for i in range(args.accounts)
        ]
        await _one_row(db, "direct", 4, 50, accounts)  # warm the pool and the statement cache
        await _one_row(db, "group", 4, 50, accounts)
        done = 100
        print(f"database: {db.dialect}; accounts: {args.accounts}; requests per row: {args.requests}")
        print(f"load average before: {os.getloadavg()}")
        header = f"{'conc':>4} {'mode':>6} {'req/s':>8} {'cpu ms/req':>10} "
        header += f"{'p50 ms':>8} {'p99 ms':>8} {'batch':>6}"
        print(header)
        for concurrency in args.concurrency:
            results: dict[str, list[Row]] = {"direct": [], "group": []}
            for _ in range(args.rounds):
                for mode in ("direct", "group"):
                    results[mode].append(await _one_row(db, mode, concurrency, args.requests, accounts))
                    done += args.requests
            median = {
                mode: Row(*(statistics.median(getattr(r, f) for r in rows) for f in Row.__dataclass_fields__))
                for mode, rows in results.items()
            }
            for mode, row in median.items():
                print(
                    f"{concurrency:>4} {mode:>6} {row.rps:>8.0f} {row.cpu_ms:>10.3f} {row.p50_ms:>8.2f} "
                    f"{row.p99_ms:>8.2f} {row.batch:>6.1f}"
                )
            d, g = median["direct"], median["group"]
            print(
                f"{concurrency:>4} {'ratio':>6} {g.rps / d.rps:>7.2f}× {g.cpu_ms / d.cpu_ms:>9.2f}× "
                f"{g.p50_ms / d.p50_ms:>7.2f}× {g.p99_ms / d.p99_ms:>7.2f}×   (group / direct)"
            )
        await _check_books(db, accounts, done)
        print(f"books: consistent on {len(accounts)} account(s), {done} usage rows, no open hold")
        print(f"load average after: {os.getloadavg()}")
    finally:
        await db.aclose()


async def _main(args: argparse.Namespace) -> None:
    if not args.pg_url:
        with tempfile.TemporaryDirectory() as folder:
            await _bench(f"sqlite+aiosqlite:///{folder}/bench.db", args)
        return
    name = f"tt_ledger_bench_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(args.pg_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        base = args.pg_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
        await _bench(f"{base}/{name}", args)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pg-url", help="a PostgreSQL server (postgresql://...); default: a SQLite file")
    parser.add_argument("--requests", type=int, default=1000, help="requests per row")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--accounts", type=int, default=1, help="1: every request on one hot account")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians printed")
    parser.add_argument("--profile", help="write a cProfile of the whole run to this file")
    args = parser.parse_args()
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        asyncio.run(_main(args))
        profiler.disable()
        profiler.dump_stats(args.profile)
    else:
        asyncio.run(_main(args))


if __name__ == "__main__":
    main()
