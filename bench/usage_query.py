"""The console's 30-day per-day-per-model chart for one account, at 1,000,000 usage rows, on PostgreSQL.

Creates a fresh database on the server at --pg-url, migrates it, and seeds `--rows` usage rows with ONE
bulk `INSERT ... SELECT generate_series` (by default all of them for the charted account, spread evenly
over the last `--days` days, 3 models, 4 keys: the worst case for that account). A bulk insert bypasses
settlement, which is what keeps `usage_hourly` in step, so the rollup is then filled with one
`INSERT ... SELECT ... GROUP BY` (the 0003 migration's statement), timed. Then, in the same run:

* rollup: `UsageReports.usage(account, last 30 days, group_by=("day", "model"))`, the call behind
  `GET /v1/usage?group_by=day,model` and the console's chart;
* raw:    the same sums straight from `usage` (GROUP BY day, model over the account's 30 days), with the
  indexes the schema has, the baseline the rollup replaces;
* raw+ix: the raw query again after adding an `(account_id, created_at)` index to `usage`.

Each is run `--runs` times after 2 warm-up runs; the table gives min / median / p95 and the median's ratio to
the rollup's. The rollup's answer is checked to equal the raw answer exactly. The database is dropped after.

    .venv/bin/python bench/usage_query.py [--pg-url postgresql://postgres@127.0.0.1:5432/postgres]
        [--rows 1000000] [--days 60] [--accounts 1] [--runs 20]
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy import text

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from tokentill.billing.ledger import Ledger  # noqa: E402
from tokentill.billing.reports import UsageQuery, UsageReports  # noqa: E402
from tokentill.storage import Database, open_database  # noqa: E402

SEED = """
INSERT INTO usage (request_id, account_id, key_id, model, prompt_tokens, completion_tokens, reasoning_tokens,
                   cached_tokens, image_tokens, cost, status, latency_ms, estimated, created_at)
SELECT 'bench-' || g,
       :first_account + g % :accounts,
       (ARRAY['key0001', 'key0002', 'key0003', 'key0004'])[1 + g % 4],
       (ARRAY['o1-preview', 'o1-mini', 'vision'])[1 + g % 3],
       50 + g % 200, 100 + g % 300, g % 80, g % 7, (g % 5) * 10,
       (50 + g % 200) * 15 + (100 + g % 300) * 60,
       CASE WHEN g % 50 = 0 THEN 499 ELSE 200 END,
       100 + g % 900, false,
       now() - (g::float8 / :rows) * (:days * interval '1 day')
FROM generate_series(1, :rows) AS g
"""
ROLLUP = """
INSERT INTO usage_hourly (account_id, hour, model, key_id, requests, prompt_tokens, completion_tokens,
                          reasoning_tokens, cached_tokens, image_tokens, cost)
