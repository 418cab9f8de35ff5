"""Open the database: an async SQLAlchemy engine with safe SQLite settings, migrated to head.

`open_database(url)` is the only entry point. It accepts `sqlite+aiosqlite:///path` and
`postgresql+asyncpg://...` URLs, and returns a `Database` whose `begin()` opens a *write* transaction and
`read()` a read-only one:

* SQLite: several processes (`--workers`) may share the file. Every connection gets WAL, a 10 s busy
  timeout, foreign keys and synchronous=NORMAL. The driver's own BEGIN handling is switched off and a
  write transaction starts with `BEGIN IMMEDIATE`, so it takes the write lock *before* its first read and
  two check-then-write transactions cannot interleave. `read()` uses a plain deferred `BEGIN`
  (a WAL snapshot that does not queue behind writers).
* PostgreSQL: READ COMMITTED; money code relies on conditional `UPDATE ... WHERE balance >= :x`, which
  PostgreSQL re-checks after waiting on the row lock, so it needs no stronger isolation. `read()` is
  REPEATABLE READ so a report (an audit) sees one snapshot.

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
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, closing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import event, inspect, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry

from tokentill.storage.schema import utcnow

__all__ = ["Database", "DatabaseMissing", "describe_url", "open_database"]

logger = logging.getLogger(__name__)

_MIGRATIONS = Path(__file__).resolve().parent / "migrations"
# Any fixed 64-bit number; only tokentill's migration runs take it.
_MIGRATION_LOCK_KEY = 0x746F6B656E74696C  # "tokentil"
_BEGIN_OPTION = "tokentill_sqlite_begin"
_VERSION_TABLE = "alembic_version"  # Alembic's own table: present once tokentill has set a database up
_SQLITE_PRAGMAS = (
    "PRAGMA busy_timeout = 10000",  # first, so that the WAL switch itself waits for other processes
    "PRAGMA journal_mode = WAL",
    "PRAGMA foreign_keys = ON",
    "PRAGMA synchronous = NORMAL",
)


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

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.dialect: str = engine.dialect.name
        self._write_lock: asyncio.Lock | None = None  # SQLite: this process's writers, one at a time
        self._write_lock_loop: asyncio.AbstractEventLoop | None = None
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
        if self.dialect != "sqlite":
            async with self.engine.begin() as conn:
                yield conn
            return
        async with self._sqlite_write_lock():
            async with self.engine.begin() as conn:
                yield conn

    def _sqlite_write_lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if self._write_lock is None or self._write_lock_loop is not loop:
            self._write_lock, self._write_lock_loop = asyncio.Lock(), loop
        return self._write_lock

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """A read-only transaction over one consistent snapshot; do not write in it."""
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
        value = (await conn.execute(text("SELECT now()"))).scalar_one()
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
        await self.engine.dispose()

    def __repr__(self) -> str:
        return f"Database({self.engine.url.render_as_string(hide_password=True)!r})"


def _sqlite_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
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


def _make_engine(url: str, *, create: bool) -> AsyncEngine:
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
        return create_async_engine(parsed, pool_pre_ping=True)
    raise ValueError(f"unsupported database URL scheme: {parsed.drivername}")


async def open_database(url: str, *, create: bool = True) -> Database:
    """Connect to `url`, migrate it to the newest revision, and return the `Database`.

    `create=False`: raise `DatabaseMissing`, creating nothing, unless tokentill has set this database up
    before (an older revision is still migrated). Raises `ValueError` for an unsupported URL; driver and
    migration errors propagate (after the engine is disposed), since a server must not start on a
    database it cannot use.
    """
    engine = _make_engine(url, create=create)
    try:
        if engine.dialect.name == "sqlite" and engine.url.database:
            if not create and not await asyncio.to_thread(_sqlite_has_schema, engine.url.database):
                raise DatabaseMissing(url)
            await asyncio.to_thread(_switch_to_wal, engine.url.database)
        async with engine.begin() as conn:
            if engine.dialect.name == "postgresql":
                # Released at commit/rollback; a second process waits here, then finds nothing to do.
                await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
            if not create and not await conn.run_sync(_has_schema):
                raise DatabaseMissing(url)
            await conn.run_sync(_upgrade)
    except BaseException:
        await engine.dispose()
        raise
    db = Database(engine)
    logger.info("database ready: %r", db)
    return db
