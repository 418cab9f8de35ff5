"""Fixtures for real databases and Redis. Never mocks: a missing service skips locally, fails in CI."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
import redis
from sqlalchemy.engine import make_url

from tests._services import require, run
from tests.faults.proxy import TcpProxy

_DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"
_DEFAULT_REDIS = "redis://127.0.0.1:6379/0"


def _plain_pg(url: str, database: str | None = None) -> str:
    """The URL asyncpg itself accepts (no `+driver`), optionally for another database."""
    parsed = make_url(url).set(drivername="postgresql")
    if database is not None:
        parsed = parsed.set(database=database)
    return parsed.render_as_string(hide_password=False)


async def _pg_execute(server_url: str, sql: str) -> None:
    conn = await asyncpg.connect(_plain_pg(server_url), timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def pg_server_url() -> str:
    """`TOKENTILL_TEST_PG_URL` (a maintenance database on the test server), checked reachable."""
    url = os.environ.get("TOKENTILL_TEST_PG_URL", _DEFAULT_PG)
    try:
        run(_pg_execute(url, "SELECT 1"))
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        require("PostgreSQL", f"{_plain_pg(url)}: {exc!r}")
    return url


@pytest.fixture
def pg_database_url(pg_server_url: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards; an asyncpg SQLAlchemy URL."""
    name = f"tokentill_test_{secrets.token_hex(6)}"
    run(_pg_execute(pg_server_url, f'CREATE DATABASE "{name}"'))
    try:
        yield (
            make_url(_plain_pg(pg_server_url, name))
            .set(drivername="postgresql+asyncpg")
            .render_as_string(hide_password=False)
        )
    finally:
        run(_pg_execute(pg_server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def pg_proxy(pg_server_url: str) -> Iterator[TcpProxy]:
    """A TCP proxy in front of the test PostgreSQL server that a test can cut and restore
    (`tests.faults.proxy.through(url, proxy)` routes a database URL through it)."""
    url = make_url(pg_server_url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432).start()
    yield proxy
    proxy.stop()


@pytest.fixture
def sqlite_database_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'data' / 'tokentill.db'}"


@pytest.fixture(params=[pytest.param("sqlite"), pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest) -> str:
    """Each test using it runs twice: on a SQLite file and on a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return str(request.getfixturevalue("sqlite_database_url"))
    return str(request.getfixturevalue("pg_database_url"))


@pytest.fixture(scope="session")
def redis_url() -> str:
    """`TOKENTILL_TEST_REDIS_URL`, checked with PING. Tests using it should clean up their own keys."""
    url = os.environ.get("TOKENTILL_TEST_REDIS_URL", _DEFAULT_REDIS)
    client = redis.Redis.from_url(url, socket_connect_timeout=3)
    try:
        client.ping()
    except redis.RedisError as exc:
        require("Redis", f"{url}: {exc!r}")
    finally:
        client.close()
    return url
