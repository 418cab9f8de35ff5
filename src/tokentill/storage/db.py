"""Open the database: an async SQLAlchemy engine with safe SQLite settings, migrated to head.

`open_database(url)` is the only entry point. It accepts `sqlite+aiosqlite:///path` and
`postgresql+asyncpg://...` URLs, and returns a `Database` whose `begin()` opens a *write* transaction and
`read()` a read-only one:

* SQLite: several processes (`--workers`) may share the file. Every connection gets WAL, a 10 s busy
  timeout, foreign keys and synchronous=NORMAL. The driver's own BEGIN handling is switched off and a
  write transaction starts with `BEGIN IMMEDIATE`, so it takes the write lock *before* its first read and
  two check-then-write transactions cannot interleave. `read()` uses a plain deferred `BEGIN`
  (a WAL snapshot that does not queue behind writers).
  `run_write(fn)` / `run_read(fn)` run a synchronous function on this database's own writer thread and
  connection instead (one thread hand-off per transaction; aiosqlite takes three or four per statement):
  the hot path's group-committed batches (on the sqlite3 connection itself) and its balance reads.
* PostgreSQL: READ COMMITTED; money code relies on conditional `UPDATE ... WHERE balance >= :x`, which
  PostgreSQL re-checks after waiting on the row lock, so it needs no stronger isolation. `read()` is
  REPEATABLE READ so a report (an audit) sees one snapshot. `run_read(fn)` runs one read statement in
  autocommit (no BEGIN/COMMIT round trips); `fetch_row(statement, values)` one statement in autocommit
  straight on asyncpg and `direct_transaction()` several in one transaction (`storage.pg_direct`: the hot
  path's one-statement holds and settlements, one round trip each).

An outage is an answer, not a bug: a connection that cannot be made or is lost (refused, reset, timed out,
the pool exhausted, the server shutting down) inside `begin()` or `read()` is raised as
`errors.ServiceUnavailable` (503 `service_unavailable`, Retry-After), chained to the driver's exception, and
logged here once as one line. Other driver errors (constraint violations, SQL bugs) pass through as they
are. The pool pings a connection before lending it, so the first request after a restore reconnects.

Migrations are Alembic revisions shipped inside the package (`storage/migrations`), run to head in one
transaction on every open; a second open is a no-op. On PostgreSQL the run holds a transaction-scoped
advisory lock, so replicas started together migrate one after the other.

Only `tokentill serve` and `tokentill init` create a database (`create=True`). The other commands open
with `create=False`, which raises `DatabaseMissing` for a database tokentill never set up (a SQLite file
that does not exist, a PostgreSQL database without tokentill's tables) and creates nothing, so a command
pointed at the wrong data folder says so instead of working on a new, empty database.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, closing, contextmanager, suppress
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, event, exc, inspect, text
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry, StaticPool

from tokentill.errors import ServiceUnavailable
from tokentill.storage.pg_direct import BatchSource, DirectStatements, Statement
from tokentill.storage.schema import utcnow

__all__ = ["RETRY_AFTER_S", "Database", "DatabaseMissing", "describe_url", "is_outage", "open_database"]

logger = logging.getLogger(__name__)
T = TypeVar("T")
C = TypeVar("C")  # a connection: SQLAlchemy's or sqlite3's

_MIGRATIONS = Path(__file__).resolve().parent / "migrations"
# Any fixed 64-bit number; only tokentill's migration runs take it.
_MIGRATION_LOCK_KEY = 0x746F6B656E74696C  # "tokentil"
_ADVISORY_LOCK = text("SELECT pg_advisory_xact_lock(:key)")
_BEGIN_OPTION = "tokentill_sqlite_begin"
_VERSION_TABLE = "alembic_version"  # Alembic's own table: present once tokentill has set a database up
_SQLITE_BUSY_S = 10.0  # sqlite3.connect's own wait for a lock, before the busy_timeout pragma applies
_SQLITE_PRAGMAS = (
    "PRAGMA busy_timeout = 10000",  # first, so that the WAL switch itself waits for other processes
    "PRAGMA journal_mode = WAL",
    "PRAGMA foreign_keys = ON",
    "PRAGMA synchronous = NORMAL",
)
_NOW = text("SELECT now()")
RETRY_AFTER_S = 2  # what a 503 tells the client to wait: a restarting server is back in seconds
# SQLite errors that mean "the file cannot be used now", not "the statement is wrong".
_SQLITE_OUTAGES = ("database is locked", "unable to open database", "disk i/o error", "database is full")


def _asyncpg_outages() -> tuple[type[BaseException], ...]:
    import asyncpg

    return (
        asyncpg.exceptions.PostgresConnectionError,  # includes ConnectionDoesNotExistError
        asyncpg.exceptions.OperatorInterventionError,  # admin/crash shutdown, cannot connect now
        asyncpg.exceptions.InsufficientResourcesError,  # too many connections, disk full
    )


def is_outage(error: BaseException) -> bool:
    """Whether `error` says the database cannot be reached (retrying later may succeed), rather than
    that a statement is wrong. Already-translated `ServiceUnavailable` counts too."""
    if isinstance(error, ServiceUnavailable | OSError | TimeoutError | exc.TimeoutError):
        return True  # exc.TimeoutError: no pooled connection came free within the pool timeout
    if isinstance(error, exc.DBAPIError):
        if error.connection_invalidated or isinstance(error, exc.InterfaceError):
            return True
        cause = error.orig.__cause__ if error.orig is not None else None
        if cause is not None and is_outage(cause):
            return True
        if isinstance(error, exc.OperationalError):
            if isinstance(error.orig, sqlite3.OperationalError):
                return str(error.orig).lower().startswith(_SQLITE_OUTAGES)
            return True
        return False
    return isinstance(error, _asyncpg_outages())


class DatabaseMissing(Exception):
    """`open_database(url, create=False)` found no tokentill database at `url` (an operator error)."""

    def __init__(self, url: str) -> None:
        super().__init__(f"no tokentill database at {describe_url(url)}")
        self.url = url


def describe_url(url: str) -> str:
    """The database as an operator recognises it: a SQLite file's path, else the URL without password."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database:
        return str(Path(parsed.database).resolve())
    return parsed.render_as_string(hide_password=True)


