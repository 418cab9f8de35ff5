"""PostgreSQL: one statement, one round trip, on a raw asyncpg connection (the money hot path).

A credit hold and the settlement of an open hold are each ONE statement on PostgreSQL
(`billing.pg_statements`). One statement is a transaction of its own in autocommit, so it needs no
BEGIN and no COMMIT; through SQLAlchemy it still paid both round trips, the pool's checkout and a
greenlet switch per call: about 0.5 ms of CPU for a one-row statement where `fetch_row` takes 0.09 ms
and asyncpg alone 0.05 ms (`bench/pg_direct.py`).
`DirectStatements` runs such statements straight on asyncpg connections of its own:

    statement = Statement("UPDATE accounts SET balance = balance - :amount WHERE id = :account ...")
    row = await direct.fetch_row(statement, {"amount": 5, "account": 1})   # an asyncpg Record or None

Statements are written with `:name` parameters, as for SQLAlchemy's `text()`, and numbered once; asyncpg
prepares each on first use per connection and then only binds and executes it. `transaction()` lends one
connection for several statements in one transaction (group commit's batches).

Connections: made on first use, at most `size` at a time (more callers wait up to `pool_timeout_s`),
kept while they work. One idle for over `ping_idle_s` is pinged before use, as the SQLAlchemy pool does
(`storage/db.py`), so the first statement after a server restart runs on a fresh connection. A
connection is dropped, never reused, after an error that is not a plain statement error (an outage, a
timeout, a cancellation mid-statement: its state is unknown). The caller (`Database.fetch_row`) turns
outages into 503s as for every other database call.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, Protocol

__all__ = ["BatchSource", "DirectStatements", "RowSource", "Statement"]

_PARAM = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)(?!:)")  # as SQLAlchemy's `text()`: not `::type`


class Statement:
    """SQL with `:name` parameters, numbered once for asyncpg (`$1`, `$2`, ... in first-use order).
    As with `text()`, a `:name` inside a quoted literal is taken for a parameter too: write none."""

    __slots__ = ("names", "sql")

    def __init__(self, sql: str) -> None:
        names: list[str] = []

        def number(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in names:
                names.append(name)
            return f"${names.index(name) + 1}"

        self.sql = _PARAM.sub(number, sql)
        self.names = tuple(names)

    def args(self, values: dict[str, Any]) -> list[Any]:
        return [values[name] for name in self.names]


class RowSource(Protocol):
    """Where a one-row statement runs: autocommit (`Database.fetch_row`) or one transaction's connection
    (`Database.direct_transaction`)."""

    async def fetch_row(self, statement: Statement, values: dict[str, Any]) -> Any: ...


class BatchSource(RowSource, Protocol):
    """One transaction's connection (`Database.direct_transaction`): also runs one statement for many
    value sets, pipelined (one round trip for all of them, executed in order)."""

    async def fetch_many(self, statement: Statement, values: Sequence[dict[str, Any]]) -> list[Any]: ...


class _InTransaction:
    __slots__ = ("_conn",)

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    async def fetch_row(self, statement: Statement, values: dict[str, Any]) -> Any:
        return await self._conn.fetchrow(statement.sql, *statement.args(values))

    async def fetch_many(self, statement: Statement, values: Sequence[dict[str, Any]]) -> list[Any]:
        """Every row each execution returned, in execution order."""
        rows: list[Any] = await self._conn.fetchmany(statement.sql, [statement.args(v) for v in values])
        return rows


class DirectStatements:
    """A few raw asyncpg connections for one-statement autocommit work (see the module docstring)."""

    def __init__(
        self,
        connect_kwargs: Mapping[str, Any],
        *,
        size: int,
        pool_timeout_s: float,
        ping_idle_s: float,
    ) -> None:
        self._connect_kwargs = dict(connect_kwargs)
        self._size = size
        self._pool_timeout = pool_timeout_s
        self._ping_idle = ping_idle_s
        self._idle: list[tuple[Any, float]] = []  # (connection, when it was last used), newest last
        self._slots: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def fetch_row(self, statement: Statement, values: dict[str, Any]) -> Any:
        """The first row `statement` returns (an asyncpg `Record`), or None; driver errors pass through."""
        conn = await self._take()
        try:
            row = await conn.fetchrow(statement.sql, *statement.args(values))
        except BaseException as error:
            self._failed(conn, error)
            raise
        self._give_back(conn, keep=True)
        return row

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[BatchSource]:
        """Statements on one connection in one transaction: committed when the block exits normally,
        rolled back when it raises (driver errors pass through)."""
        conn = await self._take()
        try:
            async with conn.transaction():
                yield _InTransaction(conn)
        except BaseException as error:
            self._failed(conn, error)
            raise
        self._give_back(conn, keep=True)

    async def aclose(self) -> None:
        self.drop_idle()

    def drop_idle(self) -> None:
        """Close the idle connections (an outage was seen: they were likely cut too)."""
        idle, self._idle = self._idle, []
        for conn, _ in idle:
            conn.terminate()  # no round trip

    async def _take(self) -> Any:
        import asyncpg

        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # a new event loop (tests): connections of the old one are unusable
            self._idle, self._loop, self._slots = [], loop, asyncio.Semaphore(self._size)
        assert self._slots is not None
        if self._slots.locked():  # all `size` in use: wait for one, as long as a pool checkout would
            await asyncio.wait_for(self._slots.acquire(), self._pool_timeout)
        else:
            await self._slots.acquire()  # returns at once
        try:
            while self._idle:
                conn, last_used = self._idle.pop()
                if conn.is_closed():  # its socket was seen to close
                    continue
                if time.monotonic() - last_used < self._ping_idle:
                    return conn
                try:
                    await conn.execute("SELECT 1")
                    return conn
                except Exception:
                    conn.terminate()  # cut while idle: try the next, then a new connection
            return await asyncpg.connect(**self._connect_kwargs)
        except BaseException:
            self._slots.release()
            raise

    def _failed(self, conn: Any, error: BaseException) -> None:
        """Give back `conn` after `error`: kept after a plain statement error (a transaction's is rolled
        back), else closed, and after an outage the idle ones too (it cuts them all, as it invalidates
        SQLAlchemy's pool)."""
        keep = _is_statement_error(error)
        if not keep and not isinstance(error, asyncio.CancelledError):
            self.drop_idle()
        self._give_back(conn, keep=keep)

    def _give_back(self, conn: Any, *, keep: bool) -> None:
        if keep and not conn.is_closed():
            self._idle.append((conn, time.monotonic()))
        else:
            conn.terminate()
        assert self._slots is not None
        self._slots.release()


def _is_statement_error(error: BaseException) -> bool:
    """A statement the server refused (a constraint, bad SQL): the connection itself is fine."""
    import asyncpg

    return isinstance(error, asyncpg.PostgresError) and not isinstance(
        error, asyncpg.exceptions.PostgresConnectionError | asyncpg.exceptions.OperatorInterventionError
    )
