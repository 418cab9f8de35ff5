"""Usage reports for the console and `/v1/usage`: sums over time, model, key and account, and the log.

Sums read `usage_hourly` (the usage rows summed per account, UTC hour, model and key, kept in step with
`usage` inside each settlement's transaction), so a 30-day chart reads at most 720 rows per model and key
of the account however many requests it made. The request log pages through `usage` itself, newest
first, on the `(account_id, id)` index, with an opaque cursor.

Query text is parsed here too (`parse_usage_query`, `decode_cursor`), not in `api/`, so the JSON API and
the console refuse the same inputs with the same 400 (`InvalidRequest` with `param`).
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, fields
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy import ColumnElement, func, literal_column, select

from tokentill.billing.records import UsageRow
from tokentill.billing.statements import usage_row_from
from tokentill.errors import InvalidRequest
from tokentill.storage.db import Database
from tokentill.storage.schema import USAGE_COUNTERS, accounts, usage, usage_hourly

__all__ = [
    "ACCOUNT_GROUPS",
    "DEFAULT_DAYS",
    "MAX_DAYS",
    "MAX_HOUR_DAYS",
    "MAX_PAGE",
    "OPERATOR_GROUPS",
    "RequestPage",
    "UsageBucket",
    "UsageQuery",
    "UsageReports",
    "UsageTotals",
    "decode_cursor",
    "encode_cursor",
    "parse_usage_query",
]

ACCOUNT_GROUPS = ("day", "hour", "model", "key")
"""What a key may group its own account's usage by."""
OPERATOR_GROUPS = (*ACCOUNT_GROUPS, "account")
"""What the operator may group usage across accounts by."""
DEFAULT_DAYS = 30
MAX_DAYS = 366
"""Longest range a query may ask for (day / model / key grouping)."""
MAX_HOUR_DAYS = 31
"""Longest range with hour grouping: at most 744 time buckets."""
MAX_PAGE = 500
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_CURSOR_PREFIX = "u1:"