class Database:
    """An opened, migrated database. Create with `open_database()`; close with `aclose()`.

    `engine.begin()` is a write transaction too (BEGIN IMMEDIATE on SQLite); `read()` is for read-only
    work that should not queue behind writers on SQLite.
    """

    def __init__(
        self, engine: AsyncEngine, direct: DirectStatements | None = None, outages: Outages | None = None
    ) -> None:
        """`direct`: PostgreSQL's raw connections for `fetch_row`; `outages`: the count its pool's
        checkout reads (`open_database` makes both)."""
        self.engine = engine
        self._direct = direct
        self._outages = outages or Outages()
        self.dialect: str = engine.dialect.name
        self._down = False  # the last transaction failed for an outage (logged once until it recovers)
        self._write_lock: asyncio.Lock | None = None  # SQLite: this process's writers, one at a time
        self._write_lock_loop: asyncio.AbstractEventLoop | None = None
        self._sync_writer: _SqliteWriter | None = None  # SQLite: `run_write`'s thread, made on first use
        self._autocommit_engine = engine.execution_options(isolation_level="AUTOCOMMIT")  # `run_read`
        # Reads see one snapshot: a deferred BEGIN in WAL mode on SQLite, REPEATABLE READ on PostgreSQL
        # (free of serialization failures for read-only transactions).
        self._read_engine = (
            engine.execution_options(**{_BEGIN_OPTION: "BEGIN"})
            if self.dialect == "sqlite"
            else engine.execution_options(isolation_level="REPEATABLE READ")
        )

    @asynccontextmanager
    async def begin(self) -> AsyncIterator[AsyncConnection]:
        """A write transaction: committed when the block exits normally, rolled back on an exception.

        On SQLite the writers of this process queue on an asyncio lock first: SQLite admits one writer
        at a time anyway, and a writer that finds the file locked waits in SQLite's busy handler, which
        sleeps in steps of up to 100 ms (under 8 concurrent requests that gave a p95 near one second).
        Other processes sharing the file (`--workers`) still meet at the busy timeout.
        """
        with self._outage_is_503():
            if self.dialect != "sqlite":
                async with self.engine.begin() as conn:
                    yield conn
                return
            async with self._sqlite_write_lock():
                async with self.engine.begin() as conn:
                    yield conn

    async def run_write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """SQLite only: `fn(raw)` on this database's own writer thread and sqlite3 connection, in one
        write transaction (BEGIN IMMEDIATE before `fn`, COMMIT after it, ROLLBACK when it raises), after
        this process's other writers (the same asyncio lock as `begin`). The whole transaction is one
        hand-off to the thread (aiosqlite takes three or four per statement: cursor, execute, fetch,
        close), and its statements run on sqlite3 itself: through SQLAlchemy each cost more CPU than
        SQLite took to run it (`billing.sqlite_statements`, group commit's batches). sqlite3's errors
        are raised as SQLAlchemy's, outages as 503, as for `begin`."""
        if self.dialect != "sqlite":
            raise RuntimeError(f"run_write is for SQLite; this database is {self.dialect}")
        with self._outage_is_503():
            async with self._sqlite_write_lock():
                # SQLite's busy timeout covers a writer that starts while a cancelled caller's
                # transaction is still ending on the thread.
                return await self._sqlite_writer().write(fn)

    async def run_read(self, fn: Callable[[Connection], T]) -> T:
        """`fn(conn)` on a *synchronous* connection for ONE read statement (a hot-path lookup such as a
        balance): SQLite: on the writer thread of `run_write` (one hand-off, a deferred BEGIN: a WAL
        snapshot); PostgreSQL: on a pooled connection in autocommit (no BEGIN/COMMIT round trips; one
        statement sees one snapshot anyway). Outages are 503 as in `read`."""
        if self.dialect != "sqlite":
            with self._outage_is_503():
                async with self._autocommit_engine.connect() as conn:
                    return await conn.run_sync(fn)
        with self._outage_is_503():
            return await self._sqlite_writer().read(fn)

    async def fetch_row(self, statement: Statement, values: dict[str, Any]) -> Any:
        """PostgreSQL only: ONE statement in autocommit, its own transaction, in one round trip on a raw
        asyncpg connection (`storage.pg_direct`): the first row it returns (an asyncpg `Record`), or
        None. Outages are 503 as in `begin`; a statement the server refuses raises SQLAlchemy's
        `IntegrityError` (a constraint) or `DatabaseError`, as through the engine."""
        if self._direct is None:
            raise RuntimeError(f"fetch_row is for PostgreSQL; this database is {self.dialect}")
        with self._outage_is_503(), _refusals_as_sqlalchemy_errors():
            return await self._direct.fetch_row(statement, values)

    @asynccontextmanager
    async def direct_transaction(self) -> AsyncIterator[BatchSource]:
        """PostgreSQL only: one write transaction on a raw asyncpg connection for `fetch_row` after
        `fetch_row` (each one round trip; BEGIN and COMMIT one each) and `fetch_many` (one statement
        for many value sets, pipelined in one round trip): committed when the block exits normally,
        rolled back when it raises. Errors as `fetch_row`."""
        if self._direct is None:
            raise RuntimeError(f"direct_transaction is for PostgreSQL; this database is {self.dialect}")
        with self._outage_is_503(), _refusals_as_sqlalchemy_errors():
            async with self._direct.transaction() as transaction:
                yield transaction

    def _sqlite_writer(self) -> _SqliteWriter:
        if self._sync_writer is None:
            self._sync_writer = _SqliteWriter(self.engine.url)
        return self._sync_writer

    @contextmanager
    def _outage_is_503(self) -> Iterator[None]:
        """Translate an outage into `ServiceUnavailable`; log the first of a series and the recovery."""
        try:
            yield
        except ServiceUnavailable:
            raise
        except Exception as error:
            if not is_outage(error):
                raise
            # Whichever connection saw it, the others were likely cut too: the engine pool pings each
            # before its next use, the raw connections are dropped.
            self._outages.count += 1
            if self._direct is not None:
                self._direct.drop_idle()
            if not self._down:
                self._down = True
                detail = (str(error).splitlines() or [""])[0]
                logger.error("database unavailable (%s: %s); answering 503", type(error).__name__, detail)
            raise ServiceUnavailable(
                "The service is temporarily unavailable (its database cannot be reached). Please retry.",
                retry_after_s=RETRY_AFTER_S,
            ) from error
        if self._down:
            self._down = False
            logger.warning("database reachable again")

    def _sqlite_write_lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if self._write_lock is None or self._write_lock_loop is not loop:
            self._write_lock, self._write_lock_loop = asyncio.Lock(), loop
        return self._write_lock

    async def serialize(self, conn: AsyncConnection, key: int) -> None:
        """Make the rest of write transaction `conn` run alone among all processes that pass `key`.

        PostgreSQL: a transaction-scoped advisory lock, released at commit or rollback. SQLite: nothing
        to do, since `begin()`'s BEGIN IMMEDIATE already admits one writer at a time to the file.
        """
        if self.dialect == "postgresql":
            await conn.execute(_ADVISORY_LOCK, {"key": key})

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """A read-only transaction over one consistent snapshot; do not write in it."""
        with self._outage_is_503():
            async with self._read_engine.begin() as conn:
                yield conn

    async def now(self, conn: AsyncConnection) -> datetime:
        """The current time by the database's clock (UTC), for expiries that several replicas compare.

        PostgreSQL: `now()`, the start of `conn`'s transaction, on the server every replica shares, so
        a replica whose own clock is off cannot expire another's hold or take over its claim early.
        SQLite: this process's clock, without a query: a SQLite file is shared only by processes on
        one machine, which read one clock.
        """
        if self.dialect == "sqlite":
            return utcnow()
        value = (await conn.execute(_NOW)).scalar_one()
        if not isinstance(value, datetime):  # pragma: no cover - asyncpg returns an aware datetime
            raise TypeError(f"unexpected now() value {value!r}")
        return value.astimezone(UTC)

    async def ping(self) -> bool:
        """True when a query round trip works (readiness probe); never raises."""
        try:
            async with self.read() as conn:
                await conn.execute(text("SELECT 1"))
        except Exception:  # any failure means "not ready"; the caller's probe logs it
            return False
        return True

    async def aclose(self) -> None:
        """Close every pooled connection. The object is unusable afterwards."""
        if self._sync_writer is not None:
            await asyncio.to_thread(self._sync_writer.close)
            self._sync_writer = None
        if self._direct is not None:
            await self._direct.aclose()
        await self.engine.dispose()

    def __repr__(self) -> str:
        return f"Database({self.engine.url.render_as_string(hide_password=True)!r})"


