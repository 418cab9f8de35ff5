"""SQLite: a credit hold and the settlement of an open hold on the writer thread's own sqlite3 connection.

Group commit runs a batch's holds and settlements on SQLite as one transaction on one thread
(`Database.run_write`). Through SQLAlchemy each of its statements cost far more CPU than SQLite took
to run it (statement setup, type processing, result wrapping: about 1 ms per lone hold or settlement);
these are the same steps as `Ledger`'s (`billing.statements`) written for the sqlite3 module, run as
plain prepared statements (the module caches them per connection). Same rows, same values, same order:
timestamps are stored as SQLAlchemy's SQLite dialect stores them (`YYYY-MM-DD HH:MM:SS.ffffff`, UTC),
booleans as 0/1, so `Ledger`, the reports and the sweeper read these rows exactly as their own.

Each function runs inside the caller's transaction (BEGIN IMMEDIATE: the file's write lock is held, so
a balance read and the write that depends on it cannot interleave with another writer's).
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from typing import Any

from tokentill.billing.records import KeyTerms, UsageRecord
from tokentill.billing.statements import usage_bucket, usage_values
from tokentill.storage.schema import USAGE_COUNTERS, usage, usage_hourly

__all__ = ["release_open", "reserve", "settle_open", "stored_time", "why_refused"]

_KEY_LIVE = """EXISTS (SELECT 1 FROM api_keys WHERE id = :key AND revoked_at IS NULL AND rpm IS :rpm
    AND tpm IS :tpm AND max_concurrent IS :max_concurrent)"""
_TAKE = "UPDATE accounts SET balance = balance - :amount WHERE id = :account AND balance >= :amount"
_TAKE_PLAIN = f"{_TAKE} RETURNING balance"
_TAKE_FOR_KEY = f"{_TAKE} AND {_KEY_LIVE} RETURNING balance"
_OPEN_HOLD = """INSERT INTO holds (id, account_id, key_id, amount, status, created_at, expires_at)
    VALUES (:request, :account, :key_id, :amount, 'open', :now, :expires)"""
_LEDGER_ROW = """INSERT INTO ledger (account_id, kind, amount, balance_after, ref, note, created_at)
    VALUES (?, ?, ?, ?, ?, '', ?)"""
_WHY_REFUSED = f"SELECT (SELECT balance FROM accounts WHERE id = :account), :key IS NULL OR {_KEY_LIVE}"
_CLOSE_HOLD = """UPDATE holds SET status = :to, closed_at = :now WHERE id = :hold AND status = 'open'
    RETURNING account_id, amount"""
_PAY_BACK = "UPDATE accounts SET balance = balance + :back WHERE id = :account RETURNING balance"
_USAGE_COLUMNS = tuple(c.name for c in usage.c if c.name != "id")
_USAGE_ROW = f"""INSERT INTO usage ({", ".join(_USAGE_COLUMNS)})
    VALUES ({", ".join(f":{c}" for c in _USAGE_COLUMNS)}) ON CONFLICT (request_id) DO NOTHING RETURNING id"""
_BUCKET_COLUMNS = tuple(c.name for c in usage_hourly.c)
_BUCKET = f"""INSERT INTO usage_hourly ({", ".join(_BUCKET_COLUMNS)})
    VALUES ({", ".join(f":{c}" for c in _BUCKET_COLUMNS)})
    ON CONFLICT (account_id, hour, model, key_id) DO UPDATE SET
    {", ".join(f"{c} = {c} + excluded.{c}" for c in USAGE_COUNTERS)}"""


def stored_time(moment: datetime) -> str:
    """`moment` as SQLAlchemy stores a UTC datetime in SQLite (naive UTC text, microseconds)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


def _key_values(key: KeyTerms | None) -> dict[str, Any]:
    if key is None:
        return {"key": None, "rpm": None, "tpm": None, "max_concurrent": None}
    return {"key": key.key_id, "rpm": key.rpm, "tpm": key.tpm, "max_concurrent": key.max_concurrent}


