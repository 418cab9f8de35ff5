"""open_database on real SQLite files and real PostgreSQL databases: migrations, pragmas, concurrency."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection, insert, inspect, make_url, select, text, update
from sqlalchemy.exc import IntegrityError

from tests._services import run, run_with_db, subprocess_env
from tokentill.storage import Database, open_database
from tokentill.storage.db import DatabaseMissing
from tokentill.storage.schema import accounts, metadata

HEAD_REVISION = "0005"  # the newest file in storage/migrations/versions


def _schema_diff(connection: Connection) -> list[object]:
    return list(compare_metadata(MigrationContext.configure(connection), metadata))


def test_migrates_to_head_and_matches_schema(database_url: str) -> None:
    async def body(db: Database) -> None:
        async with db.read() as conn:
            version = (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalar_one()
            diff = await conn.run_sync(_schema_diff)
        assert version == HEAD_REVISION
        assert diff == []

    run_with_db(database_url, body)


def test_second_open_is_a_noop(database_url: str) -> None:
    async def first(db: Database) -> None:
        async with db.begin() as conn:
            await conn.execute(insert(accounts).values(name="kept", balance=5, created_at=datetime.now(UTC)))

    async def second(db: Database) -> None:
        async with db.read() as conn:
            assert (await conn.execute(select(accounts.c.balance))).scalar_one() == 5
            count = (await conn.execute(text("SELECT count(*) FROM alembic_version"))).scalar_one()
        assert count == 1

    run_with_db(database_url, first)
    run_with_db(database_url, second)


def test_concurrent_opens_in_one_process(database_url: str) -> None:
    async def main() -> None:
        dbs = await asyncio.gather(*(open_database(database_url) for _ in range(4)))
        try:
            async with dbs[0].read() as conn:
                assert (await conn.execute(text("SELECT version_num FROM alembic_version"))).all() == [
                    (HEAD_REVISION,)
                ]
        finally:
            for db in dbs:
                await db.aclose()

    run(main())


def test_concurrent_opens_from_processes(database_url: str) -> None:
    script = (
        "import asyncio, sys\n"
        "from tokentill.storage import open_database\n"
        "async def main():\n"
        "    db = await open_database(sys.argv[1])\n"
        "    await db.aclose()\n"
        "asyncio.run(main())\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, database_url],
            env=subprocess_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(4)
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()

    async def body(db: Database) -> None:
        async with db.read() as conn:
            assert (await conn.execute(text("SELECT version_num FROM alembic_version"))).all() == [
                (HEAD_REVISION,)
            ]

    run_with_db(database_url, body)


def test_timestamps_are_aware_utc(database_url: str) -> None:
    async def body(db: Database) -> None:
        stamp = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
        async with db.begin() as conn:
            await conn.execute(insert(accounts).values(name="t", created_at=stamp))
        async with db.read() as conn:
            got = (await conn.execute(select(accounts.c.created_at))).scalar_one()
        assert got == stamp and got.tzinfo is not None

    run_with_db(database_url, body)


def test_naive_datetime_refused(sqlite_database_url: str) -> None:
    async def body(db: Database) -> None:
        async with db.begin() as conn:
            await conn.execute(insert(accounts).values(name="n", created_at=datetime(2026, 1, 1)))

    with pytest.raises(Exception, match="naive datetime"):
        run_with_db(sqlite_database_url, body)


def test_balance_check_constraint(database_url: str) -> None:
    async def body(db: Database) -> None:
        async with db.begin() as conn:
            await conn.execute(insert(accounts).values(name="c", balance=1, created_at=datetime.now(UTC)))
        with pytest.raises(IntegrityError):
            async with db.begin() as conn:
                await conn.execute(update(accounts).values(balance=-1))

    run_with_db(database_url, body)


def test_sqlite_pragmas_and_parent_folder(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "t.db"

    async def body(db: Database) -> None:
        async with db.read() as conn:
            pragmas = {
                name: (await conn.exec_driver_sql(f"PRAGMA {name}")).scalar_one()
                for name in ("journal_mode", "busy_timeout", "foreign_keys", "synchronous")
            }
        assert db.dialect == "sqlite"
        assert pragmas == {"journal_mode": "wal", "busy_timeout": 10000, "foreign_keys": 1, "synchronous": 1}

    run_with_db(f"sqlite+aiosqlite:///{path}", body)
    assert path.is_file()


@pytest.mark.parametrize(
    "url",
    ["sqlite:///x.db", "sqlite+aiosqlite:///:memory:", "mysql+aiomysql://u@h/d", "postgresql://u@h/d"],
)
def test_unsupported_urls(url: str) -> None:
    with pytest.raises(ValueError):
        run(open_database(url))


def test_open_without_create_refuses_a_new_database_and_creates_nothing(database_url: str) -> None:
    """Only `serve` and `init` create a database; a CLI pointed elsewhere must not make an empty one."""

    async def tables() -> list[str]:
        db = await open_database(database_url)
        try:
            async with db.read() as conn:
                return sorted(await conn.run_sync(lambda c: inspect(c).get_table_names()))
        finally:
            await db.aclose()

    with pytest.raises(DatabaseMissing, match="no tokentill database at") as info:
        run(open_database(database_url, create=False))
    assert "password" not in str(info.value) and info.value.url == database_url
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        assert not Path(str(url.database)).parent.exists()  # not even an empty file or its folder
        assert str(info.value).endswith(str(Path(str(url.database)).resolve()))
    else:  # the PostgreSQL database exists but holds no table of ours, and still holds none
        assert run(_pg_tables(database_url)) == []
    assert "alembic_version" in run(tables())  # `init` / `serve`: created at the newest revision
    db = run(open_database(database_url, create=False))  # from now on the CLI opens it
    run(db.aclose())


async def _pg_tables(database_url: str) -> list[str]:
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as conn:
            return list(await conn.run_sync(lambda c: inspect(c).get_table_names()))
    finally:
        await engine.dispose()


def test_run_write_commits_or_rolls_back_and_queues_with_begin(sqlite_database_url: str) -> None:
    """`run_write` (SQLite: a synchronous function on the writer thread's sqlite3 connection, in one
    write transaction) commits what its function wrote, rolls it all back when it raises, raises
    sqlite3's errors as SQLAlchemy's, and takes turns with `begin()` writers."""

    def create(name: str, *, fail: bool = False) -> Callable[[sqlite3.Connection], str]:
        def write(raw: sqlite3.Connection) -> str:
            raw.execute(
                "INSERT INTO accounts (name, balance, created_at) VALUES (?, 5, ?)",
                (name, "2026-01-01 00:00:00.000000"),
            )
            if fail:
                raise RuntimeError("after the insert")
            return name

        return write

    async def body(db: Database) -> None:
        assert await db.run_write(create("kept")) == "kept"
        with pytest.raises(RuntimeError):
            await db.run_write(create("undone", fail=True))

        def twice(raw: sqlite3.Connection) -> None:
            create("once")(raw)
            create("once")(raw)  # the name is unique

        with pytest.raises(IntegrityError):
            await db.run_write(twice)

        async def bump() -> None:
            async with db.begin() as conn:
                await conn.execute(
                    update(accounts).where(accounts.c.name == "kept").values(balance=accounts.c.balance + 1)
                )

        # Interleaved with async writers on the same file: no "database is locked", nothing lost.
        await asyncio.gather(*(db.run_write(create(f"w{i}")) for i in range(5)), *(bump() for _ in range(5)))
        async with db.read() as conn:
            rows = dict((await conn.execute(select(accounts.c.name, accounts.c.balance))).all())
        assert rows == {"kept": 10, **{f"w{i}": 5 for i in range(5)}}

    run_with_db(sqlite_database_url, body)