@contextmanager
def _refusals_as_sqlalchemy_errors() -> Iterator[None]:
    """A statement PostgreSQL refused on a raw connection, raised as SQLAlchemy's `IntegrityError` (a
    constraint) or `DatabaseError`, the classes callers catch for every other statement. Outages pass
    through (`_outage_is_503` answers them)."""
    import asyncpg

    try:
        yield
    except asyncpg.PostgresError as error:
        if is_outage(error):
            raise
        kind = (
            exc.IntegrityError
            if isinstance(error, asyncpg.IntegrityConstraintViolationError)
            else exc.DatabaseError
        )
        raise kind(getattr(error, "query", None) or "", None, error) from error


class _SqliteWriter:
    """One thread with its synchronous sqlite3 connections to the file (same pragmas): SQLAlchemy's for
    `read`, a plain sqlite3 one for `write` (BEGIN IMMEDIATE ... COMMIT around its function).

    Work reaches the thread through a plain queue and its result comes back with one
    `call_soon_threadsafe`: an executor's future, work item and idle-thread bookkeeping, and asyncio's
    chaining of two futures, cost more than the transaction of a lone request's hold."""

    def __init__(self, url: URL) -> None:
        # StaticPool: the single connection, only ever used on the single thread below.
        self.engine = create_engine(
            url.set(drivername="sqlite+pysqlite"),
            poolclass=StaticPool,
            connect_args={"check_same_thread": False},
        )
        event.listen(self.engine, "connect", _sqlite_connect)
        event.listen(self.engine, "begin", _sqlite_begin)
        self.reader = self.engine.execution_options(**{_BEGIN_OPTION: "BEGIN"})
        self._path = str(url.database)
        self._raw: sqlite3.Connection | None = None  # `write`'s, made on the thread on first use
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        # A daemon: a writer left open must not keep the interpreter from exiting (its transaction,
        # if one is cut, rolls back as any SQLite transaction does).
        self._thread = threading.Thread(target=self._serve, name="tokentill-sqlite-writer", daemon=True)
        self._thread.start()

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """`fn(raw)` in one write transaction on the thread's sqlite3 connection itself. A cancelled
        caller stops waiting, not the thread: the transaction still ends (commit or rollback)."""
        return await self._run(self._write, fn)

    async def read(self, fn: Callable[[Connection], T]) -> T:
        return await self._run(self._read, fn)

    async def _run(self, method: Callable[[Callable[[C], T]], T], fn: Callable[[C], T]) -> T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put((method, fn, loop, future))
        return await future

    def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._raw is None:
            # Closed by `close` from another thread, once this one has stopped.
            self._raw = sqlite3.connect(self._path, timeout=_SQLITE_BUSY_S, check_same_thread=False)
            _sqlite_connect(self._raw, None)
        raw = self._raw
        statement = "BEGIN IMMEDIATE"
        try:
            raw.execute(statement)
            statement = "(the batch's statements)"
            result = fn(raw)
            statement = "COMMIT"
            raw.execute(statement)
        except sqlite3.Error as error:
            if raw.in_transaction:
                raw.execute("ROLLBACK")
            raise exc.DBAPIError.instance(statement, None, error, sqlite3.Error) from error
        except BaseException:
            if raw.in_transaction:
                raw.execute("ROLLBACK")
            raise
        return result

    def _read(self, fn: Callable[[Connection], T]) -> T:
        with self.reader.begin() as conn:
            return fn(conn)

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            method, fn, loop, future = job
            try:
                outcome: tuple[Any, BaseException | None] = (method(fn), None)
            except BaseException as error:  # handed to the awaiting task, which raises it
                outcome = (None, error)
            with suppress(RuntimeError):  # the loop closed meanwhile: nobody waits for this
                loop.call_soon_threadsafe(_resolve, future, *outcome)

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()
        if self._raw is not None:
            self._raw.close()
        self.engine.dispose()