SELECT account_id, date_trunc('hour', created_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC', model,
       coalesce(key_id, ''), count(*), sum(prompt_tokens), sum(completion_tokens), sum(reasoning_tokens),
       sum(cached_tokens), sum(image_tokens), sum(cost)
FROM usage GROUP BY 1, 2, 3, 4
"""
RAW = """
SELECT to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD') AS day, model, count(*) AS requests,
       sum(prompt_tokens), sum(completion_tokens), sum(reasoning_tokens), sum(cached_tokens),
       sum(image_tokens), sum(cost)
FROM usage WHERE account_id = :account AND created_at >= :since AND created_at < :until
GROUP BY 1, 2 ORDER BY 1, 2
"""


def _plain(url: str, database: str | None = None) -> str:
    base, _, name = url.rpartition("/")
    return f"{base}/{database or name}".replace("postgresql+asyncpg://", "postgresql://")


async def _timed(label: str, fn: Callable[[], Awaitable[Any]]) -> float:
    start = time.perf_counter()
    await fn()
    elapsed = time.perf_counter() - start
    print(f"  {label}: {elapsed:.2f} s")
    return elapsed


async def _runs(fn: Callable[[], Awaitable[Any]], runs: int) -> list[float]:
    for _ in range(2):
        await fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        await fn()
        times.append((time.perf_counter() - start) * 1000)
    return times


async def _bench(db: Database, args: argparse.Namespace) -> None:
    book = Ledger(db)
    first = (await book.create_account("charted")).id
    for i in range(1, args.accounts):
        await book.create_account(f"other-{i}")
    params = {"first_account": first, "accounts": args.accounts, "rows": args.rows, "days": args.days}
    print(f"seeding {args.rows:,} usage rows over {args.days} days for {args.accounts} account(s):")

    async def seed() -> None:
        async with db.begin() as conn:
            await conn.execute(text(SEED), params)

    async def rollup() -> None:
        async with db.begin() as conn:
            await conn.execute(text(ROLLUP))

    async def analyze() -> None:
        async with db.engine.connect() as conn:
            await (await conn.execution_options(isolation_level="AUTOCOMMIT")).execute(text("ANALYZE"))

    await _timed("one bulk INSERT ... SELECT generate_series", seed)
    await _timed("fill usage_hourly (one INSERT ... SELECT ... GROUP BY)", rollup)
    await analyze()
    async with db.read() as conn:
        hourly = (await conn.execute(text("SELECT count(*) FROM usage_hourly"))).scalar_one()
    print(f"  usage_hourly rows: {hourly:,}")

    today = datetime.now(UTC).date()
    query = UsageQuery(start=today - timedelta(days=29), end=today, group_by=("day", "model"))
    since, until = query.window
    reports = UsageReports(db)

    async def via_rollup() -> list[tuple[Any, ...]]:
        buckets, _ = await reports.usage(first, query)
        return [(b.group["day"], b.group["model"], *vars(b.totals).values()) for b in buckets]

    async def via_raw() -> list[tuple[Any, ...]]:
        async with db.read() as conn:
            rows = (await conn.execute(text(RAW), {"account": first, "since": since, "until": until})).all()
        return [tuple(int(v) if not isinstance(v, str) else v for v in row) for row in rows]

    charted = await via_rollup()
    assert charted == await via_raw(), "the rollup disagrees with the raw rows"
    in_window = sum(row[2] for row in charted)
    print(f"chart: {len(charted)} (day, model) rows summing {in_window:,} requests; rollup == raw: yes")

    results = {"rollup": await _runs(via_rollup, args.runs), "raw": await _runs(via_raw, args.runs)}
    await _timed(
        "CREATE INDEX usage (account_id, created_at)",
        lambda: _execute(db, "CREATE INDEX bench_usage_account_created ON usage (account_id, created_at)"),
    )
    await analyze()
    results["raw+ix"] = await _runs(via_raw, args.runs)

    base = statistics.median(results["rollup"])
    print(f"\n30-day chart, group_by=day,model, one account, {args.runs} runs (ms):")
    print(f"{'query':<8} {'min':>9} {'median':>9} {'p95':>9} {'median / rollup':>16}")
    for name, times in results.items():
        p95 = statistics.quantiles(times, n=20)[-1] if len(times) >= 2 else times[0]
        median = statistics.median(times)
        print(f"{name:<8} {min(times):>9.1f} {median:>9.1f} {p95:>9.1f} {median / base:>15.1f}x")


async def _execute(db: Database, sql: str) -> None:
    async with db.begin() as conn:
        await conn.execute(text(sql))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--days", type=int, default=60)
    parser.add_argument("--accounts", type=int, default=1, help="Accounts the rows are spread over.")
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    name = f"tokentill_bench_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(_plain(args.pg_url))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        db = await open_database(_plain(args.pg_url, name).replace("postgresql://", "postgresql+asyncpg://"))
        try:
            await _bench(db, args)
        finally:
            await db.aclose()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


if __name__ == "__main__":
    asyncio.run(main())
