"""PostgreSQL: a credit hold, and the settlement of an open hold, each as ONE statement in ONE round trip.

`Ledger.reserve` and `Ledger.settle` run 3 and 6 statements on SQLite; on PostgreSQL each statement is a
network round trip plus its share of driver and SQLAlchemy CPU, so these chain the same steps in
data-modifying CTEs instead: the conditional UPDATE of the balance, then the rows that depend on it, all
reading the RETURNING of the step before. Same rows, same values as the step-by-step statements
(`billing.statements`), in one round trip. PostgreSQL runs every part of one statement on one snapshot
and the UPDATE's row lock covers the rest, so the money rules of `ledger.py` hold unchanged: a hold is
taken only while the balance covers it (and the key is live on its terms), a hold is closed once.

Ledger rows keep their order: the release row is written before the charge row (one INSERT ... SELECT,
UNION ALL in that order), so `balance_after` still reads as a running balance in id order.

One statement is a transaction of its own, so a request's hold or settlement runs in autocommit on a raw
asyncpg connection (`Database.fetch_row`, `storage.pg_direct`): no BEGIN, no COMMIT, no SQLAlchemy in
between; group commit runs a batch's one after the other in one transaction
(`Database.direct_transaction`). When one writes nothing (a hold refused, a hold no longer open) it
returns None and the caller works out why in a transaction of its own (`Ledger.reserve`,
`Ledger.settle`).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import datetime, timedelta
from typing import Any

from tokentill.billing.records import KeyTerms, UsageRecord
from tokentill.storage.pg_direct import BatchSource, RowSource, Statement

__all__ = [
    "lock_accounts",
    "release_many",
    "release_open",
    "reserve",
    "reserve_many",
    "reserve_values",
    "settle_many",
    "settle_open",
    "why_refused",
]

# Whether the hold's key (none: no key to check) is live on the terms the request was admitted under.
_KEY_LIVE = """(CAST(:key AS text) IS NULL
      OR EXISTS (SELECT 1 FROM api_keys WHERE api_keys.id = :key AND api_keys.revoked_at IS NULL
                 AND api_keys.rpm IS NOT DISTINCT FROM CAST(:rpm AS integer)
                 AND api_keys.tpm IS NOT DISTINCT FROM CAST(:tpm AS integer)
                 AND api_keys.max_concurrent IS NOT DISTINCT FROM CAST(:max_concurrent AS integer)))"""
# One statement for every hold, lone or pipelined (`reserve_many`); the request id comes back to tell
# which of a pipeline's holds were taken.
_RESERVE = Statement(
    f"""
