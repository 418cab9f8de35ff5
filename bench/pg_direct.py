"""One statement on PostgreSQL three ways: through the engine, through `Database.fetch_row`, bare asyncpg.

    .venv/bin/python bench/pg_direct.py [--pg-url postgresql://postgres@127.0.0.1:5432/postgres] [-n 2000]

It works in a database of its own, created and dropped by the run. Each way runs the same one-row
statement `-n` times in a row (after 100 warm-ups), twice, alternating; printed: wall and this
process's CPU µs per statement, and the ratio to bare asyncpg on one connection (the baseline, measured
in the same run):
  - `engine txn`: `Database.begin()` + `execute(text(...))`: checkout, BEGIN, the statement, COMMIT;
  - `fetch_row`: `Database.fetch_row` (autocommit on a raw connection of `storage.pg_direct`);
  - `bare`: `asyncpg.Connection.fetchrow` on one connection.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import secrets
import time
from collections.abc import Awaitable, Callable

import asyncpg
from sqlalchemy import text

from tokentill.storage.db import open_database
from tokentill.storage.pg_direct import Statement


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def main(server: str, n: int) -> None:
    name = f"tokentill_bench_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(server)
    await admin.execute(f"CREATE DATABASE {name}")
    try:
        await _measure(server.rsplit("/", 1)[0] + "/" + name, n)
    finally:
        await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
        await admin.close()


async def _measure(url: str, n: int) -> None:
    db = await open_database(url.replace("postgresql://", "postgresql+asyncpg://", 1))
    bare = await asyncpg.connect(url)
    statement = Statement("SELECT CAST(:x AS integer) + 1 AS y")
    engine_sql = text("SELECT CAST(:x AS integer) + 1 AS y")

    async def engine_txn() -> object:
        async with db.begin() as conn:
            return (await conn.execute(engine_sql, {"x": 1})).first()

    async def fetch_row() -> object:
        return await db.fetch_row(statement, {"x": 1})

    async def bare_fetch() -> object:
        return await bare.fetchrow(statement.sql, 1)

    ways: dict[str, Callable[[], Awaitable[object]]] = {
        "engine txn": engine_txn,
        "fetch_row": fetch_row,
        "bare": bare_fetch,
    }
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in ways}
    for _ in range(2):
        for name, way in ways.items():
            for _ in range(100):
                await way()
            wall, cpu = time.perf_counter(), _cpu()
            for _ in range(n):
                await way()
            results[name].append(((time.perf_counter() - wall) / n * 1e6, (_cpu() - cpu) / n * 1e6))
    base = min(cpu for _, cpu in results["bare"])
    print(f"{n} statements per way and round, 2 rounds (best shown)")
    print(f"{'way':<12} {'wall µs':>9} {'cpu µs':>8} {'cpu / bare':>11}")
    for name, runs in results.items():
        wall, cpu = min(runs, key=lambda r: r[1])
        print(f"{name:<12} {wall:9.0f} {cpu:8.0f} {cpu / base:11.2f}")
    await bare.close()
    await db.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument(
        "--pg-url", default="postgresql://postgres@127.0.0.1:5432/postgres", help="a server's admin database"
    )
    parser.add_argument("-n", type=int, default=2000)
    args = parser.parse_args()
    asyncio.run(main(args.pg_url, args.n))