_Job = tuple[Callable[..., Any], Callable[[Any], Any], asyncio.AbstractEventLoop, "asyncio.Future[Any]"]


def _resolve(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _sqlite_connect(dbapi_connection: Any, _record: ConnectionPoolEntry | None) -> None:
    # Switch off the driver's implicit BEGIN (it never begins before a SELECT); `_sqlite_begin` does it.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        for pragma in _SQLITE_PRAGMAS:
            cursor.execute(pragma)
    finally:
        cursor.close()


def _switch_to_wal(path: str) -> None:
    """Put the file in WAL mode (persistent) before any pooled connection uses it.

    The switch needs an exclusive lock, and SQLite answers SQLITE_BUSY at once, skipping the busy
    timeout, when waiting could deadlock, as when several processes open a fresh file together; so
    retry for a while. Once the file is in WAL mode the per-connection pragma is a no-op.
    """
    deadline = time.monotonic() + 30.0
    while True:
        mode: str | None = None
        conn = sqlite3.connect(path, timeout=10.0)
        try:
            mode = str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]).lower()
        except sqlite3.OperationalError:
            if time.monotonic() > deadline:
                raise
        finally:
            conn.close()
        if mode == "wal":
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"could not switch {path} to WAL mode (journal_mode is {mode})")
        time.sleep(0.05)


