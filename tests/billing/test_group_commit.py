"""Group commit (`billing.group_commit`) on real SQLite and PostgreSQL: concurrent holds and settlements
batched into one transaction give the same money, rows and errors as `Ledger` one request at a time."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Awaitable
from datetime import timedelta

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from tests._services import run, run_with_db
from tests.faults.proxy import TcpProxy, through
from tokentill.billing.group_commit import GroupCommit
from tokentill.billing.ledger import Hold, KeyChanged, KeyTerms, Ledger, UsageRecord
from tokentill.errors import InsufficientCredits, ServiceUnavailable
from tokentill.storage import Database, open_database
from tokentill.storage.schema import USAGE_COUNTERS, holds, ledger, usage, usage_hourly

AMOUNT = 1_000
K = 7  # the account can pay for exactly K holds
ATTEMPTS = 24


def _usage(request_id: str, completion: int = 1) -> UsageRecord:
    return UsageRecord(
        request_id=request_id, key_id=None, model="m", prompt_tokens=2, completion_tokens=completion
    )


async def _check_books(db: Database) -> None:
    """Every account's audit is consistent and its ledger rows chain: each balance_after is the previous
    one plus the row's amount, in id order (what one-request-per-transaction would have written)."""
    book = Ledger(db)
    for account in await book.list_accounts():
        audit = await book.audit(account.id)
        assert audit.consistent, audit
    async with db.read() as conn:
        rows = (await conn.execute(select(ledger).order_by(ledger.c.id))).all()
        usage_rows = (await conn.execute(select(usage))).all()
        buckets = (await conn.execute(select(usage_hourly))).all()
    running: dict[int, int] = defaultdict(int)
    for row in rows:
        running[row.account_id] += row.amount
        assert row.balance_after == running[row.account_id], row
        assert row.balance_after >= 0
    for name in USAGE_COUNTERS[1:]:  # "requests" counts the rows
        assert sum(getattr(b, name) for b in buckets) == sum(getattr(u, name) for u in usage_rows), name
    assert sum(b.requests for b in buckets) == len(usage_rows)


def test_concurrent_holds_on_one_account_exactly_k_in_few_batches(database_url: str) -> None:
    async def body(db: Database) -> None:
        book = Ledger(db)
        account = await book.create_account("hot", K * AMOUNT + AMOUNT - 1)
        group = GroupCommit(book, db)

        async def attempt(i: int) -> Hold | None:
            try:
                return await group.reserve(
                    account_id=account.id, key_id=None, request_id=f"r{i}", amount=AMOUNT, ttl_s=60
                )
            except InsufficientCredits as exc:
                assert "this request needs up to 0.001 credits" in exc.message, exc.message
                return None

        taken = [h for h in await asyncio.gather(*(attempt(i) for i in range(ATTEMPTS))) if h is not None]
        assert len(taken) == K
        assert group.ops == ATTEMPTS and group.batches < ATTEMPTS  # they were batched
        # In arrival order the balance steps down by one hold each: the Hold reports its own.
        assert sorted(h.balance_after for h in taken) == [AMOUNT - 1 + n * AMOUNT for n in range(K)]
        assert await book.balance(account.id) == AMOUNT - 1
        balances = await asyncio.gather(
            *(group.settle(h, cost=300 + i, usage=_usage(h.id, i)) for i, h in enumerate(taken))
        )
        charged = sum(300 + i for i in range(K))
        final = K * AMOUNT + AMOUNT - 1 - charged
        assert max(balances) == final
        assert await book.balance(account.id) == final
        async with db.read() as conn:
            assert (await conn.execute(select(func.count()).select_from(usage))).scalar_one() == K
            assert (await conn.execute(select(holds.c.status).distinct())).scalars().all() == ["settled"]
        await _check_books(db)
        await group.aclose()

    run_with_db(database_url, body)


