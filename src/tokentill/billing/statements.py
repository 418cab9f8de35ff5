"""The SQL statements the ledger composes; each runs inside the caller's transaction and commits nothing.

Kept apart from `ledger.py` so each money operation there reads as a short sequence of these steps.

The statements every request runs are built once, here, with named bind parameters, and executed with
the values: SQLAlchemy memoizes a statement object's cache key, so each execution finds its compiled
form in the engine's compiled cache without building or traversing the statement again (building them
per call cost about as much CPU as running them; docs/performance.md).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Insert, bindparam, exists, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection

from tokentill.billing.records import Account, KeyTerms, UsageRecord, UsageRow
from tokentill.storage.schema import accounts, api_keys, holds, ledger, usage, usage_hourly

__all__ = [
    "account_from_row",
    "usage_row_from",
    "add_to_balance",
    "append_ledger",
    "insert_account",
    "balance_of",
    "close_hold",
    "key_is_as_admitted",
    "open_hold",
    "read_balance",
    "record_usage",
    "reserve_from_balance",
    "usage_bucket",
    "usage_values",
]

_BALANCE = select(accounts.c.balance).where(accounts.c.id == bindparam("b_account"))
_BALANCE_FOR_UPDATE = _BALANCE.with_for_update()
_ADD_TO_BALANCE = (
    update(accounts)
    .where(accounts.c.id == bindparam("b_account"), accounts.c.balance + bindparam("b_delta") >= 0)
    .values(balance=accounts.c.balance + bindparam("b_delta"))
    .returning(accounts.c.balance)
)
_TAKE_FROM_BALANCE = (
    update(accounts)
    .where(accounts.c.id == bindparam("b_account"), accounts.c.balance >= bindparam("b_amount"))
    .values(balance=accounts.c.balance - bindparam("b_amount"))
    .returning(accounts.c.balance)
)
_KEY_AS_ADMITTED = (
    (api_keys.c.id == bindparam("b_key"))
    & api_keys.c.revoked_at.is_(None)
    & api_keys.c.rpm.is_not_distinct_from(bindparam("b_rpm"))
    & api_keys.c.tpm.is_not_distinct_from(bindparam("b_tpm"))
    & api_keys.c.max_concurrent.is_not_distinct_from(bindparam("b_max_concurrent"))
)
_TAKE_FROM_BALANCE_FOR_KEY = _TAKE_FROM_BALANCE.where(exists().where(_KEY_AS_ADMITTED))
_KEY_IS_AS_ADMITTED = select(api_keys.c.id).where(_KEY_AS_ADMITTED)
_LEDGER_ROW = insert(ledger)
_OPEN_HOLD = insert(holds)
_CLOSE_HOLD = (
    update(holds)
    .where(holds.c.id == bindparam("b_hold"), holds.c.status == bindparam("b_from"))
    .values(status=bindparam("b_to"), closed_at=bindparam("b_now"))
    .returning(holds.c.account_id, holds.c.amount)
)
_COUNTS = (
    "prompt_tokens",
    "completion_tokens",
    "reasoning_tokens",
    "cached_tokens",
    "image_tokens",
    "cost",
    "cached_saving",
)


def _usage_statements(dialect_insert: Any) -> tuple[Insert, Insert]:
    """The usage row (nothing on a duplicate request id) and its hourly bucket upsert, for one dialect."""
    row = dialect_insert(usage).on_conflict_do_nothing(index_elements=["request_id"])
    bucket = dialect_insert(usage_hourly)
    bucket = bucket.on_conflict_do_update(
        index_elements=["account_id", "hour", "model", "key_id"],
        set_={name: usage_hourly.c[name] + bucket.excluded[name] for name in (*_COUNTS, "requests")},
    )
    return row, bucket


_USAGE_BY_DIALECT = {
    "postgresql": _usage_statements(postgresql.insert),
    "sqlite": _usage_statements(sqlite.insert),
}
_USAGE = {
    dialect: (row.returning(usage.c.id), bucket) for dialect, (row, bucket) in _USAGE_BY_DIALECT.items()
}


def account_from_row(row: Any) -> Account:
    return Account(id=row.id, name=row.name, balance=int(row.balance), created_at=row.created_at)


def usage_row_from(r: Any) -> UsageRow:
    """A `usage` row joined with `accounts.name AS account_name`, as a `UsageRow`."""
    return UsageRow(
        request_id=r.request_id,
        account_name=r.account_name,
        key_id=r.key_id,
        model=r.model,
        prompt_tokens=r.prompt_tokens,
        completion_tokens=r.completion_tokens,
        reasoning_tokens=r.reasoning_tokens,
        cached_tokens=r.cached_tokens,
        image_tokens=r.image_tokens,
        cost=int(r.cost),
        status=r.status,
        latency_ms=r.latency_ms,
        estimated=bool(r.estimated),
        created_at=r.created_at,
        cached_saving=int(r.cached_saving),
    )


async def balance_of(conn: AsyncConnection, account_id: int, *, for_update: bool = False) -> int:
    # FOR UPDATE is a no-op on SQLite, where BEGIN IMMEDIATE already holds the write lock.
    query = _BALANCE_FOR_UPDATE if for_update else _BALANCE
    balance = (await conn.execute(query, {"b_account": account_id})).scalar_one_or_none()
    if balance is None:
        raise LookupError(f"no account with id {account_id}")
    return int(balance)


async def add_to_balance(conn: AsyncConnection, account_id: int, delta: int) -> int:
    """balance += delta, refused (LookupError) if the account is missing or would go negative."""
    row = (await conn.execute(_ADD_TO_BALANCE, {"b_account": account_id, "b_delta": delta})).first()
    if row is None:
        raise LookupError(f"account {account_id} is missing or cannot cover {-delta} µcr")
    return int(row.balance)


async def reserve_from_balance(
    conn: AsyncConnection, account_id: int, amount: int, key: KeyTerms | None = None
) -> int | None:
    """balance -= amount if the balance covers it (and, given `key`, the key is live on those terms):
    the balance after; None when refused (or no account). (PostgreSQL: `pg_statements.reserve`.)"""
    values: dict[str, Any] = {"b_account": account_id, "b_amount": amount}
    if key is not None:
        values.update(_key_values(key))
    row = (await conn.execute(_TAKE_FROM_BALANCE_FOR_KEY if key else _TAKE_FROM_BALANCE, values)).first()
    return int(row.balance) if row is not None else None


async def key_is_as_admitted(conn: AsyncConnection, key: KeyTerms) -> bool:
    """Whether `key` is live with exactly its `KeyTerms` limits."""
    return (await conn.execute(_KEY_IS_AS_ADMITTED, _key_values(key))).first() is not None


def _key_values(key: KeyTerms) -> dict[str, Any]:
    return {"b_key": key.key_id, "b_rpm": key.rpm, "b_tpm": key.tpm, "b_max_concurrent": key.max_concurrent}


async def insert_account(conn: AsyncConnection, name: str, credits: int, *, now: datetime) -> int:
    """A new account `name` holding `credits` µcr (with its 'credit' ledger row when > 0); its id.

    A taken name raises `IntegrityError`."""
    account_id: int = (
        await conn.execute(
            insert(accounts).values(name=name, balance=credits, created_at=now).returning(accounts.c.id)
        )
    ).scalar_one()
    if credits > 0:
        await append_ledger(conn, account_id, "credit", credits, credits, note="initial credits", now=now)
    return account_id


async def append_ledger(
    conn: AsyncConnection,
    account_id: int,
    kind: str,
    amount: int,
    balance_after: int,
    *,
    ref: str | None = None,
    note: str = "",
    now: datetime,
) -> None:
    await conn.execute(
        _LEDGER_ROW,
        {
            "account_id": account_id,
            "kind": kind,
            "amount": amount,
            "balance_after": balance_after,
            "ref": ref,
            "note": note,
            "created_at": now,
        },
    )


async def close_hold(
    conn: AsyncConnection, hold_id: str, from_status: str, to_status: str, now: datetime
) -> tuple[int, int] | None:
    """Move the hold from `from_status` to `to_status`; (account_id, amount) if this call did it."""
    values = {"b_hold": hold_id, "b_from": from_status, "b_to": to_status, "b_now": now}
    row = (await conn.execute(_CLOSE_HOLD, values)).first()
    return (int(row.account_id), int(row.amount)) if row is not None else None


async def record_usage(
    conn: AsyncConnection, dialect: str, account_id: int, record: UsageRecord, cost: int, now: datetime
) -> None:
    """Write the usage row and add it to its `usage_hourly` bucket (the UTC hour of `now`), once."""
    # ON CONFLICT DO NOTHING: a duplicate request id must not roll back the money movement with it.
    values = usage_values(account_id, record, cost, now)
    row_statement, bucket_statement = _USAGE[dialect]
    if (await conn.execute(row_statement, values)).first() is None:
        return
    # The hourly rollup moves in the same transaction as the row it sums, so the two always agree.
    await conn.execute(bucket_statement, usage_bucket(values))


def usage_values(account_id: int, record: UsageRecord, cost: int, now: datetime) -> dict[str, Any]:
    """The `usage` row of `record`, charged `cost`, written at `now`."""
    return {
        "request_id": record.request_id,
        "account_id": account_id,
        "key_id": record.key_id,
        "model": record.model,
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "reasoning_tokens": record.reasoning_tokens,
        "cached_tokens": record.cached_tokens,
        "image_tokens": record.image_tokens,
        "cost": cost,
        "cached_saving": record.cached_saving,
        "status": record.status,
        "latency_ms": record.latency_ms,
        "estimated": record.estimated,
        "created_at": now,
    }


def usage_bucket(row: dict[str, Any]) -> dict[str, Any]:
    """The `usage_hourly` contribution of one usage row (its UTC hour, one request)."""
    return {
        "account_id": row["account_id"],
        "hour": row["created_at"].replace(minute=0, second=0, microsecond=0),
        "model": row["model"],
        "key_id": row["key_id"] or "",
        "requests": 1,
        **{name: row[name] for name in _COUNTS},
    }


async def open_hold(
    conn: AsyncConnection,
    hold_id: str,
    account_id: int,
    key_id: str | None,
    amount: int,
    now: datetime,
    expires_at: datetime,
) -> None:
    """Insert the 'open' holds row of a reservation."""
    values = {
        "id": hold_id,
        "account_id": account_id,
        "key_id": key_id,
        "amount": amount,
        "status": "open",
        "created_at": now,
        "expires_at": expires_at,
    }
    await conn.execute(_OPEN_HOLD, values)


# ----------------------------------------------------------------- synchronous
# `Database.run_read` runs a read on a synchronous connection: on SQLite one hand-off to its writer thread.


def read_balance(conn: Connection, account_id: int) -> int:
    """`balance_of` on a synchronous connection (`Database.run_read`)."""
    balance = conn.execute(_BALANCE, {"b_account": account_id}).scalar_one_or_none()
    if balance is None:
        raise LookupError(f"no account with id {account_id}")
    return int(balance)
