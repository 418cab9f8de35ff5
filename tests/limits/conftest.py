"""Fixtures for the limiter tests: both implementations, a real Redis, and per-test key ids.

Redis comes from TOKENTILL_TEST_REDIS_URL (default redis://127.0.0.1:6379/0). Missing Redis skips the
Redis half locally and fails it under CI=true. Tests only ever delete their own `tt:rl:{<key id>...}:*`
keys; nothing here flushes a database.
"""

from __future__ import annotations

import functools
import os
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis
from tests._services import require

from tokentill.limits import MemoryRateLimiter, RateLimiter
from tokentill.limits.redis import RedisRateLimiter

MakeLimiter = Callable[..., RateLimiter]


@pytest.fixture(scope="session")
def limits_redis_url() -> str:
    """A reachable Redis URL, or skip (locally) / fail (CI=true)."""
    url = os.environ.get("TOKENTILL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
    try:
        client.ping()
    except redis.RedisError as exc:
        require("Redis", f"not reachable at {url}: {exc!r}")
    finally:
        client.close()
    return url


@pytest.fixture
def key_id(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh API key id; its Redis keys (if any were made) are deleted afterwards."""
    kid = f"t{uuid.uuid4().hex[:12]}"
    yield kid
    if "limits_redis_url" in request.fixturenames:
        url = request.getfixturevalue("limits_redis_url")
        client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
        try:
            own = list(client.scan_iter(match=f"tt:rl:{{{kid}*"))
            if own:
                client.delete(*own)
        finally:
            client.close()


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def make_limiter(request: pytest.FixtureRequest) -> MakeLimiter:
    """A factory for the limiter under test; call it inside the test's event loop."""
    if request.param == "memory":
        return MemoryRateLimiter
    url: str = request.getfixturevalue("limits_redis_url")
    return functools.partial(RedisRateLimiter, url)