def test_a_refused_hold_does_not_poison_its_batch(database_url: str) -> None:
    async def body(db: Database) -> None:
        book = Ledger(db)
        rich = await book.create_account("rich", 100 * AMOUNT)
        poor = await book.create_account("poor", AMOUNT - 1)
        group = GroupCommit(book, db)
        gone_key = KeyTerms("nokey123", rpm=None, tpm=None, max_concurrent=None)

        async def hold(account_id: int, request_id: str, key: KeyTerms | None = None) -> Hold:
            return await group.reserve(
                account_id=account_id,
                key_id=None,
                request_id=request_id,
                amount=AMOUNT,
                ttl_s=60,
                need_description="1 prompt + 1 completion tokens",
                key=key,
            )

        outcomes = await asyncio.gather(
            hold(rich.id, "ok-1"),
            hold(poor.id, "too-poor"),
            hold(rich.id, "stale", key=gone_key),
            hold(999_999, "no-account"),
            hold(rich.id, "ok-2"),
            return_exceptions=True,
        )
        assert group.batches < len(outcomes)  # at least two of them shared a transaction
        ok_1, too_poor, stale, no_account, ok_2 = outcomes
        assert isinstance(ok_1, Hold) and isinstance(ok_2, Hold)
        assert isinstance(too_poor, InsufficientCredits)
        assert too_poor.message == (
            "Insufficient credits: this request needs up to 0.001 credits (1 prompt + 1 completion tokens) "
            "but the balance is 0.000999. Add credits or lower max_completion_tokens."
        )
        assert isinstance(stale, KeyChanged)
        assert isinstance(no_account, LookupError)
        assert await book.balance(rich.id) == 98 * AMOUNT
        assert await book.balance(poor.id) == AMOUNT - 1
        await _check_books(db)
        await group.aclose()

    run_with_db(database_url, body)


def test_a_batch_keeps_arrival_order_across_holds_and_settlements(database_url: str) -> None:
    """A hold queued just before the settlement that gives the credit back, in one batch, is refused, as
    it would be one request at a time; one queued just after it is taken."""

    async def body(db: Database) -> None:
        book = Ledger(db)
        account = await book.create_account("one-at-a-time", AMOUNT)
        group = GroupCommit(book, db)
        first = await group.reserve(
            account_id=account.id, key_id=None, request_id="first", amount=AMOUNT, ttl_s=60
        )

        def hold(request_id: str) -> Awaitable[Hold]:
            return group.reserve(
                account_id=account.id, key_id=None, request_id=request_id, amount=AMOUNT, ttl_s=60
            )

        early, balance, second = await asyncio.gather(
            hold("early"),
            group.settle(first, cost=0, usage=_usage("first", 0)),
            hold("second"),
            return_exceptions=True,
        )
        assert group.batches == 2 and group.ops == 4  # the three shared one transaction
        assert isinstance(early, InsufficientCredits), early
        assert "the balance is 0." in early.message
        assert balance == AMOUNT  # the settlement's own balance, before the second hold
        assert isinstance(second, Hold) and second.balance_after == 0
        assert await book.balance(account.id) == 0
        assert await group.settle(second, cost=AMOUNT, usage=_usage("second")) == 0
        await _check_books(db)
        await group.aclose()

    run_with_db(database_url, body)