WITH taken AS (
    UPDATE accounts SET balance = balance - :amount
    WHERE id = :account AND balance >= :amount AND {_KEY_LIVE}
    RETURNING balance, now() AS now
), held AS (
    INSERT INTO holds (id, account_id, key_id, amount, status, created_at, expires_at)
    SELECT :request, :account, :key_id, CAST(:amount AS bigint), 'open', now, now + CAST(:ttl AS interval)
    FROM taken
)
INSERT INTO ledger (account_id, kind, amount, balance_after, ref, note, created_at)
SELECT :account, 'hold', -CAST(:amount AS bigint), balance, :request, '', now FROM taken
RETURNING balance_after, created_at, ref
"""
)
# Every row locked, in id order (the count makes PostgreSQL read them all, where a fetch of the first row
# alone would lock only that one).
_LOCK_ACCOUNTS = Statement(
    "SELECT count(*) AS locked FROM (SELECT id FROM accounts WHERE id = ANY(CAST(:accounts AS integer[]))"
    " ORDER BY id FOR UPDATE) AS taken"
)
_WHY_REFUSED = Statement(
    f"SELECT (SELECT balance FROM accounts WHERE id = :account) AS balance, {_KEY_LIVE} AS key_live"
)

_COUNTS = ("prompt_tokens", "completion_tokens", "reasoning_tokens", "cached_tokens", "image_tokens")
# Parameters in a SELECT list have no type of their own (PostgreSQL would take them as text).
_TYPED_COUNTS = ", ".join(f"CAST(:{c} AS integer)" for c in _COUNTS)
_CLOSE = f"""
WITH closed AS (
    UPDATE holds SET status = '{{to_status}}', closed_at = :now
    WHERE id = :hold AND status = 'open'
    RETURNING account_id, amount, LEAST(amount, CAST(:cost AS bigint)) AS charge
), paid AS (
    UPDATE accounts SET balance = accounts.balance + closed.amount - closed.charge
    FROM closed WHERE accounts.id = closed.account_id
    RETURNING accounts.balance, closed.account_id, closed.amount, closed.charge
), moved AS (
    INSERT INTO ledger (account_id, kind, amount, balance_after, ref, note, created_at)
    SELECT account_id, 'release', amount, balance + charge, :hold, '', :now FROM paid{{charge_row}}
), used AS (
    INSERT INTO usage (request_id, account_id, key_id, model, {", ".join(_COUNTS)}, cost, cached_saving,
                       status, latency_ms, estimated, created_at)
    SELECT :request_id, account_id, :key_id, :model, {_TYPED_COUNTS}, charge,
           CAST(:cached_saving AS bigint), CAST(:status AS integer), CAST(:latency_ms AS integer),
           CAST(:estimated AS boolean), :now FROM paid{{usage_filter}}
    ON CONFLICT (request_id) DO NOTHING
    RETURNING account_id, cost
), bucket AS (
    INSERT INTO usage_hourly (account_id, hour, model, key_id, requests, {", ".join(_COUNTS)}, cost,
                              cached_saving)
    SELECT account_id, CAST(:hour AS timestamptz), :model, :bucket_key, 1, {_TYPED_COUNTS}, cost,
           CAST(:cached_saving AS bigint) FROM used
    ON CONFLICT (account_id, hour, model, key_id) DO UPDATE SET
        requests = usage_hourly.requests + 1,
        {", ".join(f"{c} = usage_hourly.{c} + excluded.{c}" for c in (*_COUNTS, "cost", "cached_saving"))}
)
SELECT balance, account_id, amount, charge, CAST(:hold AS text) AS hold FROM paid
"""
_CHARGE_ROW = """
    UNION ALL
    SELECT account_id, 'charge', -charge, balance, :hold, '', :now FROM paid"""
# A settlement: the release and charge rows and always a usage row. A release (the request failed): the
# whole hold back, one ledger row, a usage row (cost 0) only when there is one to record.
_SETTLE = Statement(_CLOSE.format(to_status="settled", charge_row=_CHARGE_ROW, usage_filter=""))
_RELEASE = Statement(
    _CLOSE.format(to_status="released", charge_row="", usage_filter=" WHERE CAST(:record AS boolean)")
)


async def reserve(
    source: RowSource,
    *,
    account_id: int,
    key_id: str | None,
    request_id: str,
    amount: int,
    ttl: timedelta,
    key: KeyTerms | None,
) -> tuple[int, datetime] | None:
    """Take `amount` from the balance if it covers it (and `key` is live on its terms), writing the open
    hold (expiring `ttl` after the database's `now()`) and its 'hold' ledger row: (balance after, now),
    or None when refused (nothing written)."""
    values = reserve_values(
        account_id=account_id, key_id=key_id, request_id=request_id, amount=amount, ttl=ttl, key=key
    )
    row = await source.fetch_row(_RESERVE, values)
    return (int(row["balance_after"]), row["created_at"]) if row is not None else None


def reserve_values(
    *, account_id: int, key_id: str | None, request_id: str, amount: int, ttl: timedelta, key: KeyTerms | None
) -> dict[str, Any]:
    """The parameters of one hold, for `reserve` or `reserve_many`."""
    return {
        "amount": amount,
        "account": account_id,
        "request": request_id,
        "key_id": key_id,
        "ttl": ttl,
        **_key_values(key),
    }


def _key_values(key: KeyTerms | None) -> dict[str, Any]:
    """The parameters of `_KEY_LIVE`: the key and the terms it must still have (all None: no key)."""
    if key is None:
        return {"key": None, "rpm": None, "tpm": None, "max_concurrent": None}
    return {"key": key.key_id, "rpm": key.rpm, "tpm": key.tpm, "max_concurrent": key.max_concurrent}


async def reserve_many(
    source: BatchSource, holds: Sequence[dict[str, Any]]
) -> list[tuple[int, datetime] | None]:
    """`reserve` for each of `holds` (`reserve_values`), in order, pipelined: for each, (balance
    after, now) or None when refused."""
    rows = await source.fetch_many(_RESERVE, holds)
    taken = _aligned(rows, "ref", [values["request"] for values in holds])
    return [(int(row["balance_after"]), row["created_at"]) if row is not None else None for row in taken]


async def settle_many(
    source: BatchSource, settlements: Sequence[tuple[str, int, UsageRecord]], now: datetime
) -> list[tuple[int, int, int] | None]:
    """`settle_open` for each (hold id, cost, usage), in order, pipelined."""
    values = [_close_values(hold_id, cost, usage, now) for hold_id, cost, usage in settlements]
    rows = _aligned(await source.fetch_many(_SETTLE, values), "hold", [s[0] for s in settlements])
    return [(int(r["balance"]), int(r["amount"]), int(r["charge"])) if r is not None else None for r in rows]


async def release_many(
    source: BatchSource, releases: Sequence[tuple[str, UsageRecord | None]], now: datetime
) -> list[int | None]:
    """`release_open` for each (hold id, usage or None), in order, pipelined."""
    values = [
        {**_close_values(hold_id, 0, usage, now), "record": usage is not None} for hold_id, usage in releases
    ]
    rows = _aligned(await source.fetch_many(_RELEASE, values), "hold", [r[0] for r in releases])
    return [int(row["balance"]) if row is not None else None for row in rows]


def _aligned(rows: list[Any], column: str, ids: list[str]) -> list[Any]:
    """The row of each of `ids` (by `column`), or None: executions that wrote nothing return no row. The
    same id twice (a hold settled twice in one batch) takes its rows in execution order."""
    by_id: dict[str, list[Any]] = {}
    for row in rows:
        by_id.setdefault(row[column], []).append(row)
    return [found.pop(0) if (found := by_id.get(i)) else None for i in ids]


async def settle_open(
    source: RowSource, hold_id: str, cost: int, usage: UsageRecord, now: datetime
) -> tuple[int, int, int] | None:
    """Settle hold `hold_id` if it is open: close it, charge min(cost, held), give back the rest, write
    the release and charge ledger rows, the usage row (once per request id) and its hourly bucket.
    (balance after, amount held, charge), or None when the hold was not open (nothing written)."""
    row = await source.fetch_row(_SETTLE, _close_values(hold_id, cost, usage, now))
    return (int(row["balance"]), int(row["amount"]), int(row["charge"])) if row is not None else None


async def release_open(
    source: RowSource, hold_id: str, usage: UsageRecord | None, now: datetime
) -> int | None:
    """Release hold `hold_id` if it is open (the request failed): the whole amount back, its 'release'
    ledger row, and `usage` (if given) recorded at cost 0 once per request id. The balance after, or
    None when the hold was not open (nothing written)."""
    values = _close_values(hold_id, 0, usage, now)
    row = await source.fetch_row(_RELEASE, {**values, "record": usage is not None})
    return int(row["balance"]) if row is not None else None


def _close_values(hold_id: str, cost: int, usage: UsageRecord | None, now: datetime) -> dict[str, Any]:
    values: dict[str, Any] = {
        "hold": hold_id,
        "cost": cost,
        "now": now,
        "hour": now.replace(minute=0, second=0, microsecond=0),
    }
    if usage is None:  # nothing to record (a release without usage): typed placeholders, no row
        return {**values, "request_id": None, "key_id": None, "bucket_key": "", "model": None,
                "cached_saving": 0, "status": 0, "latency_ms": 0, "estimated": False,
                **dict.fromkeys(_COUNTS, 0)}  # fmt: skip
    return {
        **values,
        "request_id": usage.request_id,
        "key_id": usage.key_id,
        "bucket_key": usage.key_id or "",
        "model": usage.model,
        "cached_saving": usage.cached_saving,
        "status": usage.status,
        "latency_ms": usage.latency_ms,
        "estimated": usage.estimated,
        **{c: getattr(usage, c) for c in _COUNTS},
    }


async def why_refused(source: RowSource, account_id: int, key: KeyTerms | None) -> tuple[int | None, bool]:
    """After `reserve` returned None, in the same transaction: the account's balance (None: no such
    account) and whether `key` is live on its terms (True without a key)."""
    row = await source.fetch_row(_WHY_REFUSED, {"account": account_id, **_key_values(key)})
    return (None if row["balance"] is None else int(row["balance"])), bool(row["key_live"])


async def lock_accounts(source: RowSource, account_ids: Collection[int]) -> None:
    """Lock the rows of `account_ids` until the transaction ends, in id order: two transactions that
    each touch several accounts, one statement per request, then cannot deadlock each other."""
    await source.fetch_row(_LOCK_ACCOUNTS, {"accounts": sorted(account_ids)})