_PING_IDLE_S = 1.0  # a pooled PostgreSQL connection idle longer than this is pinged before use
# `Database.fetch_row`'s raw connections: group commit's one writer uses one at a time; `Ledger` called
# directly (group commit off) uses one per concurrent request, up to this many.
_DIRECT_SIZE = 10
_SQLALCHEMY_ONLY = ("async_creator_fn", "prepared_statement_cache_size", "prepared_statement_name_func")
_LAST_USED = "tokentill_last_used"
_OUTAGES_SEEN = "tokentill_outages_seen"


class Outages:
    """How many outages a `Database` has seen, on any of its connections."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0


def _mark_used(_dbapi_connection: Any, record: ConnectionPoolEntry, *_: Any) -> None:
    record.info[_LAST_USED] = time.monotonic()


def _ping_if_idle(outages: Outages, dbapi_connection: Any, record: ConnectionPoolEntry, _proxy: Any) -> None:
    """The pool's pre-ping, for connections idle over `_PING_IDLE_S` only (those a server restart, an
    idle timeout or a firewall may have cut while nobody watched). A connection in steady use skips the
    round trip the pre-ping cost on every transaction; if it has died since its last use, the
    statement fails as an outage (503), which invalidates it, and the next checkout connects afresh.
    A failed ping invalidates the whole pool, as SQLAlchemy's pre-ping does, and the checkout retries
    on a new connection. After an outage seen on any connection of the database (`fetch_row`'s raw
    ones included), each pooled connection is pinged once more before its next use."""
    if (
        record.info.get(_OUTAGES_SEEN, 0) == outages.count
        and time.monotonic() - record.info.get(_LAST_USED, 0.0) < _PING_IDLE_S
    ):
        return
    record.info[_OUTAGES_SEEN] = outages.count  # pinged once per outage (a failed ping resets the pool)
    try:
        record.info[_LAST_USED] = time.monotonic()
        dbapi_connection.ping()
    except Exception as error:
        raise exc.InvalidatePoolError(f"idle connection failed its ping: {error!r}") from error


def _sqlite_begin(conn: Connection) -> None:
    conn.exec_driver_sql(conn.get_execution_options().get(_BEGIN_OPTION, "BEGIN IMMEDIATE"))


def _alembic_config(connection: Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    config.set_main_option("path_separator", "os")
    config.attributes["connection"] = connection
    return config


def _upgrade(connection: Connection) -> None:
    command.upgrade(_alembic_config(connection), "head")


def _has_schema(connection: Connection) -> bool:
    return inspect(connection).has_table(_VERSION_TABLE)


def _sqlite_has_schema(path: str) -> bool:
    """True when the SQLite file exists and holds tokentill's tables; opened read-only, creates nothing."""
    file = Path(path).resolve()
    if not file.is_file():
        return False
    with closing(sqlite3.connect(f"{file.as_uri()}?mode=ro", uri=True, timeout=10.0)) as conn:
        query = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?"
        return conn.execute(query, (_VERSION_TABLE,)).fetchone() is not None