def test_releases_in_a_batch_give_everything_back_and_record_usage_at_cost_zero(database_url: str) -> None:
    """Failed requests' releases, batched with a settlement: the whole hold back, one 'release' ledger
    row each, a usage row at cost 0 only for the release that carries one; as `Ledger.release` alone."""

    async def body(db: Database) -> None:
        book = Ledger(db)
        account = await book.create_account("failing", 10 * AMOUNT)
        group = GroupCommit(book, db)
        held = [
            await group.reserve(
                account_id=account.id, key_id=None, request_id=f"h{i}", amount=AMOUNT, ttl_s=60
            )
            for i in range(3)
        ]
        batches = group.batches
        balances = await asyncio.gather(
            group.release(held[0], usage=_usage("h0", 0)),
            group.release(held[1]),
            group.settle(held[2], cost=400, usage=_usage("h2", 4)),
        )
        assert group.batches == batches + 1  # one transaction
        assert balances == [8 * AMOUNT, 9 * AMOUNT, 10 * AMOUNT - 400]
        assert await group.release(held[0], usage=_usage("h0", 0)) == 10 * AMOUNT - 400  # once only
        async with db.read() as conn:
            rows = {r.request_id: r.cost for r in (await conn.execute(select(usage))).all()}
            statuses = dict((await conn.execute(select(holds.c.id, holds.c.status))).all())
            kinds = (await conn.execute(select(ledger.c.ref, ledger.c.kind).order_by(ledger.c.id))).all()
        assert rows == {"h0": 0, "h2": 400}
        assert statuses == {"h0": "released", "h1": "released", "h2": "settled"}
        assert [tuple(k) for k in kinds if k.ref in ("h0", "h1")] == [
            ("h0", "hold"),
            ("h1", "hold"),
            ("h0", "release"),
            ("h1", "release"),
        ]
        await _check_books(db)
        await group.aclose()

    run_with_db(database_url, body)


def test_a_failing_op_is_retried_alone_and_fails_alone(database_url: str) -> None:
    """A duplicate request id breaks the batch's INSERT: the batch rolls back and every op runs alone."""

    async def body(db: Database) -> None:
        book = Ledger(db)
        account = await book.create_account("dup", 100 * AMOUNT)
        group = GroupCommit(book, db)
        first = await group.reserve(
            account_id=account.id, key_id=None, request_id="dup", amount=AMOUNT, ttl_s=60
        )
        outcomes = await asyncio.gather(
            *(
                group.reserve(account_id=account.id, key_id=None, request_id=rid, amount=AMOUNT, ttl_s=60)
                for rid in ("a", "dup", "b")
            ),
            return_exceptions=True,
        )
        assert isinstance(outcomes[0], Hold) and isinstance(outcomes[2], Hold)
        assert isinstance(outcomes[1], IntegrityError)
        assert await book.balance(account.id) == 97 * AMOUNT
        assert first.balance_after == 99 * AMOUNT
        await _check_books(db)
        await group.aclose()

    run_with_db(database_url, body)


def test_late_and_repeated_settlements_in_a_batch(database_url: str) -> None:
    """A hold settled twice in one batch is charged once; one the sweeper expired is charged from the
    balance (by `Ledger`, after the batch), as one request at a time would be."""

    async def body(db: Database) -> None:
        book = Ledger(db)
        account = await book.create_account("late", 10 * AMOUNT)
        group = GroupCommit(book, db)
        fresh = await group.reserve(
            account_id=account.id, key_id=None, request_id="fresh", amount=AMOUNT, ttl_s=60
        )
        expired = await group.reserve(
            account_id=account.id, key_id=None, request_id="old", amount=AMOUNT, ttl_s=60
        )
        assert await book.release_expired(expired.expires_at + timedelta(seconds=1)) == 2
        fresh = await group.reserve(
            account_id=account.id, key_id=None, request_id="fresh2", amount=AMOUNT, ttl_s=60
        )
        await asyncio.gather(
            group.settle(fresh, cost=100, usage=_usage("fresh2")),
            group.settle(fresh, cost=100, usage=_usage("fresh2")),
            group.settle(expired, cost=250, usage=_usage("old")),
            group.release(fresh),
        )
        assert await book.balance(account.id) == 10 * AMOUNT - 100 - 250
        async with db.read() as conn:
            assert sorted((await conn.execute(select(usage.c.request_id))).scalars().all()) == [
                "fresh2",
                "old",
            ]
        await _check_books(db)
        await group.aclose()

    run_with_db(database_url, body)


