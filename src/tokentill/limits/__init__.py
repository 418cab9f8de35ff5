"""Per-key rate limits: requests per minute, tokens per minute, concurrent requests.

`create_limiter(settings.redis_url)` picks the implementation: in-process (`MemoryRateLimiter`) without a
URL, shared through Redis (`RedisRateLimiter`, imported only then) with one. Both admit exactly the same
requests; see `limits.base` for the algorithm and the header semantics.

Use::

    lease = await limiter.acquire(key_id, limits, prompt_tokens + max_completion_tokens)  # 429 / 503
    try:
        ...  # generate
    finally:
        with anyio.CancelScope(shield=True):
            await lease.settle(usage.total_tokens)  # or lease.release() if nothing was generated
"""

from __future__ import annotations

from tokentill.limits.base import KeyLimits, Lease, LimiterUnavailable, RateLimiter, format_reset
from tokentill.limits.memory import MemoryRateLimiter

__all__ = [
    "KeyLimits",
    "Lease",
    "LimiterUnavailable",
    "MemoryRateLimiter",
    "RateLimiter",
    "create_limiter",
    "format_reset",
]


def create_limiter(redis_url: str | None, *, lease_ttl_s: float = 900.0) -> RateLimiter:
    """The shared Redis limiter when `redis_url` is set, else the in-process one. Opens no connection."""
    if redis_url:
        from tokentill.limits.redis import RedisRateLimiter  # lazy: redis loads only when configured

        return RedisRateLimiter(redis_url, lease_ttl_s=lease_ttl_s)
    return MemoryRateLimiter(lease_ttl_s=lease_ttl_s)
