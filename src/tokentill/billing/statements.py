"""The SQL statements the ledger composes; each runs inside the caller's transaction and commits nothing.

Kept apart from `ledger.py` so each money operation there reads as a short sequence of these steps.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from tokentill.billing.records import Account, UsageRecord, UsageRow
from tokentill.storage.schema import accounts, holds, ledger, usage, usage_hourly

__all__ = [
    "account_from_row",
    "usage_row_from",
    "add_to_balance",
    "append_ledger",
    "balance_of",
    "close_hold",
    "record_usage",
]


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
    query = select(accounts.c.balance).where(accounts.c.id == account_id)
    if for_update:  # a no-op on SQLite, where BEGIN IMMEDIATE already holds the write lock
        query = query.with_for_update()
    balance = (await conn.execute(query)).scalar_one_or_none()
    if balance is None:
        raise LookupError(f"no account with id {account_id}")
    return int(balance)


async def add_to_balance(conn: AsyncConnection, account_id: int, delta: int) -> int:
    """balance += delta, refused (LookupError) if the account is missing or would go negative."""
    row = (
        await conn.execute(
            update(accounts)
            .where(accounts.c.id == account_id, accounts.c.balance + delta >= 0)
            .values(balance=accounts.c.balance + delta)
            .returning(accounts.c.balance)
        )
    ).first()
    if row is None:
        raise LookupError(f"account {account_id} is missing or cannot cover {-delta} µcr")
    return int(row.balance)


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
        insert(ledger).values(
            account_id=account_id,
            kind=kind,
            amount=amount,
            balance_after=balance_after,
            ref=ref,
            note=note,
            created_at=now,
        )
    )


async def close_hold(
    conn: AsyncConnection, hold_id: str, from_status: str, to_status: str, now: datetime
) -> tuple[int, int] | None:
    """Move the hold from `from_status` to `to_status`; (account_id, amount) if this call did it."""
    row = (
        await conn.execute(
            update(holds)
            .where(holds.c.id == hold_id, holds.c.status == from_status)
            .values(status=to_status, closed_at=now)
            .returning(holds.c.account_id, holds.c.amount)
        )
    ).first()
    return (int(row.account_id), int(row.amount)) if row is not None else None


async def record_usage(
    conn: AsyncConnection, dialect: str, account_id: int, record: UsageRecord, cost: int, now: datetime
) -> None:
    """Write the usage row and add it to its `usage_hourly` bucket (the UTC hour of `now`), once."""
    # ON CONFLICT DO NOTHING: a duplicate request id must not roll back the money movement with it.
    counts = {
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "reasoning_tokens": record.reasoning_tokens,
        "cached_tokens": record.cached_tokens,
        "image_tokens": record.image_tokens,
        "cost": cost,
        "cached_saving": record.cached_saving,
    }
    values: dict[str, Any] = {
        "request_id": record.request_id,
        "account_id": account_id,
        "key_id": record.key_id,
        "model": record.model,
        **counts,
        "status": record.status,
        "latency_ms": record.latency_ms,
        "estimated": record.estimated,
        "created_at": now,
    }
    dialect_insert: Any = postgresql.insert if dialect == "postgresql" else sqlite.insert
    inserted = (
        await conn.execute(
            dialect_insert(usage)
            .values(values)
            .on_conflict_do_nothing(index_elements=["request_id"])
            .returning(usage.c.id)
        )
    ).first()
    if inserted is None:
        return
    # The hourly rollup moves in the same transaction as the row it sums, so the two always agree.
    counts["requests"] = 1
    statement = dialect_insert(usage_hourly).values(
        account_id=account_id,
        hour=now.replace(minute=0, second=0, microsecond=0),
        model=record.model,
        key_id=record.key_id or "",
        **counts,
    )
    await conn.execute(
        statement.on_conflict_do_update(
            index_elements=["account_id", "hour", "model", "key_id"],
            set_={name: usage_hourly.c[name] + statement.excluded[name] for name in counts},
        )
    )
