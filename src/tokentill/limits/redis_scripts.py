"""The limiter's Lua scripts, run on redis-py connections without redis-py's client: `ScriptRunner`.

Every request of a limited key runs one or two scripts, so their cost is on the hot path. Through
`redis.asyncio.Redis` each call also pays the pool's checkout and release (an asyncio lock each way), the
retry helper and the command dispatch: on a loopback EVALSHA, 95-135 µs of this process's CPU per call,
against 41-48 µs for the same command sent and read on a bare redis-py `Connection` (`bench/` has no
script for this; measured 2026-12-03 with 2,000 calls in a loop). The connections are still redis-py's
(made by its `ConnectionPool` from the URL: TLS, AUTH, the database, socket timeouts and its reply
parser), each used by one call at a time and kept for the next one.

Failures are redis-py's: `RedisError` for an error reply, `ConnectionError` / `TimeoutError` (also
redis-py's, which subclass `RedisError`) for the transport. A connection that failed is dropped by
redis-py itself (a reply that comes late must not answer the next call); one that Redis closed while it
sat idle (a restart, an idle timeout) fails its first write or read, and the call is made once more on a
fresh connection, as redis-py's client did with its one retry: the scripts are idempotent per lease id.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError, NoScriptError, ResponseError

__all__ = ["Script", "ScriptRunner"]

_KEEP_IDLE = 32  # connections kept for later calls; a burst past it opens (and then closes) more


@dataclass(frozen=True)
class Script:
    """A Lua script and the SHA1 that EVALSHA names it by."""

    body: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.body.encode()).hexdigest())


class ScriptRunner:
    """Runs `Script`s on connections to the Redis at `url` (redis://, rediss://, unix://, as redis-py
    reads them). Opens no connection until the first call."""

    def __init__(self, url: str, *, connect_timeout_s: float, socket_timeout_s: float) -> None:
        self._pool: aioredis.ConnectionPool = aioredis.ConnectionPool.from_url(
            url,
            socket_connect_timeout=connect_timeout_s,
            socket_timeout=socket_timeout_s,
            retry=Retry(NoBackoff(), 0),  # connecting: once; a call is retried here, not by redis-py
        )
        self._idle: list[AbstractConnection] = []
        self._closed = False

    async def run(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """The script's reply (EVAL when Redis does not know it yet: a restart or SCRIPT FLUSH)."""
        reused = bool(self._idle)
        conn = self._idle.pop() if reused else self._connection()
        try:
            try:
                reply = await _evalsha(conn, script, keys, args)
            except ConnectionError:
                if not reused:
                    raise
                conn = self._connection()  # the idle one was closed under us: once more
                reply = await _evalsha(conn, script, keys, args)
        except ResponseError:
            await self._keep(conn)  # an error reply leaves the connection in step
            raise
        await self._keep(conn)
        return reply

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.disconnect()
        await self._pool.aclose()

    def _connection(self) -> AbstractConnection:
        conn: AbstractConnection = self._pool.make_connection()  # type: ignore[no-untyped-call]  # unannotated
        return conn

    async def _keep(self, conn: AbstractConnection) -> None:
        if not conn.is_connected:
            return
        if self._closed or len(self._idle) >= _KEEP_IDLE:
            await conn.disconnect(nowait=True)
        else:
            self._idle.append(conn)


async def _evalsha(conn: AbstractConnection, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
    await conn.connect()  # type: ignore[no-untyped-call]  # unannotated; returns at once when connected
    try:
        await conn.send_packed_command(
            conn.pack_command("EVALSHA", script.sha, len(keys), *keys, *args), check_health=False
        )
        return await conn.read_response()
    except NoScriptError:
        await conn.send_packed_command(
            conn.pack_command("EVAL", script.body, len(keys), *keys, *args), check_health=False
        )
        return await conn.read_response()