@dataclass(frozen=True)
class UsageTotals:
    """Summed counters; `cost` is µcr. `completion_tokens` includes `reasoning_tokens` (o1 billing)."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    cached_tokens: int = 0
    image_tokens: int = 0
    cost: int = 0
    cached_saving: int = 0  # µcr: what cached prompt tokens did not cost (the order is USAGE_COUNTERS')

    def __add__(self, other: UsageTotals) -> UsageTotals:
        return UsageTotals(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


@dataclass(frozen=True)
class UsageBucket:
    """One row of a report: `group` maps each group_by field to its value, in the order asked
    (`day` "2026-12-01", `hour` "2026-12-01T13:00:00Z", `model`, `key` (None for keyless rows),
    `account` name)."""

    group: dict[str, str | None]
    totals: UsageTotals


@dataclass(frozen=True)
class UsageQuery:
    """A validated report request: UTC dates, `end` inclusive, group fields distinct, at most one of
    day/hour."""

    start: date
    end: date
    group_by: tuple[str, ...]

    @property
    def window(self) -> tuple[datetime, datetime]:
        """[start 00:00 UTC, the day after end 00:00 UTC)."""
        return (
            datetime.combine(self.start, time(), UTC),
            datetime.combine(self.end + timedelta(days=1), time(), UTC),
        )


@dataclass(frozen=True)
class RequestPage:
    """A page of the request log, newest first; `next` is the cursor of the following page, or None."""

    rows: list[UsageRow]
    next: str | None


def _parse_date(text: str, param: str) -> date:
    if not _DATE.fullmatch(text):
        raise InvalidRequest(
            f"Invalid '{param}': expected a date as YYYY-MM-DD, got {text[:32]!r}.", param=param
        )
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise InvalidRequest(f"Invalid '{param}': {text!r} is not a calendar date.", param=param) from None


def parse_usage_query(
    start: str | None,
    end: str | None,
    group_by: str | None,
    *,
    today: date,
    allowed: tuple[str, ...] = ACCOUNT_GROUPS,
) -> UsageQuery:
    """Validate query-string values into a `UsageQuery`; `InvalidRequest` (400, `param` set) otherwise.

    Defaults: `end` today (UTC), `start` 29 days before `end` (30 days), `group_by` "day". Refuses an
    `end` before `start`, a range over `MAX_DAYS` (`MAX_HOUR_DAYS` when grouping by hour), unknown or
    repeated group fields, and day together with hour.
    """
    end_day = _parse_date(end, "end") if end is not None else today
    start_day = (
        _parse_date(start, "start") if start is not None else end_day - timedelta(days=DEFAULT_DAYS - 1)
    )
    names = tuple(part.strip() for part in (group_by if group_by is not None else "day").split(","))
    for name in names:
        if name not in allowed:
            raise InvalidRequest(
                f"Invalid 'group_by': {name[:32]!r} is not one of {', '.join(allowed)}.", param="group_by"
            )
    if len(set(names)) != len(names) or {"day", "hour"} <= set(names):
        raise InvalidRequest(
            "Invalid 'group_by': give each field once, and day or hour, not both.", param="group_by"
        )
    if end_day < start_day:
        raise InvalidRequest("Invalid 'end': it is before 'start'.", param="end")
    days = (end_day - start_day).days + 1
    cap = MAX_HOUR_DAYS if "hour" in names else MAX_DAYS
    if days > cap:
        unit = " when grouping by hour" if "hour" in names else ""
        raise InvalidRequest(
            f"Invalid 'start': the range is {days} days; at most {cap} days are allowed{unit}.", param="start"
        )
    return UsageQuery(start=start_day, end=end_day, group_by=names)


def encode_cursor(usage_id: int) -> str:
    return base64.urlsafe_b64encode(f"{_CURSOR_PREFIX}{usage_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    """The usage id inside a cursor from `RequestPage.next`; `InvalidRequest` (param `before`) otherwise."""
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        text = ""
    digits = text.removeprefix(_CURSOR_PREFIX)
    # Ids are BIGINTs: 19 digits can still exceed one, which the database refuses (a 500, found by
    # schemathesis), so the value is bounded too.
    if (
        not text.startswith(_CURSOR_PREFIX)
        or not digits.isdigit()
        or len(digits) > 19
        or int(digits) > 2**63 - 1
    ):
        raise InvalidRequest("Invalid 'before': not a cursor this API returned.", param="before")
    return int(digits)


class UsageReports:
    """Read-only usage queries over one `Database`."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def _group_column(self, name: str) -> ColumnElement[Any]:
        postgres = self._db.dialect == "postgresql"
        if name == "day":
            if postgres:
                return literal_column("to_char(usage_hourly.hour AT TIME ZONE 'UTC', 'YYYY-MM-DD')")
            return func.substr(usage_hourly.c.hour, 1, 10)
        if name == "hour":
            if postgres:
                return literal_column(
                    "to_char(usage_hourly.hour AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24\":00:00Z\"')"
                )
            return literal_column(
                "substr(usage_hourly.hour, 1, 10) || 'T' || substr(usage_hourly.hour, 12, 2) || ':00:00Z'"
            )
        if name == "model":
            return usage_hourly.c.model
        if name == "key":
            return usage_hourly.c.key_id
        if name == "account":
            return accounts.c.name
        raise ValueError(f"unknown group field {name!r}")

    async def _report(
        self, query: UsageQuery, account_id: int | None
    ) -> tuple[list[UsageBucket], UsageTotals]:
        groups = [self._group_column(name).label(f"g{i}") for i, name in enumerate(query.group_by)]
        sums = [func.sum(usage_hourly.c[name]).label(name) for name in USAGE_COUNTERS]
        since, until = query.window
        statement = select(*groups, *sums).where(usage_hourly.c.hour >= since, usage_hourly.c.hour < until)
        if account_id is not None:
            statement = statement.where(usage_hourly.c.account_id == account_id)
        if "account" in query.group_by:
            statement = statement.join(accounts, accounts.c.id == usage_hourly.c.account_id)
        statement = statement.group_by(*groups).order_by(*groups)
        async with self._db.read() as conn:
            rows = (await conn.execute(statement)).all()
        buckets = []
        total = UsageTotals()
        for row in rows:
            totals = UsageTotals(*(int(getattr(row, name)) for name in USAGE_COUNTERS))
            group = {name: _group_value(name, row[i]) for i, name in enumerate(query.group_by)}
            buckets.append(UsageBucket(group=group, totals=totals))
            total += totals
        return buckets, total

    async def usage(self, account_id: int, query: UsageQuery) -> tuple[list[UsageBucket], UsageTotals]:
        """One account's usage in `query`'s window, one bucket per distinct group (ordered by the group
        fields; buckets without requests are absent), and the window's total."""
        return await self._report(query, account_id)

    async def operator_usage(self, query: UsageQuery) -> tuple[list[UsageBucket], UsageTotals]:
        """Usage across every account (`query` may group by `account`, from `OPERATOR_GROUPS`)."""
        return await self._report(query, None)

    async def requests(self, account_id: int, *, limit: int = 50, before: str | None = None) -> RequestPage:
        """The account's request log, newest first: `limit` (1..MAX_PAGE) rows older than cursor `before`.

        `InvalidRequest` for a bad cursor; a cursor from another account only ever selects this account's
        rows (it is a position, not a permission).
        """
        return await self._page(limit, before, usage.c.account_id == account_id)

    async def operator_requests(
        self, *, limit: int = 50, before: str | None = None, failed_only: bool = False
    ) -> RequestPage:
        """Every account's request log, newest first (`failed_only`: HTTP status >= 400, the operator's
        "last errors"); paged like `requests`."""
        return await self._page(limit, before, usage.c.status >= 400 if failed_only else None)

    async def _page(self, limit: int, before: str | None, where: ColumnElement[bool] | None) -> RequestPage:
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidRequest(f"Invalid 'limit': give 1 to {MAX_PAGE}.", param="limit")
        statement = (
            select(usage, accounts.c.name.label("account_name"))
            .join(accounts, accounts.c.id == usage.c.account_id)
            .order_by(usage.c.id.desc())
            .limit(limit + 1)
        )
        if where is not None:
            statement = statement.where(where)
        if before is not None:
            statement = statement.where(usage.c.id < decode_cursor(before))
        async with self._db.read() as conn:
            rows = (await conn.execute(statement)).all()
        more = len(rows) > limit
        rows = rows[:limit]
        return RequestPage(
            rows=[usage_row_from(r) for r in rows], next=encode_cursor(rows[-1].id) if more else None
        )


def _group_value(name: str, value: Any) -> str | None:
    if name == "key":
        return str(value) or None
    return None if value is None else str(value)
