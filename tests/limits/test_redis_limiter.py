"""What only the Redis limiter promises: one limit across replicas, expiry, failing closed."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time

import pytest
import redis.asyncio as aioredis

from tokentill.errors import Overloaded, RateLimited
from tokentill.limits import KeyLimits, Lease, LimiterUnavailable, MemoryRateLimiter, create_limiter
from tokentill.limits.redis import ACQUIRE_LUA, FINISH_LUA, RedisRateLimiter
from tokentill.limits.redis_scripts import Script


def closed_port_url() -> str:
    """A loopback URL nothing listens on: bind an ephemeral port, then close it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"


async def hammer(
    replicas: list[RedisRateLimiter], key_id: str, limits: KeyLimits, tokens: int, count: int
) -> list[Lease]:
    """`count` concurrent acquires spread round-robin over the replicas; the admitted leases."""
    results = await asyncio.gather(
        *(replicas[i % len(replicas)].acquire(key_id, limits, tokens) for i in range(count)),
        return_exceptions=True,
    )
    unexpected = [r for r in results if not isinstance(r, Lease | RateLimited)]
    assert not unexpected, unexpected
    return [r for r in results if isinstance(r, Lease)]


@pytest.mark.redis
def test_two_replicas_share_one_limit(limits_redis_url: str, key_id: str) -> None:
    async def main() -> None:
        replicas = [RedisRateLimiter(limits_redis_url), RedisRateLimiter(limits_redis_url)]
        try:
            admitted = await hammer(replicas, key_id, KeyLimits(rpm=25), 1, 120)
            assert len(admitted) == 25

            admitted = await hammer(replicas, key_id + "t", KeyLimits(tpm=1000), 100, 60)
            assert len(admitted) == 10

            conc = KeyLimits(max_concurrent=3)
            admitted = await hammer(replicas, key_id + "c", conc, 1, 40)
            assert len(admitted) == 3
            await asyncio.gather(*(lease.release() for lease in admitted))
            assert len(await hammer(replicas, key_id + "c", conc, 1, 40)) == 3
        finally:
            await asyncio.gather(*(r.aclose() for r in replicas))

    asyncio.run(main())


@pytest.mark.redis
def test_keys_are_namespaced_and_expire(limits_redis_url: str, key_id: str) -> None:
    async def main() -> None:
        limiter = RedisRateLimiter(limits_redis_url, lease_ttl_s=120)
        client = aioredis.Redis.from_url(limits_redis_url)
        try:
            await limiter.acquire(key_id, KeyLimits(rpm=5, tpm=100, max_concurrent=2), 10)
            keys = sorted([k.decode() async for k in client.scan_iter(match=f"tt:rl:{{{key_id}}}:*")])
            assert keys == [f"tt:rl:{{{key_id}}}:{s}" for s in ("conc", "req", "tok", "tokn")]
            for key in keys:
                ttl_ms = await client.pttl(key)
                limit_ms = 121_000 if key.endswith(":conc") else 61_000
                assert 0 < ttl_ms <= limit_ms, (key, ttl_ms)
        finally:
            await client.aclose()
            await limiter.aclose()

    asyncio.run(main())


@pytest.mark.redis
def test_crashed_replicas_slot_expires(limits_redis_url: str, key_id: str) -> None:
    limits = KeyLimits(max_concurrent=1)

    async def main() -> None:
        crashed = RedisRateLimiter(limits_redis_url, lease_ttl_s=0.3)
        await crashed.acquire(key_id, limits, 1)  # never settled: the replica "dies"
        await crashed.aclose()
        survivor = RedisRateLimiter(limits_redis_url, lease_ttl_s=0.3)
        try:
            with pytest.raises(RateLimited):
                await survivor.acquire(key_id, limits, 1)
            await asyncio.sleep(0.4)
            await survivor.acquire(key_id, limits, 1)
        finally:
            await survivor.aclose()

    asyncio.run(main())


@pytest.mark.redis
def test_cancelled_acquire_leaks_no_slot(limits_redis_url: str, key_id: str) -> None:
    """Whether the script ran before the cancel or not, no concurrency slot may stay taken."""
    limits = KeyLimits(max_concurrent=50)

    async def main() -> None:
        limiter = RedisRateLimiter(limits_redis_url)
        for delay in range(30):
            task = asyncio.ensure_future(limiter.acquire(key_id, limits, 1))
            for _ in range(delay):
                await asyncio.sleep(0)
            if task.done():
                await task.result().release()
            else:
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
        await limiter.aclose()  # waits for the undo calls
        client = aioredis.Redis.from_url(limits_redis_url)
        try:
            assert await client.zcard(f"tt:rl:{{{key_id}}}:conc") == 0
        finally:
            await client.aclose()

    asyncio.run(main())


