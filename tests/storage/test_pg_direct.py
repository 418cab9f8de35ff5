"""`Database.fetch_row`: one statement in autocommit on PostgreSQL's raw connections (`storage.pg_direct`).

What it must keep of the engine path: its result, SQLAlchemy's exception classes for refused statements,
503 for an outage with recovery once the server is back (for the engine's pool too: an outage seen on a
raw connection makes the pool ping its own), and a bound on the connections it opens."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from tests._services import run, run_with_db
from tests.faults.proxy import TcpProxy, through
from tokentill.errors import ServiceUnavailable
from tokentill.storage.db import Database, open_database
from tokentill.storage.pg_direct import Statement

pytestmark = pytest.mark.postgres


def test_statement_numbers_named_parameters_once_in_first_use_order() -> None:
    statement = Statement("SELECT :b, CAST(:a AS integer), :b, 'x'::text, x::int FROM t WHERE y = :a_2")
    assert statement.sql == "SELECT $1, CAST($2 AS integer), $1, 'x'::text, x::int FROM t WHERE y = $3"
    assert statement.names == ("b", "a", "a_2")
    assert statement.args({"a": 1, "b": 2, "a_2": 3, "unused": 4}) == [2, 1, 3]


_ADD = Statement("SELECT CAST(:x AS integer) + CAST(:y AS integer) AS total")


def test_fetch_row_answers_and_reuses_one_connection(pg_database_url: str) -> None:
    async def body(db: Database) -> None:
        backends = set()
        for i in range(5):
            row = await db.fetch_row(_ADD, {"x": i, "y": 10})
            assert row["total"] == i + 10
            pid = await db.fetch_row(Statement("SELECT pg_backend_pid() AS pid"), {})
            backends.add(pid["pid"])
        assert len(backends) == 1  # one after the other: the same connection, kept
        assert await db.fetch_row(Statement("SELECT 1 AS one WHERE false"), {}) is None

    run_with_db(pg_database_url, body)


def test_a_refused_statement_raises_sqlalchemy_errors_and_keeps_the_connection(pg_database_url: str) -> None:
    async def body(db: Database) -> None:
        async with db.begin() as conn:
            await conn.execute(text("CREATE TABLE direct_t (id integer PRIMARY KEY)"))
        insert = Statement("INSERT INTO direct_t (id) VALUES (:id) RETURNING id")
        assert (await db.fetch_row(insert, {"id": 1}))["id"] == 1  # committed on its own (autocommit)
        before = (await db.fetch_row(Statement("SELECT pg_backend_pid() AS pid"), {}))["pid"]
        with pytest.raises(IntegrityError):
            await db.fetch_row(insert, {"id": 1})
        after = (await db.fetch_row(Statement("SELECT pg_backend_pid() AS pid"), {}))["pid"]
        assert after == before
        async with db.read() as conn:
            assert (await conn.execute(text("SELECT count(*) FROM direct_t"))).scalar_one() == 1

    run_with_db(pg_database_url, body)


def test_concurrent_statements_use_at_most_the_bound(pg_database_url: str) -> None:
    async def body(db: Database) -> None:
        sleepy = Statement("SELECT pg_backend_pid() AS pid, pg_sleep(CAST(:s AS float)) AS slept")
        rows = await asyncio.gather(*(db.fetch_row(sleepy, {"s": 0.05}) for _ in range(25)))
        pids = {row["pid"] for row in rows}
        assert 1 < len(pids) <= 10  # `_DIRECT_SIZE`: the rest waited for a free one

    run_with_db(pg_database_url, body)


def test_an_outage_is_503_and_both_pools_recover(pg_database_url: str, pg_proxy: TcpProxy) -> None:
    async def body() -> None:
        db = await open_database(through(pg_database_url, pg_proxy), connect_timeout_s=2, pool_timeout_s=2)
        try:
            assert (await db.fetch_row(_ADD, {"x": 1, "y": 1}))["total"] == 2
            async with db.read() as conn:  # the engine's pool holds a connection used just now
                await conn.execute(text("SELECT 1"))
            pg_proxy.cut()
            for _ in range(2):  # the kept connection cut, then a new one refused
                with pytest.raises(ServiceUnavailable) as caught:
                    await db.fetch_row(_ADD, {"x": 1, "y": 1})
                assert caught.value.status == 503 and caught.value.headers["Retry-After"] == "2"
            pg_proxy.restore()
            # Well within the idle-ping interval: without the outage count the engine pool would lend
            # its cut connection and answer 503 once more.
            async with db.read() as conn:
                assert (await conn.execute(text("SELECT 1"))).scalar_one() == 1
            assert (await db.fetch_row(_ADD, {"x": 2, "y": 2}))["total"] == 4
        finally:
            await db.aclose()

    run(body())


def test_after_an_outage_seen_by_the_engine_the_raw_path_recovers(
    pg_database_url: str, pg_proxy: TcpProxy
) -> None:
    async def body() -> None:
        db = await open_database(through(pg_database_url, pg_proxy), connect_timeout_s=2, pool_timeout_s=2)
        try:
            assert (await db.fetch_row(_ADD, {"x": 1, "y": 1}))["total"] == 2
            pg_proxy.cut()
            with pytest.raises(ServiceUnavailable):
                async with db.read() as conn:
                    await conn.execute(text("SELECT 1"))
            pg_proxy.restore()
            assert (await db.fetch_row(_ADD, {"x": 2, "y": 2}))["total"] == 4
        finally:
            await db.aclose()

    run(body())


def test_a_url_without_a_statement_cache_is_honoured(pg_database_url: str) -> None:
    """`?prepared_statement_cache_size=0` (PgBouncer in transaction mode) reaches the raw connections too."""

    async def body() -> None:
        db = await open_database(f"{pg_database_url}?prepared_statement_cache_size=0")
        try:
            for i in range(3):
                assert (await db.fetch_row(_ADD, {"x": i, "y": 1}))["total"] == i + 1
            assert db._direct is not None
            assert db._direct._connect_kwargs["statement_cache_size"] == 0
        finally:
            await db.aclose()

    run(body())
