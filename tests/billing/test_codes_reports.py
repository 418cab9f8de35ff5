"""Redemption codes, the hourly usage rollup and shared secrets, on SQLite and PostgreSQL.

The rollup must equal the raw usage rows summed, exactly: after settlements (including a repeated
settle and a release with usage), and after the 0003 migration fills it from rows written before it.
Redeeming must be race-safe across engines: of two redeemers of one code exactly one wins.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from alembic import command
from sqlalchemy import insert, select

from tests._services import run, run_with_db
from tokentill.billing.codes import RedemptionCodes, generate_code, parse_code
from tokentill.billing.ledger import Ledger, UsageRecord
from tokentill.billing.reports import UsageQuery, UsageReports, UsageTotals
from tokentill.errors import CodeAlreadyRedeemed
from tokentill.storage import Database, open_database
from tokentill.storage.db import _alembic_config, _make_engine
from tokentill.storage.schema import USAGE_COUNTERS, accounts, usage, usage_hourly
from tokentill.storage.secrets import get_or_create_secret

Bucket = tuple[int, datetime, str, str]


async def _raw_hourly(db: Database) -> dict[Bucket, tuple[int, ...]]:
    """The usage rows summed per (account, hour, model, key) in Python: the rollup's definition."""
    sums: dict[Bucket, list[int]] = defaultdict(lambda: [0] * len(USAGE_COUNTERS))
    async with db.read() as conn:
        for r in (await conn.execute(select(usage))).all():
            hour = r.created_at.replace(minute=0, second=0, microsecond=0)
            bucket = sums[(r.account_id, hour, r.model, r.key_id or "")]
            for i, name in enumerate(USAGE_COUNTERS):
                bucket[i] += 1 if name == "requests" else int(getattr(r, name))
    return {k: tuple(v) for k, v in sums.items()}


async def _rollup(db: Database) -> dict[Bucket, tuple[int, ...]]:
    async with db.read() as conn:
        rows = (await conn.execute(select(usage_hourly))).all()
    return {
        (r.account_id, r.hour, r.model, r.key_id): tuple(int(getattr(r, n)) for n in USAGE_COUNTERS)
        for r in rows
    }


def _record(i: int, model: str, key: str | None) -> UsageRecord:
    return UsageRecord(
        request_id=f"req-{i}",
        key_id=key,
        model=model,
        prompt_tokens=10 + i,
        completion_tokens=20 + i,
        reasoning_tokens=i,
        cached_tokens=i % 3,
        image_tokens=i % 2,
        status=200 if i % 4 else 499,
        latency_ms=i,
    )


def test_rollup_equals_raw_rows_after_settlements(database_url: str) -> None:
    async def body(db: Database) -> None:
        book = Ledger(db)
        a = await book.create_account("a", 10_000_000)
        b = await book.create_account("b", 10_000_000)
        for i in range(12):
            account = a if i % 3 else b
            model, key = ("m1", "k1") if i % 2 else ("m2", None)
            hold = await book.reserve(
                account_id=account.id, key_id=key, request_id=f"req-{i}", amount=5_000, ttl_s=60
            )
            if i % 5 == 0:
                await book.release(hold, usage=_record(i, model, key))
            else:
                await book.settle(hold, cost=100 + i, usage=_record(i, model, key))
                await book.settle(hold, cost=100 + i, usage=_record(i, model, key))  # a no-op
        raw = await _raw_hourly(db)
        assert raw and await _rollup(db) == raw
        # The report over the rollup gives the same totals as the raw rows.
        today = datetime.now(UTC).date()
        reports = UsageReports(db)
        query = UsageQuery(start=today - timedelta(days=1), end=today, group_by=("model",))
        buckets, total = await reports.usage(a.id, query)
        a_rows = [v for k, v in raw.items() if k[0] == a.id]
        assert total == UsageTotals(*(sum(col) for col in zip(*a_rows, strict=True)))
        assert sum(bucket.totals.requests for bucket in buckets) == total.requests == 8

    run_with_db(database_url, body)


# Rows at hour and day edges, written before revision 0003 existed.
EDGES = [
    datetime(2026, 11, 30, 23, 59, 59, 999999, tzinfo=UTC),
    datetime(2026, 12, 1, 0, 0, 0, tzinfo=UTC),
    datetime(2026, 12, 1, 0, 30, 0, tzinfo=UTC),
    datetime(2026, 12, 1, 13, 5, 7, 123, tzinfo=UTC),
    datetime(2026, 12, 2, 9, 0, 0, tzinfo=UTC),
]