@pytest.mark.redis
def test_timed_out_acquire_gives_back_the_slot_it_took(limits_redis_url: str, key_id: str) -> None:
    """A reply that times out after the script ran: 503, and the slot it took is freed in the background.

    The kept connection's socket timeout drops to 1 µs once it is open: the command still reaches Redis
    and runs there, while its reply comes too late for the client."""
    limits = KeyLimits(max_concurrent=1, rpm=100)

    async def main() -> None:
        client = aioredis.Redis.from_url(limits_redis_url)
        try:
            for script in (ACQUIRE_LUA, FINISH_LUA):  # loaded: EVALSHA needs no second round trip
                await client.script_load(script)
            hasty = RedisRateLimiter(limits_redis_url)
            await hasty._scripts.run(Script("return 1"), [], [])  # one open connection, kept
            (conn,) = hasty._scripts._idle
            conn.socket_timeout = 0.000001
            with pytest.raises(LimiterUnavailable):
                await hasty.acquire(key_id, limits, 1)
            assert not hasty._scripts._idle  # dropped; the give-back opens a new one (timeout 1 s)
            await hasty.aclose()  # waits for the background finish
            assert await client.zcard(f"tt:rl:{{{key_id}}}:req") == 1  # the script did run
            deadline = time.monotonic() + 5
            while await client.zcard(f"tt:rl:{{{key_id}}}:conc") and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert await client.zcard(f"tt:rl:{{{key_id}}}:conc") == 0
            # The one slot is free: a healthy replica is admitted at once.
            healthy = RedisRateLimiter(limits_redis_url)
            await (await healthy.acquire(key_id, limits, 1)).release()
            await healthy.aclose()
        finally:
            await client.aclose()

    asyncio.run(main())


def test_unreachable_redis_fails_closed() -> None:
    async def main() -> None:
        limiter = RedisRateLimiter(closed_port_url())
        try:
            started = time.monotonic()
            with pytest.raises(LimiterUnavailable) as info:
                await limiter.acquire("k1", KeyLimits(rpm=5), 1)
            assert time.monotonic() - started < 5
            err = info.value
            assert isinstance(err, Overloaded) and err.status == 503
            assert err.code == "overloaded"
            assert err.headers["Retry-After"] == "1"
            assert "failing closed" in err.message
            assert "127.0.0.1" not in err.message  # no internal addresses in client-facing text
            assert err.__cause__ is not None
            # A key without limits never needs Redis.
            lease = await limiter.acquire("k2", KeyLimits(), 1)
            assert lease.headers == {}
            await lease.settle(1)
        finally:
            await limiter.aclose()

    asyncio.run(main())


@pytest.mark.redis
def test_settle_survives_redis_going_away(limits_redis_url: str, key_id: str) -> None:
    async def main() -> None:
        limiter = RedisRateLimiter(limits_redis_url)
        lease = await limiter.acquire(key_id, KeyLimits(tpm=100), 10)
        await limiter.aclose()
        dead = RedisRateLimiter(closed_port_url())
        # Re-home the lease's finish onto a limiter that cannot reach Redis: settle must log, not raise.
        orphan = Lease(lease.headers, lambda actual: dead._finish(key_id, "lease-x", actual))
        await orphan.settle(5)
        await dead.aclose()

    asyncio.run(main())


def test_create_limiter_picks_by_url() -> None:
    async def main() -> None:
        memory = create_limiter(None)
        assert isinstance(memory, MemoryRateLimiter)
        shared = create_limiter(closed_port_url())  # opens no connection yet
        assert isinstance(shared, RedisRateLimiter)
        await memory.aclose()
        await shared.aclose()

    asyncio.run(main())


def test_redis_is_imported_lazily() -> None:
    code = "import sys, tokentill.limits; assert 'redis' not in sys.modules, 'redis imported eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True, env=None)


@pytest.mark.redis
def test_retried_acquire_script_takes_once(limits_redis_url: str, key_id: str) -> None:
    """A script may be sent again (a dropped connection); the same lease id must not be counted twice."""

    async def main() -> None:
        limiter = RedisRateLimiter(limits_redis_url)
        try:
            keys = [f"tt:rl:{{{key_id}}}:{s}" for s in ("req", "tok", "tokn", "conc")]
            args = ["lease-1", 3, 100, 1, 40, 60_000_000, 900_000_000, 1_000_000]
            first = await limiter._evalsha_acquire(keys, args)
            again = await limiter._evalsha_acquire(keys, args)
            assert first.admitted and again.admitted
            assert (again.requests_used, again.tokens_used, again.concurrent_used) == (1, 40, 1)
        finally:
            await limiter.aclose()

    asyncio.run(main())


@pytest.mark.redis
def test_zero_token_reservations_leave_the_window_cleanly(limits_redis_url: str, key_id: str) -> None:
    """Issue 15.1: a lease whose reservation is 0 tokens (released after a 402, an upstream error or a
    disconnect, or admitted with 0) made the trim run `HINCRBY … -0` once it left the window; Redis
    refused that and the key's next request got 503. The window is shortened through the limiter's
    `window_s`, and the wait is that window."""
    window_s = 0.3

    async def main() -> None:
        limiter = RedisRateLimiter(limits_redis_url, window_s=window_s)
        limits = KeyLimits(rpm=100, tpm=1000, max_concurrent=5)
        try:
            released = await limiter.acquire(key_id, limits, 50)
            await released.release()  # corrected to 0 tokens
            empty = await limiter.acquire(key_id, limits, 0)
            await empty.settle(0)
            await asyncio.sleep(window_s)  # both leave the window: the trim frees 0 tokens

            assert (await limiter.peek(key_id, limits))["x-ratelimit-remaining-tokens"] == "1000"
            lease = await limiter.acquire(key_id, limits, 10)
            assert lease.headers["x-ratelimit-remaining-tokens"] == "990"
            await lease.settle(10)  # a zero correction
            assert (await limiter.peek(key_id, limits))["x-ratelimit-remaining-tokens"] == "990"
            await asyncio.sleep(window_s)

            lease = await limiter.acquire(key_id, limits, 0)
            assert lease.headers["x-ratelimit-remaining-tokens"] == "1000"
            assert lease.headers["x-ratelimit-remaining-requests"] == "99"
            await lease.settle(7)
            assert (await limiter.peek(key_id, limits))["x-ratelimit-remaining-tokens"] == "993"
        finally:
            await limiter.aclose()

    asyncio.run(main())
