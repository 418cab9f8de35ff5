"""The ledger on real SQLite and PostgreSQL: accounts, reserve / settle / release / recover, audits."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import Table, func, select

from tests._services import run_with_db
from tokentill.billing.ledger import Account, AccountExists, BalanceRefused, Hold, Ledger, UsageRecord
from tokentill.billing.money import MAX_UCR
from tokentill.errors import InsufficientCredits, InvalidRequest
from tokentill.storage import Database
from tokentill.storage.schema import holds, ledger, usage, utcnow


def _usage(request_id: str, **kwargs: int) -> UsageRecord:
    return UsageRecord(
        request_id=request_id,
        key_id="k1234567",
        model="o1-preview",
        prompt_tokens=kwargs.get("prompt_tokens", 10),
        completion_tokens=kwargs.get("completion_tokens", 5),
        reasoning_tokens=kwargs.get("reasoning_tokens", 2),
        status=kwargs.get("status", 200),
    )


async def _assert_books(book: Ledger, account: Account) -> None:
    audit = await book.audit(account.id)
    assert audit.consistent, audit
    expected = audit.credits_added + audit.adjustments - audit.settled_charges - audit.open_holds
    assert audit.balance == expected
    assert audit.balance == audit.ledger_sum >= 0


async def _count(db: Database, table: Table) -> int:
    async with db.read() as conn:
        return int((await conn.execute(select(func.count()).select_from(table))).scalar_one())


async def _reserve(book: Ledger, account: Account, request_id: str, amount: int, ttl_s: float = 60) -> Hold:
    return await book.reserve(
        account_id=account.id, key_id="k1234567", request_id=request_id, amount=amount, ttl_s=ttl_s
    )


def test_accounts(database_url: str) -> None:
    async def body(db: Database) -> None:
        book = Ledger(db)
        assert await book.count_accounts() == 0
        alice = await book.create_account("alice", 1_000)
        bob = await book.create_account("bob")
        with pytest.raises(AccountExists):
            await book.create_account("alice")
        with pytest.raises(InvalidRequest):  # tokentill.names: a client error (400), not a bug
            await book.create_account("")
        assert await book.count_accounts() == 2
        assert await book.get_account("alice") == alice
        assert await book.get_account_by_id(bob.id) == bob
        assert await book.get_account("nobody") is None
        assert [a.name for a in await book.list_accounts()] == ["alice", "bob"]
        assert await book.add_credits("bob", 250, note="top-up") == 250
        with pytest.raises(ValueError):
            await book.add_credits("bob", 0)
        with pytest.raises(LookupError):
            await book.add_credits("nobody", 5)
        assert await book.balance(bob.id) == 250
        with pytest.raises(LookupError):
            await book.balance(999)
        assert alice.created_at.tzinfo is not None
        for account in (alice, bob):
            await _assert_books(book, account)

    run_with_db(database_url, body)


def test_reserve_settle(database_url: str) -> None:
    async def body(db: Database) -> None:
        book = Ledger(db)
        acct = await book.create_account("a", 10_000)
        hold = await _reserve(book, acct, "req-1", 3_000)
        assert hold.amount == 3_000 and hold.expires_at > utcnow()
        assert await book.balance(acct.id) == 7_000
        audit = await book.audit(acct.id)
        assert audit.open_holds == 3_000
        await _assert_books(book, acct)

        assert await book.settle(hold, cost=1_200, usage=_usage("req-1")) == 8_800
        audit = await book.audit(acct.id)
        assert (audit.open_holds, audit.settled_charges) == (0, 1_200)
        await _assert_books(book, acct)
        [row] = await book.usage("a")
        assert (row.request_id, row.cost, row.reasoning_tokens, row.account_name) == ("req-1", 1_200, 2, "a")

        # Idempotent: a second settle (or a late release) moves no money and adds no usage row.
        assert await book.settle(hold, cost=1_200, usage=_usage("req-1")) == 8_800
        assert await book.release(hold, usage=_usage("req-1")) == 8_800
        assert await _count(db, usage) == 1
        assert await _count(db, ledger) == 4  # credit, hold, release, charge
        await _assert_books(book, acct)

    run_with_db(database_url, body)


def test_settle_caps_charge_at_hold(database_url: str) -> None:
    async def body(db: Database) -> None:
        book = Ledger(db)
        acct = await book.create_account("a", 10_000)
        hold = await _reserve(book, acct, "req-1", 1_000)
        assert await book.settle(hold, cost=5_000, usage=_usage("req-1")) == 9_000
        await _assert_books(book, acct)

    run_with_db(database_url, body)


def test_release(database_url: str) -> None:
    async def body(db: Database) -> None:
        book = Ledger(db)
        acct = await book.create_account("a", 5_000)
        hold = await _reserve(book, acct, "req-1", 5_000)
        assert await book.balance(acct.id) == 0
        assert await book.release(hold, usage=_usage("req-1", status=502)) == 5_000
        assert await book.release(hold, usage=_usage("req-1", status=502)) == 5_000
        assert await book.settle(hold, cost=10, usage=_usage("req-1")) == 5_000
        [row] = await book.usage()
        assert (row.cost, row.status) == (0, 502)
        other = await _reserve(book, acct, "req-2", 100)
        assert await book.release(other) == 5_000
        assert len(await book.usage()) == 1
        await _assert_books(book, acct)

    run_with_db(database_url, body)


def test_insufficient_credits(database_url: str) -> None:
    async def body(db: Database) -> None:
        book = Ledger(db)
        acct = await book.create_account("poor", 100)
        with pytest.raises(InsufficientCredits) as caught:
            await book.reserve(
                account_id=acct.id,
                key_id=None,
                request_id="req-1",
                amount=480,
                ttl_s=60,
                need_description="32 prompt + 8 completion tokens",
            )
        assert caught.value.status == 402
        assert caught.value.code == "insufficient_credits"
        assert caught.value.message.startswith(
            "Insufficient credits: this request needs up to 0.00048 credits "
            "(32 prompt + 8 completion tokens) but the balance is 0.0001."
        )
        assert await book.balance(acct.id) == 100
        assert await _count(db, holds) == 0
        exact = await _reserve(book, acct, "req-2", 100)  # the whole balance is fine
        assert await book.balance(acct.id) == 0
        await book.release(exact)
        with pytest.raises(LookupError):
            await book.reserve(account_id=999, key_id=None, request_id="r", amount=1, ttl_s=1)
        await _assert_books(book, acct)

    run_with_db(database_url, body)


def test_recover_expired_then_late_settle(database_url: str) -> None:
    async def body(db: Database) -> None:
        book = Ledger(db)
        acct = await book.create_account("a", 10_000)
        stale = await _reserve(book, acct, "stale", 4_000, ttl_s=1)
        late = await _reserve(book, acct, "late", 4_000, ttl_s=1)
        fresh = await _reserve(book, acct, "fresh", 1_000, ttl_s=3600)
        assert await book.release_expired() == 0  # nothing has expired yet
        later = utcnow() + timedelta(seconds=5)
        assert await book.release_expired(later) == 2
        assert await book.release_expired(later) == 0
        assert await book.balance(acct.id) == 9_000
        await _assert_books(book, acct)

        # A request that outlived its hold is still charged, from the balance, exactly once.
        assert await book.settle(late, cost=1_500, usage=_usage("late")) == 7_500
        assert await book.settle(late, cost=1_500, usage=_usage("late")) == 7_500
        # A failed request whose hold expired only gets its usage row.
        assert await book.release(stale, usage=_usage("stale", status=499)) == 7_500
        assert await book.release(stale, usage=_usage("stale", status=499)) == 7_500
        assert await book.settle(fresh, cost=100, usage=_usage("fresh")) == 8_400
        assert sorted((u.request_id, u.cost) for u in await book.usage("a")) == [
            ("fresh", 100),
            ("late", 1_500),
            ("stale", 0),
        ]
        await _assert_books(book, acct)

    run_with_db(database_url, body)


def test_late_settle_never_goes_negative(database_url: str) -> None:
    async def body(db: Database) -> None:
        book = Ledger(db)
        acct = await book.create_account("a", 1_000)
        hold = await _reserve(book, acct, "r", 1_000, ttl_s=1)
        assert await book.release_expired(utcnow() + timedelta(seconds=5)) == 1
        spend = await _reserve(book, acct, "other", 800)
        assert await book.settle(spend, cost=800, usage=_usage("other")) == 200
        assert await book.settle(hold, cost=900, usage=_usage("r")) == 0  # only 200 was left
        assert {u.request_id: u.cost for u in await book.usage()} == {"other": 800, "r": 200}
        await _assert_books(book, acct)

    run_with_db(database_url, body)


def test_refund_and_debit_are_adjust_rows_and_never_overdraw(database_url: str) -> None:
    async def rows(db: Database, account: Account) -> list[tuple[str, int, int, str | None, str]]:
        query = (
            select(ledger.c.kind, ledger.c.amount, ledger.c.balance_after, ledger.c.ref, ledger.c.note)
            .where(ledger.c.account_id == account.id, ledger.c.kind == "adjust")
            .order_by(ledger.c.id)
        )
        async with db.read() as conn:
            found = (await conn.execute(query)).all()
        return [(r.kind, int(r.amount), int(r.balance_after), r.ref, r.note) for r in found]

    async def body(db: Database) -> None:
        book = Ledger(db)
        alice = await book.create_account("alice", 1_000)
        hold = await _reserve(book, alice, "req-1", 300)  # held credits are out of the balance
        with pytest.raises(BalanceRefused, match="its balance is 0.0007 credits") as info:
            await book.debit("alice", 701, note="too much")
        assert info.value.balance == 700 and await book.balance(alice.id) == 700
        assert await book.debit("alice", 700, note="chargeback #12") == 0
        assert await book.refund("alice", 250, note="bad answer") == 250
        assert await book.settle(hold, cost=100, usage=_usage("req-1")) == 450
        assert await rows(db, alice) == [
            ("adjust", -700, 0, "debit", "chargeback #12"),
            ("adjust", 250, 250, "refund", "bad answer"),
        ]
        audit = await book.audit(alice.id)
        assert (audit.adjustments, audit.settled_charges, audit.balance) == (-450, 100, 450)
        await _assert_books(book, alice)
        with pytest.raises(LookupError):
            await book.refund("nobody", 1, note="x")
        with pytest.raises(ValueError):
            await book.debit("alice", 0, note="x")
        for note in (" ", "n" * 501, "a\x00b", " padded"):
            with pytest.raises(InvalidRequest):
                await book.debit("alice", 1, note=note)
        rich = await book.create_account("rich", MAX_UCR - 5)
        with pytest.raises(BalanceRefused, match="would pass"):
            await book.refund("rich", 6, note="overflow")
        assert await book.refund("rich", 5, note="to the brim") == MAX_UCR
        await _assert_books(book, rich)
        assert len(await rows(db, alice)) == 2  # refusals wrote nothing

    run_with_db(database_url, body)
