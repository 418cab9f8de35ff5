"""Behaviour both limiters must share exactly (each test runs against memory and against Redis)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from tokentill.errors import RateLimited
from tokentill.limits import KeyLimits, Lease, RateLimiter

MakeLimiter = Callable[..., RateLimiter]  # the `make_limiter` fixture (tests/limits/conftest.py)


def run(make: MakeLimiter, body: Callable[[RateLimiter], Awaitable[None]], **kwargs: object) -> None:
    """Build the limiter inside a fresh event loop, run `body`, always close it."""

    async def main() -> None:
        limiter = make(**kwargs)
        try:
            await body(limiter)
        finally:
            await limiter.aclose()

    asyncio.run(main())


async def refused(limiter: RateLimiter, key_id: str, limits: KeyLimits, tokens: int) -> RateLimited:
    with pytest.raises(RateLimited) as info:
        await limiter.acquire(key_id, limits, tokens)
    return info.value


def test_burst_admits_exactly_rpm(make_limiter: MakeLimiter, key_id: str) -> None:
    n = 7
    limits = KeyLimits(rpm=n)

    async def body(limiter: RateLimiter) -> None:
        results = await asyncio.gather(
            *(limiter.acquire(key_id, limits, 1) for _ in range(3 * n)), return_exceptions=True
        )
        leases = [r for r in results if isinstance(r, Lease)]
        errors = [r for r in results if isinstance(r, RateLimited)]
        assert len(leases) == n
        assert len(errors) == 2 * n
        assert {e.limit_type for e in errors} == {"requests"}
        assert {e.code for e in errors} == {"rate_limit_exceeded"}

    run(make_limiter, body)


def test_headers_report_limit_remaining_reset(make_limiter: MakeLimiter, key_id: str) -> None:
    limits = KeyLimits(rpm=3, tpm=1000)

    async def body(limiter: RateLimiter) -> None:
        first = await limiter.acquire(key_id, limits, 100)
        assert first.headers == {
            "x-ratelimit-limit-requests": "3",
            "x-ratelimit-remaining-requests": "2",
            "x-ratelimit-reset-requests": "1m0s",
            "x-ratelimit-limit-tokens": "1000",
            "x-ratelimit-remaining-tokens": "900",
            "x-ratelimit-reset-tokens": "1m0s",
        }
        second = await limiter.acquire(key_id, limits, 250)
        assert second.headers["x-ratelimit-remaining-requests"] == "1"
        assert second.headers["x-ratelimit-remaining-tokens"] == "650"
        # The oldest request (the first one) leaves the window a little under a minute from now.
        reset = second.headers["x-ratelimit-reset-requests"]
        assert reset == "1m0s" or (reset.startswith("59.") and reset.endswith("s")), reset

    run(make_limiter, body)


def test_only_set_limit_families_emit_headers(make_limiter: MakeLimiter, key_id: str) -> None:
    async def body(limiter: RateLimiter) -> None:
        rpm_only = await limiter.acquire(key_id, KeyLimits(rpm=5), 10)
        assert set(rpm_only.headers) == {
            "x-ratelimit-limit-requests",
            "x-ratelimit-remaining-requests",
            "x-ratelimit-reset-requests",
        }
        tpm_only = await limiter.acquire(key_id + "b", KeyLimits(tpm=50), 10)
        assert set(tpm_only.headers) == {
            "x-ratelimit-limit-tokens",
            "x-ratelimit-remaining-tokens",
            "x-ratelimit-reset-tokens",
        }
        conc_only = await limiter.acquire(key_id + "c", KeyLimits(max_concurrent=1), 10)
        assert conc_only.headers == {}
        unlimited = await limiter.acquire(key_id, KeyLimits(), 10**9)
        assert unlimited.headers == {}
        for lease in (rpm_only, tpm_only, conc_only, unlimited):
            await lease.settle(1)

    run(make_limiter, body)


def test_settle_refunds_unused_tokens(make_limiter: MakeLimiter, key_id: str) -> None:
    limits = KeyLimits(tpm=1000)

    async def body(limiter: RateLimiter) -> None:
        big = await limiter.acquire(key_id, limits, 800)
        err = await refused(limiter, key_id, limits, 300)
        assert err.limit_type == "tokens"
        assert "tokens per minute (TPM): Limit 1000, Used 800, Requested 300" in err.message
        await big.settle(100)  # the worst case was 800, the request used 100
        later = await limiter.acquire(key_id, limits, 300)
        assert later.headers["x-ratelimit-remaining-tokens"] == "600"

    run(make_limiter, body)


def test_request_larger_than_tpm_never_fits(make_limiter: MakeLimiter, key_id: str) -> None:
    limits = KeyLimits(rpm=10, tpm=100)

    async def body(limiter: RateLimiter) -> None:
        err = await refused(limiter, key_id, limits, 101)
        assert err.limit_type == "tokens"
        assert err.status == 429
        assert f"Request too large for key {key_id}" in err.message
        assert "needs 101 tokens but the limit is 100 tokens per minute" in err.message
        assert err.headers["Retry-After"] == "60"
        assert err.headers["x-should-retry"] == "false"  # the openai SDK must not retry it
        lease = await limiter.acquire(key_id, limits, 100)  # nothing was taken by the refusal
        assert lease.headers["x-ratelimit-remaining-requests"] == "9"

    run(make_limiter, body)


def test_concurrency_limit_and_release(make_limiter: MakeLimiter, key_id: str) -> None:
    limits = KeyLimits(max_concurrent=2)

    async def body(limiter: RateLimiter) -> None:
        a = await limiter.acquire(key_id, limits, 5)
        await limiter.acquire(key_id, limits, 5)
        err = await refused(limiter, key_id, limits, 5)
        assert err.limit_type == "requests"
        assert "concurrent requests" in err.message
        assert "Limit 2, In flight 2" in err.message
        assert err.headers["Retry-After"] == "1"
        await a.release()
        await limiter.acquire(key_id, limits, 5)

    run(make_limiter, body)


def test_settle_and_release_are_idempotent(make_limiter: MakeLimiter, key_id: str) -> None:
    limits = KeyLimits(tpm=100, max_concurrent=1)

    async def body(limiter: RateLimiter) -> None:
        first = await limiter.acquire(key_id, limits, 50)
        await first.settle(10)
        await first.settle(10)
        await first.release()  # after settle: no refund of the 10 used tokens
        second = await limiter.acquire(key_id, limits, 0)
        assert second.headers["x-ratelimit-remaining-tokens"] == "90"
        await first.release()  # must not free `second`'s slot
        await refused(limiter, key_id, limits, 0)
        await second.release()
        await second.release()
        third = await limiter.acquire(key_id, limits, 0)
        assert third.headers["x-ratelimit-remaining-tokens"] == "90"

    run(make_limiter, body)


def test_release_refunds_tokens_but_counts_the_request(make_limiter: MakeLimiter, key_id: str) -> None:
    limits = KeyLimits(rpm=5, tpm=100)

    async def body(limiter: RateLimiter) -> None:
        lease = await limiter.acquire(key_id, limits, 100)
        await lease.release()
        after = await limiter.acquire(key_id, limits, 100)
        assert after.headers["x-ratelimit-remaining-requests"] == "3"
        assert after.headers["x-ratelimit-remaining-tokens"] == "0"

    run(make_limiter, body)


def test_refusal_takes_nothing(make_limiter: MakeLimiter, key_id: str) -> None:
    limits = KeyLimits(rpm=10, tpm=100, max_concurrent=1)

    async def body(limiter: RateLimiter) -> None:
        held = await limiter.acquire(key_id, limits, 80)
        await refused(limiter, key_id, limits, 10)  # concurrency full
        await held.settle(80)
        err = await refused(limiter, key_id, limits, 50)  # tokens full
        assert err.limit_type == "tokens"
        assert err.headers["x-ratelimit-remaining-requests"] == "9"
        lease = await limiter.acquire(key_id, limits, 20)
        assert lease.headers["x-ratelimit-remaining-requests"] == "8"
        assert lease.headers["x-ratelimit-remaining-tokens"] == "0"

    run(make_limiter, body)


def test_retry_after_is_sane(make_limiter: MakeLimiter, key_id: str) -> None:
    async def body(limiter: RateLimiter) -> None:
        limits = KeyLimits(rpm=2)
        await limiter.acquire(key_id, limits, 1)
        await limiter.acquire(key_id, limits, 1)
        err = await refused(limiter, key_id, limits, 1)
        assert 59 <= int(err.headers["Retry-After"]) <= 60
        assert 58_000 < int(err.headers["retry-after-ms"]) <= 60_000
        assert err.headers["x-ratelimit-remaining-requests"] == "0"
        assert "Limit 2, Used 2, Requested 1. Please try again in " in err.message

        tokens = KeyLimits(tpm=1000)
        await limiter.acquire(key_id + "t", tokens, 600)
        err = await refused(limiter, key_id + "t", tokens, 600)
        assert 1 <= int(err.headers["Retry-After"]) <= 60
        assert err.headers["x-ratelimit-remaining-tokens"] == "400"
        # Whole seconds rounded up, never early: the ceiling of the exact wait.
        exact_ms = int(err.headers["retry-after-ms"])
        assert int(err.headers["Retry-After"]) == max(1, -(-exact_ms // 1000))

    run(make_limiter, body)


def test_window_slides(make_limiter: MakeLimiter, key_id: str) -> None:
    """With a short window: refused now, admitted once the oldest request has left the window."""
    limits = KeyLimits(rpm=2, tpm=10)

    async def body(limiter: RateLimiter) -> None:
        await limiter.acquire(key_id, limits, 5)
        await limiter.acquire(key_id, limits, 5)
        err = await refused(limiter, key_id, limits, 1)
        assert float(err.headers["retry-after-ms"]) <= 500
        await asyncio.sleep(0.55)
        lease = await limiter.acquire(key_id, limits, 10)
        assert lease.headers["x-ratelimit-remaining-requests"] == "1"
        assert lease.headers["x-ratelimit-remaining-tokens"] == "0"

    run(make_limiter, body, window_s=0.5)


def test_key_limits_validation() -> None:
    assert not KeyLimits().any
    assert KeyLimits(max_concurrent=1).any
    with pytest.raises(ValueError):
        KeyLimits(rpm=0)