def _make_engine(
    url: str,
    *,
    create: bool = True,
    connect_timeout_s: float = 5.0,
    pool_timeout_s: float = 10.0,
    statement_timeout_s: float = 30.0,
    outages: Outages | None = None,
) -> AsyncEngine:
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if parsed.drivername != "sqlite+aiosqlite":
            raise ValueError(f"SQLite URLs must use the aiosqlite driver: {parsed.drivername}")
        if not parsed.database or parsed.database == ":memory:":
            raise ValueError("an in-memory SQLite database cannot be shared; give a file path")
        if create:
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(parsed)
        event.listen(engine.sync_engine, "connect", _sqlite_connect)
        event.listen(engine.sync_engine, "begin", _sqlite_begin)
        return engine
    if backend == "postgresql":
        if parsed.drivername != "postgresql+asyncpg":
            raise ValueError(f"PostgreSQL URLs must use the asyncpg driver: {parsed.drivername}")
        # A server that accepts TCP but never answers (a partition) fails the connect after
        # `connect_timeout_s`, a statement on a pooled connection cut off without a reset (the idle
        # ping included) after `statement_timeout_s`, and a wait for a pooled connection after
        # `pool_timeout_s`.
        engine = create_async_engine(
            parsed,
            pool_timeout=pool_timeout_s,
            connect_args={"timeout": connect_timeout_s, "command_timeout": statement_timeout_s},
        )
        event.listen(engine.sync_engine, "connect", _mark_used)
        event.listen(engine.sync_engine, "checkin", _mark_used)
        event.listen(engine.sync_engine, "checkout", partial(_ping_if_idle, outages or Outages()))
        return engine
    raise ValueError(f"unsupported database URL scheme: {parsed.drivername}")


