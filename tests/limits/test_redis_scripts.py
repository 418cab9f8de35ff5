"""`ScriptRunner` against a real Redis: unknown scripts, error replies, connections Redis closes, bursts."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from tokentill.limits.redis_scripts import Script, ScriptRunner

pytestmark = pytest.mark.redis


@asynccontextmanager
async def opened(url: str) -> AsyncIterator[tuple[ScriptRunner, aioredis.Redis]]:
    """A runner under test and a plain client to look at Redis with, both closed afterwards."""
    scripts = ScriptRunner(url, connect_timeout_s=1.0, socket_timeout_s=1.0)
    client = aioredis.Redis.from_url(url)
    try:
        yield scripts, client
    finally:
        await scripts.aclose()
        await client.aclose()


def fresh_script(body: str) -> Script:
    """`body` with a unique comment: a script this Redis has never seen (its SHA is unknown there)."""
    return Script(f"-- {uuid.uuid4().hex}\n{body}")


def test_an_unknown_script_is_sent_whole_once_then_by_sha(limits_redis_url: str) -> None:
    async def main() -> None:
        async with opened(limits_redis_url) as (scripts, client):
            echo = fresh_script("return {tonumber(ARGV[1]) + 1, KEYS[1]}")
            assert await client.script_exists(echo.sha) == [False]
            assert await scripts.run(echo, ["k"], [41]) == [42, b"k"]  # NOSCRIPT, then EVAL
            assert await client.script_exists(echo.sha) == [True]
            assert await scripts.run(echo, ["j"], [1]) == [2, b"j"]

    asyncio.run(main())


def test_an_error_reply_raises_and_keeps_the_connection_in_step(limits_redis_url: str) -> None:
    async def main() -> None:
        async with opened(limits_redis_url) as (scripts, _):
            failing = fresh_script("return redis.error_reply('boom ' .. ARGV[1])")
            with pytest.raises(ResponseError, match="boom 7"):
                await scripts.run(failing, [], [7])
            assert len(scripts._idle) == 1  # kept: its next reply is the next call's
            assert await scripts.run(fresh_script("return ARGV[1]"), [], ["next"]) == b"next"
            assert len(scripts._idle) == 1

    asyncio.run(main())


def test_a_connection_redis_closed_while_idle_is_replaced(limits_redis_url: str) -> None:
    """Redis restarts or drops idle clients: the next call fails on the old connection and is made once
    more on a new one, without the caller seeing the failure."""

    async def main() -> None:
        async with opened(limits_redis_url) as (scripts, client):
            count = fresh_script("return redis.call('INCR', KEYS[1])")
            key = f"tt:test:{uuid.uuid4().hex}"
            assert await scripts.run(count, [key], []) == 1
            (idle,) = scripts._idle
            await idle.send_command("CLIENT", "ID")
            client_id = await idle.read_response()
            assert await client.client_kill_filter(_id=client_id) == 1
            assert await scripts.run(count, [key], []) == 2  # ran once: the killed connection ran nothing
            (replacement,) = scripts._idle
            assert replacement is not idle
            await client.delete(key)

    asyncio.run(main())


def test_a_burst_opens_what_it_needs_and_keeps_a_bounded_few(limits_redis_url: str) -> None:
    async def main() -> None:
        async with opened(limits_redis_url) as (scripts, client):
            key = f"tt:test:{uuid.uuid4().hex}"
            count = fresh_script("return redis.call('INCR', KEYS[1])")
            replies = await asyncio.gather(*(scripts.run(count, [key], []) for _ in range(50)))
            assert sorted(replies) == list(range(1, 51))
            assert len(scripts._idle) == 32
            assert all(conn.is_connected for conn in scripts._idle)
            await client.delete(key)
        assert not scripts._idle

    asyncio.run(main())
