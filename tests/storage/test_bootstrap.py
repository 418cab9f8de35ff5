"""The first start's bootstrap on real SQLite and PostgreSQL: one account and one key, however many
replicas run it at once, including when `default` was created by hand and waits for its key."""

from __future__ import annotations

import asyncio

from sqlalchemy import func, select

from tokentill.billing.ledger import Ledger
from tokentill.bootstrap import bootstrap
from tokentill.storage import Database, open_database
from tokentill.storage.schema import accounts, api_keys, ledger

REPLICAS = 6


async def _together(url: str, credits: int) -> list[object]:
    """`bootstrap` from REPLICAS databases (own engines and pools: like replicas), started at once."""
    dbs = await asyncio.gather(*(open_database(url, create=True) for _ in range(REPLICAS)))
    try:
        return list(await asyncio.gather(*(bootstrap(db, credits) for db in dbs)))
    finally:
        await asyncio.gather(*(db.aclose() for db in dbs))


async def _counts(db: Database) -> tuple[int, int, int, int]:
    async with db.read() as conn:
        n_accounts = (await conn.execute(select(func.count()).select_from(accounts))).scalar_one()
        n_keys = (await conn.execute(select(func.count()).select_from(api_keys))).scalar_one()
        n_rows = (await conn.execute(select(func.count()).select_from(ledger))).scalar_one()
        balance = (await conn.execute(select(func.sum(accounts.c.balance)))).scalar_one()
    return n_accounts, n_keys, n_rows, balance


def test_replicas_bootstrap_an_empty_database_once(database_url: str) -> None:
    async def main() -> None:
        results = await _together(database_url, 10_000_000)
        created = [r for r in results if r is not None]
        assert len(created) == 1, results
        db = await open_database(database_url)
        try:
            assert await _counts(db) == (1, 1, 1, 10_000_000)
            again = await bootstrap(db, 10_000_000)  # a later start: nothing more
            assert again is None and await _counts(db) == (1, 1, 1, 10_000_000)
        finally:
            await db.aclose()

    asyncio.run(main())


def test_replicas_give_a_keyless_default_one_key(database_url: str) -> None:
    """`default` made by hand before the first start, then replicas start together: one key, its balance."""

    async def main() -> None:
        db = await open_database(database_url, create=True)
        try:
            await Ledger(db).create_account("default", 3_000_000)
        finally:
            await db.aclose()
        results = await _together(database_url, 10_000_000)
        created = [r for r in results if r is not None]
        assert len(created) == 1 and getattr(created[0], "balance", None) == 3_000_000, results
        db = await open_database(database_url)
        try:
            assert await _counts(db) == (1, 1, 1, 3_000_000)
        finally:
            await db.aclose()

    asyncio.run(main())


def test_no_bootstrap_beside_other_accounts(database_url: str) -> None:
    async def main() -> None:
        db = await open_database(database_url, create=True)
        try:
            await Ledger(db).create_account("default", 0)
            await Ledger(db).create_account("team", 0)
            assert await bootstrap(db, 10_000_000) is None
            assert await _counts(db) == (2, 0, 0, 0)
        finally:
            await db.aclose()

    asyncio.run(main())