async def open_database(
    url: str,
    *,
    create: bool = True,
    connect_timeout_s: float = 5.0,
    pool_timeout_s: float = 10.0,
    statement_timeout_s: float = 30.0,
) -> Database:
    """Connect to `url`, migrate it to the newest revision, and return the `Database`.

    `create=False`: raise `DatabaseMissing`, creating nothing, unless tokentill has set this database up
    before (an older revision is still migrated). PostgreSQL: a connection attempt gives up after
    `connect_timeout_s`, a statement (the pool's liveness ping included) after `statement_timeout_s`, a
    wait for a free pooled connection after `pool_timeout_s` (all then answer 503). Raises `ValueError`
    for an unsupported URL; driver and migration errors propagate (after the engine is disposed), since
    a server must not start on a database it cannot use.
    """
    outages = Outages()
    engine = _make_engine(
        url,
        create=create,
        connect_timeout_s=connect_timeout_s,
        pool_timeout_s=pool_timeout_s,
        statement_timeout_s=statement_timeout_s,
        outages=outages,
    )
    try:
        if engine.dialect.name == "sqlite" and engine.url.database:
            if not create and not await asyncio.to_thread(_sqlite_has_schema, engine.url.database):
                raise DatabaseMissing(url)
            await asyncio.to_thread(_switch_to_wal, engine.url.database)
        async with engine.begin() as conn:
            if engine.dialect.name == "postgresql":
                # Released at commit/rollback; a second process waits here, then finds nothing to do.
                await conn.execute(_ADVISORY_LOCK, {"key": _MIGRATION_LOCK_KEY})
            if not create and not await conn.run_sync(_has_schema):
                raise DatabaseMissing(url)
            await conn.run_sync(_upgrade)
    except BaseException:
        await engine.dispose()
        raise
    direct = None
    if engine.dialect.name == "postgresql":
        _, connect_kwargs = engine.dialect.create_connect_args(engine.url)
        cache_size = connect_kwargs.get("prepared_statement_cache_size")
        for option in _SQLALCHEMY_ONLY:  # the asyncpg dialect's own options, not asyncpg.connect's
            connect_kwargs.pop(option, None)
        if cache_size is not None:  # e.g. 0 behind PgBouncer's transaction pooling: asyncpg's own cache too
            connect_kwargs["statement_cache_size"] = int(cache_size)
        connect_kwargs.update(timeout=connect_timeout_s, command_timeout=statement_timeout_s)
        direct = DirectStatements(
            connect_kwargs, size=_DIRECT_SIZE, pool_timeout_s=pool_timeout_s, ping_idle_s=_PING_IDLE_S
        )
    db = Database(engine, direct, outages)
    logger.info("database ready: %r", db)
    return db
