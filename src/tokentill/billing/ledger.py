"""Accounts and the money that moves through them, always one database transaction per change.

Every balance change is a conditional `UPDATE accounts ... RETURNING balance` plus append-only `ledger`
rows whose `balance_after` comes from that RETURNING, committed together. The balance therefore never goes
negative (the UPDATE's WHERE refuses, and a CHECK constraint backs it), and the ledger always sums to it.

Operators move money outside requests with `add_credits` (ledger 'credit'), and `refund` / `debit`
(ledger 'adjust', `ref` 'refund' / 'debit', with the operator's note); a debit never takes a balance
below zero, credits held by running requests included.

A request's life (DESIGN §4):

    reserve()  balance -= worst case; ledger 'hold'; holds row 'open'            → Hold (or 402)
    settle()   hold 'open' → 'settled'; ledger 'release' +hold, 'charge' -cost   → usage row
    release()  hold 'open' → 'released'; ledger 'release' +hold (charge nothing) → optional usage row
    release_expired()  crashed requests: hold 'open' → 'expired'; ledger 'release' +hold

Each hold is closed by exactly one conditional `UPDATE holds SET status=... WHERE status='open'`, so two
closers (a late settle and the sweeper, two sweepers in two processes) cannot both move money for it.
`settle` and `release` are idempotent: a second call for the same hold changes nothing.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Collection
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from tokentill.billing import pg_statements
from tokentill.billing.money import MAX_UCR, format_credits
from tokentill.billing.records import (
    MAX_NOTE,
    Account,
    AccountExists,
    Audit,
    BalanceRefused,
    Hold,
    KeyChanged,
    KeyTerms,
    UsageRecord,
    UsageRow,
)
from tokentill.billing.statements import (
    account_from_row,
    add_to_balance,
    append_ledger,
    balance_of,
    close_hold,
    insert_account,
    key_is_as_admitted,
    open_hold,
    read_balance,
    record_usage,
    reserve_from_balance,
    usage_row_from,
)
from tokentill.errors import InsufficientCredits
from tokentill.names import check_lookup, check_name
from tokentill.storage.db import Database
from tokentill.storage.schema import accounts, holds, ledger, utcnow
from tokentill.storage.schema import usage as usage_table

__all__ = [
    "Account",
    "AccountExists",
    "Audit",
    "BalanceRefused",
    "Hold",
    "KeyChanged",
    "KeyTerms",
    "Ledger",
    "UsageRecord",
    "UsageRow",
]

logger = logging.getLogger(__name__)


def hold_refused(amount: int, balance: int, need_description: str | None) -> InsufficientCredits:
    """The 402 of a hold of `amount` µcr that `balance` cannot cover."""
    detail = f" ({need_description})" if need_description else ""
    return InsufficientCredits(
        f"Insufficient credits: this request needs up to {format_credits(amount)} credits"
        f"{detail} but the balance is {format_credits(balance)}. Add credits or lower "
        "max_completion_tokens."
    )


class Ledger:
    """Account and credit operations on one `Database`. Stateless apart from the database handle."""

    def __init__(self, db: Database) -> None:
        self._db = db

    # ----------------------------------------------------------------- accounts

    async def create_account(self, name: str, credits: int = 0) -> Account:
        """Create account `name` holding `credits` µcr (a 'credit' ledger row when > 0).

        Raises `AccountExists` if the name is taken, `InvalidRequest` for a name `names.check_name`
        refuses, `ValueError` for negative credits.
        """
        check_name(name)
        if credits < 0:
            raise ValueError("initial credits cannot be negative")
        now = utcnow()
        try:
            async with self._db.begin() as conn:
                account_id = await insert_account(conn, name, credits, now=now)
        except IntegrityError as exc:
            raise AccountExists(f"account {name!r} already exists") from exc
        return Account(id=account_id, name=name, balance=credits, created_at=now)

    async def get_account(self, name: str) -> Account | None:
        check_lookup(name, param="name")
        async with self._db.read() as conn:
            row = (await conn.execute(select(accounts).where(accounts.c.name == name))).first()
        return account_from_row(row) if row is not None else None

    async def get_account_by_id(self, account_id: int) -> Account | None:
        async with self._db.read() as conn:
            row = (await conn.execute(select(accounts).where(accounts.c.id == account_id))).first()
        return account_from_row(row) if row is not None else None

    async def list_accounts(self) -> list[Account]:
        async with self._db.read() as conn:
            rows = (await conn.execute(select(accounts).order_by(accounts.c.id))).all()
        return [account_from_row(row) for row in rows]

    async def count_accounts(self) -> int:
        async with self._db.read() as conn:
            return int((await conn.execute(select(func.count()).select_from(accounts))).scalar_one())

    async def balance(self, account_id: int) -> int:
        """The account's balance in µcr; `LookupError` if there is no such account. (A request reads it
        to clamp its default budget: one statement, `Database.run_read`.)"""
        return await self._db.run_read(functools.partial(read_balance, account_id=account_id))

    async def add_credits(self, name: str, amount: int, note: str = "") -> int:
        """Add `amount` µcr (> 0, else `ValueError`) to account `name`; returns the new balance.

        Raises `LookupError` for an unknown account, `InvalidRequest` for a name that cannot exist.
        """
        if amount <= 0:
            raise ValueError("credits to add must be positive")
        check_lookup(name, param="name")
        async with self._db.begin() as conn:
            row = (
                await conn.execute(
                    update(accounts)
                    .where(accounts.c.name == name)
                    .values(balance=accounts.c.balance + amount)
                    .returning(accounts.c.id, accounts.c.balance)
                )
            ).first()
            if row is None:
                raise LookupError(f"no account named {name!r}")
            await append_ledger(conn, row.id, "credit", amount, row.balance, note=note, now=utcnow())
        logger.info("added %s credits to account %s", format_credits(amount), name)
        return int(row.balance)

    async def refund(self, name: str, amount: int, *, note: str) -> int:
        """Give `amount` µcr (> 0) back to account `name` as an 'adjust' ledger row carrying `note`;
        returns the new balance. `LookupError` for an unknown account, `BalanceRefused` past the column's
        limit, `InvalidRequest` for a note `names.check_name` refuses, `ValueError` for an amount ≤ 0."""
        return await self._adjust(name, amount, "refund", note)

    async def debit(self, name: str, amount: int, *, note: str) -> int:
        """Take `amount` µcr (> 0) from account `name` as an 'adjust' ledger row carrying `note`; returns
        the new balance. `BalanceRefused` when the balance (what running requests hold is already out of
        it) is below `amount`: a debit never takes a balance negative. Other errors as `refund`."""
        return await self._adjust(name, -amount, "debit", note)

    async def _adjust(self, name: str, delta: int, ref: str, note: str) -> int:
        if delta == 0 or abs(delta) > MAX_UCR:
            raise ValueError(f"an adjustment is 1 to {MAX_UCR} µcr")
        check_lookup(name, param="name")
        check_name(note, param="note", max_chars=MAX_NOTE)  # one line of printable text, as names are
        # One conditional UPDATE: a debit only while the balance covers it, a refund only while the sum
        # fits the BIGINT column (written as a subtraction so the check itself cannot overflow).
        fits = accounts.c.balance >= -delta if delta < 0 else accounts.c.balance <= MAX_UCR - delta
        async with self._db.begin() as conn:
            row = (
                await conn.execute(
                    update(accounts)
                    .where(accounts.c.name == name, fits)
                    .values(balance=accounts.c.balance + delta)
                    .returning(accounts.c.id, accounts.c.balance)
                )
            ).first()
            if row is None:
                current = select(accounts.c.balance).where(accounts.c.name == name)
                found = (await conn.execute(current)).first()
                if found is None:
                    raise LookupError(f"no account named {name!r}")
                balance, amount = int(found.balance), format_credits(abs(delta))
                if delta < 0:
                    raise BalanceRefused(
                        f"cannot debit {amount} credits from account {name!r}: its balance is "
                        f"{format_credits(balance)} credits, and a debit never takes a balance below zero",
                        balance,
                    )
                raise BalanceRefused(
                    f"cannot refund {amount} credits to account {name!r}: its balance would pass "
                    f"{format_credits(MAX_UCR)} credits",
                    balance,
                )
            await append_ledger(conn, row.id, "adjust", delta, row.balance, ref=ref, note=note, now=utcnow())
        logger.info("%s of %s credits on account %s: %s", ref, format_credits(abs(delta)), name, note)
        return int(row.balance)

    # ----------------------------------------------------------------- holds

    async def reserve(
        self,
        *,
        account_id: int,
        key_id: str | None,
        request_id: str,
        amount: int,
        ttl_s: float,
        need_description: str | None = None,
        key: KeyTerms | None = None,
    ) -> Hold:
        """Hold `amount` µcr for request `request_id` until settled, released or `ttl_s` passes.

        Raises `InsufficientCredits` (402) if the balance is below `amount`; its message states both,
        with `need_description` (e.g. "32 prompt + 8 completion tokens") in parentheses.
        With `key`, only while that key is live on those terms (`KeyChanged` otherwise, checked before the
        balance), in the same statement: a key revoked on any replica takes no credit after the commit.
        `LookupError` for an unknown account; `ValueError` for a negative amount.
        """
        if amount < 0:
            raise ValueError("a hold cannot be negative")
        if self._db.dialect == "postgresql":  # the whole hold in one statement (`pg_statements`)
            ttl = timedelta(seconds=ttl_s)
            done = await pg_statements.reserve(
                self._db,
                account_id=account_id,
                key_id=key_id,
                request_id=request_id,
                amount=amount,
                ttl=ttl,
                key=key,
            )
            if done is not None:
                balance_after, now = done
                expires_at = now.astimezone(UTC) + ttl
                return Hold(request_id, account_id, key_id, amount, expires_at, balance_after=balance_after)
            # Refused (nothing written): the steps below say why, or take it if the balance moved since.
        # The database's clock: the sweeper of another replica compares this expiry with it (`Database.now`).
        async with self._db.begin() as conn:
            taken = await reserve_from_balance(conn, account_id, amount, key)
            if taken is None:
                if key is not None and not await key_is_as_admitted(conn, key):
                    raise KeyChanged(f"key {key.key_id} was revoked or its limits changed")
                raise hold_refused(amount, await balance_of(conn, account_id), need_description)
            balance_after = taken
            now = await self._db.now(conn)
            expires_at = now + timedelta(seconds=ttl_s)
            await open_hold(conn, request_id, account_id, key_id, amount, now, expires_at)
            await append_ledger(conn, account_id, "hold", -amount, balance_after, ref=request_id, now=now)
        return Hold(
            id=request_id,
            account_id=account_id,
            key_id=key_id,
            amount=amount,
            expires_at=expires_at,
            balance_after=balance_after,
        )

    async def settle(self, hold: Hold, *, cost: int, usage: UsageRecord) -> int:
        """Charge `cost` µcr for the request behind `hold`, give back the rest, record `usage`.

        One transaction. If the hold is open: charge min(cost, hold). If the sweeper already expired it,
        charge min(cost, balance) (never below zero) and log a warning. If it was settled or released
        before, change nothing (idempotent). Returns the balance after. Callers run this shielded from
        cancellation so a client disconnect cannot leave the hold open.
        """
        if cost < 0:
            raise ValueError("cost cannot be negative")
        now = utcnow()
        if self._db.dialect == "postgresql":  # an open hold settles in one statement (`pg_statements`)
            settled = await pg_statements.settle_open(self._db, hold.id, cost, usage, now)
            if settled is not None:
                balance, amount, charge = settled
                if cost > amount:
                    logger.warning("request %s cost %d µcr but held only %d", hold.id, cost, amount)
                return balance
            # Not open (nothing written): the steps below handle an expired or closed hold.
        async with self._db.begin() as conn:
            closed = await close_hold(conn, hold.id, "open", "settled", now)
            if closed is not None:
                account_id, amount = closed
                charge = min(cost, amount)
                if cost > amount:
                    logger.warning("request %s cost %d µcr but held only %d", hold.id, cost, amount)
                balance = await add_to_balance(conn, account_id, amount - charge)
                released = balance + charge  # the running balance between the two rows
                await append_ledger(conn, account_id, "release", amount, released, ref=hold.id, now=now)
                await append_ledger(conn, account_id, "charge", -charge, balance, ref=hold.id, now=now)
                await record_usage(conn, self._db.dialect, account_id, usage, charge, now)
                return balance
            late = await close_hold(conn, hold.id, "expired", "settled", now)
            if late is None:
                logger.debug("hold %s was already closed; settle is a no-op", hold.id)
                return await balance_of(conn, hold.account_id)
            account_id = late[0]
            available = await balance_of(conn, account_id, for_update=True)
            charge = min(cost, available)
            logger.warning(
                "hold %s had expired before settlement; charging %d of %d µcr from the balance",
                hold.id,
                charge,
                cost,
            )
            balance = available
            if charge > 0:
                balance = await add_to_balance(conn, account_id, -charge)
                await append_ledger(conn, account_id, "charge", -charge, balance, ref=hold.id, now=now)
            await record_usage(conn, self._db.dialect, account_id, usage, charge, now)
            return balance

    async def release(self, hold: Hold, *, usage: UsageRecord | None = None) -> int:
        """Give the whole hold back and charge nothing (the request failed); optionally record `usage`
        with cost 0. Idempotent like `settle`. Returns the balance after.
        """
        now = utcnow()
        if self._db.dialect == "postgresql":  # an open hold is released in one statement (`pg_statements`)
            released = await pg_statements.release_open(self._db, hold.id, usage, now)
            if released is not None:
                return released
            # Not open (nothing written): the steps below handle an expired or closed hold.
        async with self._db.begin() as conn:
            closed = await close_hold(conn, hold.id, "open", "released", now)
            if closed is not None:
                account_id, amount = closed
                balance = await add_to_balance(conn, account_id, amount)
                await append_ledger(conn, account_id, "release", amount, balance, ref=hold.id, now=now)
            else:
                # Already returned by the sweeper: only the usage row is still owed, once.
                late = await close_hold(conn, hold.id, "expired", "released", now)
                if late is None:
                    return await balance_of(conn, hold.account_id)
                account_id = late[0]
                balance = await balance_of(conn, account_id)
            if usage is not None:
                await record_usage(conn, self._db.dialect, account_id, usage, 0, now)
            return balance

    async def release_expired(self, now: datetime | None = None, *, skip: Collection[str] = ()) -> int:
        """Release every open hold whose `expires_at` is before `now` (default: the database's clock,
        which set the expiries, so a replica whose own clock runs ahead cannot expire live holds),
        except the holds in `skip` (settlements this process still owes: `Settlements.pending`).

        Each hold is released in its own transaction behind a conditional status update, so concurrent
        sweepers in several processes release each hold once. Returns how many this call released.
        """
        async with self._db.read() as conn:
            now = now or await self._db.now(conn)
            candidates = (
                (
                    await conn.execute(
                        select(holds.c.id).where(holds.c.status == "open", holds.c.expires_at < now)
                    )
                )
                .scalars()
                .all()
            )
        released = 0
        for hold_id in candidates:
            if hold_id in skip:
                continue  # an answer was delivered: its settlement is pending, the money is owed
            async with self._db.begin() as conn:
                closed = await close_hold(conn, hold_id, "open", "expired", now)
                if closed is None:
                    continue
                account_id, amount = closed
                balance = await add_to_balance(conn, account_id, amount)
                await append_ledger(
                    conn, account_id, "release", amount, balance, ref=hold_id, note="hold expired", now=now
                )
            released += 1
            logger.warning("released expired hold %s (%d µcr) of account %d", hold_id, amount, account_id)
        return released

    # ----------------------------------------------------------------- reports

    async def usage(self, account_name: str | None = None, limit: int = 100) -> list[UsageRow]:
        """The newest `limit` usage rows, newest first, optionally of one account."""
        query = (
            select(usage_table, accounts.c.name.label("account_name"))
            .join(accounts, accounts.c.id == usage_table.c.account_id)
            .order_by(usage_table.c.id.desc())
            .limit(limit)
        )
        if account_name is not None:
            query = query.where(accounts.c.name == account_name)
        async with self._db.read() as conn:
            rows = (await conn.execute(query)).all()
        return [usage_row_from(r) for r in rows]

    async def audit(self, account_id: int) -> Audit:
        """The account's books from one consistent snapshot; `LookupError` if it does not exist."""
        async with self._db.read() as conn:
            balance = await balance_of(conn, account_id)
            sums = {
                kind: int(total)
                for kind, total in (
                    await conn.execute(
                        select(ledger.c.kind, func.sum(ledger.c.amount))
                        .where(ledger.c.account_id == account_id)
                        .group_by(ledger.c.kind)
                    )
                ).all()
            }
            open_holds = (
                await conn.execute(
                    select(func.coalesce(func.sum(holds.c.amount), 0)).where(
                        holds.c.account_id == account_id, holds.c.status == "open"
                    )
                )
            ).scalar_one()
        return Audit(
            account_id=account_id,
            balance=balance,
            credits_added=sums.get("credit", 0),
            settled_charges=-sums.get("charge", 0),
            adjustments=sums.get("adjust", 0),
            open_holds=int(open_holds),
            ledger_sum=sum(sums.values()),
        )