def test_a_cancelled_reserve_leaves_no_hold(database_url: str) -> None:
    async def body(db: Database) -> None:
        book = Ledger(db)
        account = await book.create_account("cancel", 100 * AMOUNT)
        group = GroupCommit(book, db)

        async def hold(request_id: str) -> Hold:
            return await group.reserve(
                account_id=account.id, key_id=None, request_id=request_id, amount=AMOUNT, ttl_s=60
            )

        tasks = [asyncio.create_task(hold(f"c{i}")) for i in range(10)]
        await asyncio.sleep(0)  # all queued; the first batch begins
        for task in tasks[::2]:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        kept = [r for r in results if isinstance(r, Hold)]
        await group.aclose()  # applies the releases of holds whose caller left after the batch began
        assert await book.balance(account.id) == 100 * AMOUNT - len(kept) * AMOUNT
        audit = await book.audit(account.id)
        assert audit.open_holds == len(kept) * AMOUNT
        await _check_books(db)

    run_with_db(database_url, body)


@pytest.mark.postgres
def test_an_outage_fails_the_whole_batch_with_503(pg_database_url: str, pg_proxy: TcpProxy) -> None:
    async def body() -> None:
        db = await open_database(through(pg_database_url, pg_proxy), connect_timeout_s=2, pool_timeout_s=2)
        try:
            book = Ledger(db)
            account = await book.create_account("outage", 100 * AMOUNT)
            group = GroupCommit(book, db)
            held = await group.reserve(
                account_id=account.id, key_id=None, request_id="h", amount=AMOUNT, ttl_s=60
            )
            pg_proxy.cut()
            outcomes = await asyncio.gather(
                group.settle(held, cost=10, usage=_usage("h")),
                *(
                    group.reserve(
                        account_id=account.id, key_id=None, request_id=f"o{i}", amount=AMOUNT, ttl_s=60
                    )
                    for i in range(4)
                ),
                return_exceptions=True,
            )
            assert all(isinstance(o, ServiceUnavailable) for o in outcomes), outcomes
            assert len({id(o) for o in outcomes}) == len(outcomes)  # one exception per waiter
            assert all(o.headers["Retry-After"] == "2" for o in outcomes if isinstance(o, ServiceUnavailable))
            pg_proxy.restore()
            assert await group.settle(held, cost=10, usage=_usage("h")) == 100 * AMOUNT - 10
            await _check_books(db)
            await group.aclose()
        finally:
            await db.aclose()

    run(body())


@pytest.mark.postgres
def test_replica_batches_taking_accounts_in_opposite_orders_do_not_deadlock(
    pg_database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Two replicas' writers (two `GroupCommit`s on one database), each with a batch that holds on
    accounts A and B, queued in opposite orders: each batch locks its accounts in id order first, so
    neither waits for the other's second account while holding its first (PostgreSQL would abort one
    after its deadlock timeout, and the batch would be retried op by op: logged as a failed batch)."""

    async def body(db: Database) -> None:
        book = Ledger(db)
        a = await book.create_account("a", 100 * AMOUNT)
        b = await book.create_account("b", 100 * AMOUNT)
        first, second = GroupCommit(book, db), GroupCommit(book, db)

        def hold(group: GroupCommit, account_id: int, request_id: str) -> Awaitable[Hold]:
            return group.reserve(
                account_id=account_id, key_id=None, request_id=request_id, amount=AMOUNT, ttl_s=60
            )

        for round_ in range(5):
            holds_taken = await asyncio.gather(
                hold(first, a.id, f"1a{round_}"),
                hold(first, b.id, f"1b{round_}"),
                hold(second, b.id, f"2b{round_}"),
                hold(second, a.id, f"2a{round_}"),
            )
            assert all(isinstance(h, Hold) for h in holds_taken)
        assert first.batches == second.batches == 5 and first.ops == second.ops == 10  # batches of two
        assert [r for r in caplog.records if r.levelname == "ERROR"] == []
        assert await book.balance(a.id) == await book.balance(b.id) == 90 * AMOUNT
        await _check_books(db)
        await first.aclose()
        await second.aclose()

    run_with_db(pg_database_url, body)