def reserve(
    conn: sqlite3.Connection,
    *,
    account_id: int,
    key_id: str | None,
    request_id: str,
    amount: int,
    now: datetime,
    expires_at: datetime,
    key: KeyTerms | None,
) -> int | None:
    """Take `amount` if the balance covers it (and `key` is live on its terms), writing the open hold
    and its 'hold' ledger row: the balance after, or None when refused (nothing written)."""
    values = {"amount": amount, "account": account_id, **_key_values(key)}
    row = conn.execute(_TAKE_PLAIN if key is None else _TAKE_FOR_KEY, values).fetchone()
    if row is None:
        return None
    balance = int(row[0])
    at = stored_time(now)
    hold = {"request": request_id, "account": account_id, "key_id": key_id, "amount": amount, "now": at}
    conn.execute(_OPEN_HOLD, {**hold, "expires": stored_time(expires_at)})
    conn.execute(_LEDGER_ROW, (account_id, "hold", -amount, balance, request_id, at))
    return balance


def why_refused(conn: sqlite3.Connection, account_id: int, key: KeyTerms | None) -> tuple[int | None, bool]:
    """After `reserve` returned None, in the same transaction: the account's balance (None: no such
    account) and whether `key` is live on its terms (True without a key)."""
    balance, key_live = conn.execute(_WHY_REFUSED, {"account": account_id, **_key_values(key)}).fetchone()
    return (None if balance is None else int(balance)), bool(key_live)


def settle_open(
    conn: sqlite3.Connection, hold_id: str, cost: int, usage: UsageRecord, now: datetime
) -> tuple[int, int, int] | None:
    """Settle hold `hold_id` if it is open: close it, charge min(cost, held), give back the rest, write
    the release and charge ledger rows, the usage row (once per request id) and its hourly bucket.
    (balance after, amount held, charge), or None when the hold was not open (nothing written)."""
    at = stored_time(now)
    closed = conn.execute(_CLOSE_HOLD, {"hold": hold_id, "to": "settled", "now": at}).fetchone()
    if closed is None:
        return None
    account_id, amount = int(closed[0]), int(closed[1])
    charge = min(cost, amount)
    (balance,) = conn.execute(_PAY_BACK, {"back": amount - charge, "account": account_id}).fetchone()
    balance = int(balance)
    conn.executemany(
        _LEDGER_ROW,
        (
            (account_id, "release", amount, balance + charge, hold_id, at),
            (account_id, "charge", -charge, balance, hold_id, at),
        ),
    )
    _record_usage(conn, account_id, usage, charge, now)
    return balance, amount, charge


def release_open(
    conn: sqlite3.Connection, hold_id: str, usage: UsageRecord | None, now: datetime
) -> int | None:
    """Release hold `hold_id` if it is open (the request failed): the whole amount back, its 'release'
    ledger row, and `usage` (if given) recorded at cost 0 once per request id. The balance after, or
    None when the hold was not open (nothing written)."""
    at = stored_time(now)
    closed = conn.execute(_CLOSE_HOLD, {"hold": hold_id, "to": "released", "now": at}).fetchone()
    if closed is None:
        return None
    account_id, amount = int(closed[0]), int(closed[1])
    (balance,) = conn.execute(_PAY_BACK, {"back": amount, "account": account_id}).fetchone()
    conn.execute(_LEDGER_ROW, (account_id, "release", amount, int(balance), hold_id, at))
    if usage is not None:
        _record_usage(conn, account_id, usage, 0, now)
    return int(balance)


def _record_usage(
    conn: sqlite3.Connection, account_id: int, usage: UsageRecord, cost: int, now: datetime
) -> None:
    """The usage row of `usage` charged `cost` and its hourly bucket, unless the request id has one:
    `Ledger`'s values (`statements.usage_values`, `usage_bucket`) in SQLite's stored form."""
    row = usage_values(account_id, usage, cost, now)
    stored = {**row, "estimated": int(row["estimated"]), "created_at": stored_time(row["created_at"])}
    if conn.execute(_USAGE_ROW, stored).fetchone() is None:  # a duplicate request id: written before
        return
    bucket = usage_bucket(row)
    conn.execute(_BUCKET, {**bucket, "hour": stored_time(bucket["hour"])})
