"""A database that cannot be reached is a 503 `service_unavailable` with Retry-After, raised once at the
storage boundary, and the pool recovers by itself when the server is back (issue 15, item 3)."""

from __future__ import annotations

import asyncio
import sqlite3
import time

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

from tests._services import run, run_with_db
from tests.faults.proxy import TcpProxy, through
from tokentill.errors import ServiceUnavailable
from tokentill.storage.db import Database, is_outage, open_database


async def _one(db: Database) -> int:
    async with db.read() as conn:
        return int((await conn.execute(text("SELECT 1"))).scalar_one())


@pytest.mark.postgres
def test_cut_database_is_503_and_recovers(pg_database_url: str, pg_proxy: TcpProxy) -> None:
    async def body() -> None:
        db = await open_database(through(pg_database_url, pg_proxy), connect_timeout_s=2, pool_timeout_s=2)
        try:
            assert await _one(db) == 1
            pg_proxy.cut()
            for attempt in (db.read, db.begin):  # a reused pooled connection, then a new one refused
                with pytest.raises(ServiceUnavailable) as caught:
                    async with attempt() as conn:
                        await conn.execute(text("SELECT 1"))
                error = caught.value
                assert (error.status, error.code, error.type) == (503, "service_unavailable", "server_error")
                assert error.headers["Retry-After"] == "2"
                assert is_outage(error.__cause__ or error)
            with pytest.raises(ServiceUnavailable):  # the one-statement reads of the hot path too
                await db.run_read(lambda conn: conn.execute(text("SELECT 1")).scalar_one())
            pg_proxy.restore()
            assert await _one(db) == 1  # no restart: the pool pings and reconnects
            assert await db.run_read(lambda conn: conn.execute(text("SELECT 1")).scalar_one()) == 1
        finally:
            await db.aclose()

    run(body())


@pytest.mark.postgres
def test_connection_lost_mid_transaction_is_503(pg_database_url: str, pg_proxy: TcpProxy) -> None:
    async def body() -> None:
        db = await open_database(through(pg_database_url, pg_proxy), connect_timeout_s=2, pool_timeout_s=2)
        try:
            with pytest.raises(ServiceUnavailable):
                async with db.begin() as conn:
                    await conn.execute(text("SELECT 1"))
                    pg_proxy.cut()  # the COMMIT meets a closed connection
            pg_proxy.restore()
            assert await _one(db) == 1
        finally:
            await db.aclose()

    run(body())


@pytest.mark.postgres
def test_silent_server_fails_after_the_connect_timeout(pg_database_url: str, pg_proxy: TcpProxy) -> None:
    """A partition (TCP accepted, nothing answered) is refused after `connect_timeout_s`, not asyncpg's
    own 60 s default."""

    async def body() -> float:
        db = await open_database(through(pg_database_url, pg_proxy), connect_timeout_s=1, pool_timeout_s=1)
        try:
            await db.engine.dispose()  # no pooled connection left: the next one must be made
            pg_proxy.hang()
            started = time.monotonic()
            with pytest.raises(ServiceUnavailable):
                await _one(db)
            elapsed = time.monotonic() - started
            pg_proxy.restore()
            assert await _one(db) == 1
            return elapsed
        finally:
            await db.aclose()

    assert run(body()) < 30  # asyncpg's default would wait 60 s


def test_statement_errors_are_not_outages(database_url: str) -> None:
    """A wrong statement or a constraint violation stays a bug (500), on SQLite and PostgreSQL."""

    async def body(db: Database) -> None:
        with pytest.raises((OperationalError, ProgrammingError)) as caught:
            async with db.read() as conn:
                await conn.execute(text("SELECT * FROM no_such_table"))
        assert not isinstance(caught.value, ServiceUnavailable)
        assert not is_outage(caught.value)
        async with db.begin() as conn:
            await conn.execute(
                text("INSERT INTO accounts (name, balance, created_at) VALUES ('x', 0, '2026-01-01')")
            )
        with pytest.raises(IntegrityError):
            async with db.begin() as conn:
                await conn.execute(
                    text("INSERT INTO accounts (name, balance, created_at) VALUES ('x', 0, '2026-01-01')")
                )

    run_with_db(database_url, body)


@pytest.mark.postgres
def test_partition_of_a_pooled_connection_fails_after_the_statement_timeout(
    pg_database_url: str, pg_proxy: TcpProxy
) -> None:
    """A pooled connection whose packets are dropped (no reset) is given up after `statement_timeout_s`
    (the pool's liveness ping included), not held forever."""

    async def body() -> None:
        db = await open_database(
            through(pg_database_url, pg_proxy), connect_timeout_s=1, pool_timeout_s=1, statement_timeout_s=1
        )
        try:
            assert await _one(db) == 1  # one pooled connection, alive
            pg_proxy.hang()
            with pytest.raises(ServiceUnavailable):
                await asyncio.wait_for(_one(db), timeout=30)  # without the timeout: forever
            pg_proxy.restore()
            assert await _one(db) == 1
        finally:
            await db.aclose()

    run(body())


def test_sqlite_file_locked_past_the_busy_timeout_is_503(sqlite_database_url: str) -> None:
    """SQLite's outage: another process holds the write lock longer than the 10 s busy timeout."""

    async def body(db: Database) -> None:
        path = db.engine.url.database
        assert path is not None
        holder = sqlite3.connect(path, isolation_level=None)
        try:
            holder.execute("BEGIN EXCLUSIVE")
            with pytest.raises(ServiceUnavailable) as caught:
                async with db.begin() as conn:
                    await conn.execute(text("UPDATE accounts SET balance = balance"))
            assert caught.value.headers["Retry-After"] == "2"
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        async with db.begin() as conn:  # the lock is gone: writes work again
            await conn.execute(text("UPDATE accounts SET balance = balance"))

    run_with_db(sqlite_database_url, body)