def test_migration_fills_the_rollup_from_existing_rows(database_url: str) -> None:
    async def main() -> None:
        engine = _make_engine(database_url)
        try:
            async with engine.begin() as conn:
                await conn.run_sync(lambda c: command.upgrade(_alembic_config(c), "0002"))
                account_id = (
                    await conn.execute(
                        insert(accounts)
                        .values(name="old", balance=0, created_at=EDGES[0])
                        .returning(accounts.c.id)
                    )
                ).scalar_one()
                await conn.execute(
                    insert(usage),
                    [
                        {
                            "request_id": f"old-{i}",
                            "account_id": account_id,
                            "key_id": None if i == 2 else "kold",
                            "model": "m" + str(i % 2),
                            "prompt_tokens": i + 1,
                            "completion_tokens": 2 * i,
                            "reasoning_tokens": i,
                            "cached_tokens": 1,
                            "image_tokens": 0,
                            "cost": 1000 * i + 7,
                            "status": 200,
                            "latency_ms": 5,
                            "estimated": False,
                            "created_at": when,
                        }
                        for i, when in enumerate(EDGES)
                    ],
                )
        finally:
            await engine.dispose()
        db = await open_database(database_url)  # migrates 0002 → head
        try:
            raw = await _raw_hourly(db)
            assert len(raw) == 5 and await _rollup(db) == raw
            reports = UsageReports(db)
            days, total = await reports.usage(
                account_id,
                UsageQuery(start=date(2026, 11, 30), end=date(2026, 12, 2), group_by=("day", "key")),
            )
            assert [(b.group["day"], b.group["key"], b.totals.requests) for b in days] == [
                ("2026-11-30", "kold", 1),
                ("2026-12-01", None, 1),
                ("2026-12-01", "kold", 2),
                ("2026-12-02", "kold", 1),
            ]
            assert total.cost == sum(1000 * i + 7 for i in range(5)) and total.prompt_tokens == 15
            hours, _ = await reports.usage(
                account_id, UsageQuery(start=date(2026, 12, 1), end=date(2026, 12, 1), group_by=("hour",))
            )
            assert [(b.group["hour"], b.totals.requests) for b in hours] == [
                ("2026-12-01T00:00:00Z", 2),
                ("2026-12-01T13:00:00Z", 1),
            ]
            everyone, _ = await reports.operator_usage(
                UsageQuery(start=date(2026, 12, 2), end=date(2026, 12, 2), group_by=("account", "model"))
            )
            assert [(b.group, b.totals.requests) for b in everyone] == [
                ({"account": "old", "model": "m0"}, 1)
            ]
        finally:
            await db.aclose()

    run(main())


@pytest.mark.parametrize("attempts", [12])
def test_concurrent_redeems_from_two_engines_exactly_one_wins(database_url: str, attempts: int) -> None:
    async def main() -> None:
        first, second = await open_database(database_url), await open_database(database_url)
        try:
            book = Ledger(first)
            a = await book.create_account("a", 0)
            b = await book.create_account("b", 5)
            made = await RedemptionCodes(first).create_codes(1_000_000, count=attempts)
            one, two = RedemptionCodes(second), RedemptionCodes(first)
            wins: dict[str, int] = {"a": 0, "b": 0}
            for code in made:
                results: list[Any] = await asyncio.gather(
                    one.redeem(a.id, "ka", code.code),
                    two.redeem(b.id, "kb", code.code),
                    return_exceptions=True,
                )
                won = [r for r in results if not isinstance(r, BaseException)]
                lost = [r for r in results if isinstance(r, BaseException)]
                assert len(won) == 1 and len(lost) == 1 and isinstance(lost[0], CodeAlreadyRedeemed), results
                wins["a" if results[0] is won[0] else "b"] += 1
            assert (await book.balance(a.id), await book.balance(b.id)) == (
                wins["a"] * 1_000_000,
                5 + wins["b"] * 1_000_000,
            )
            for account in (a, b):
                assert (await book.audit(account.id)).consistent
        finally:
            await first.aclose()
            await second.aclose()

    run(main())


def test_codes_have_160_bit_secrets_and_parse_strictly() -> None:
    code_id, secret, full = generate_code()
    assert len(secret) == 32 and len({generate_code()[2] for _ in range(100)}) == 100  # 32 × 5 bits
    assert parse_code(full) == (code_id, secret) == parse_code(f" {full.upper()}\n")
    for bad in (
        "",
        "ttc",
        f"tt-{code_id}-{secret}",
        f"ttc-{code_id}-{secret}x",
        f"ttc-{code_id}-{secret[:-1]}1",
    ):
        assert parse_code(bad) is None, bad


def test_get_or_create_secret_is_one_value_for_every_caller(database_url: str) -> None:
    async def main() -> None:
        dbs = [await open_database(database_url) for _ in range(3)]
        try:
            values = await asyncio.gather(*(get_or_create_secret(db, "console-cookie") for db in dbs * 3))
            assert len(set(values)) == 1 and len(values[0]) >= 43
            assert await get_or_create_secret(dbs[0], "other") != values[0]
            assert await get_or_create_secret(dbs[1], "console-cookie") == values[0]
        finally:
            for db in dbs:
                await db.aclose()

    run(main())
