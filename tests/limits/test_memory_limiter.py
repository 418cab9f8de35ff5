"""The sliding window is exact, checked on a controlled clock: never over, never needlessly under."""

from __future__ import annotations

import asyncio
import random

from tokentill.errors import RateLimited
from tokentill.limits import KeyLimits, MemoryRateLimiter


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_any_window_holds_at_most_rpm_and_refusals_are_justified() -> None:
    rpm, window = 5, 60.0
    rng = random.Random(7)
    clock = FakeClock()
    limiter = MemoryRateLimiter(clock=clock)
    limits = KeyLimits(rpm=rpm)
    admitted: list[float] = []

    async def main() -> None:
        for _ in range(2000):
            clock.now += rng.choice([0.0, 0.5, 3.0, 11.0, 29.9, 30.0])
            in_window = [t for t in admitted if t > clock.now - window]
            try:
                await limiter.acquire("k", limits, 1)
            except RateLimited as err:
                assert len(in_window) == rpm  # refused only when the window really is full
                retry_s = int(err.headers["retry-after-ms"]) / 1000
                assert abs(retry_s - (min(in_window) + window - clock.now)) < 0.002
            else:
                assert len(in_window) < rpm
                admitted.append(clock.now)

    asyncio.run(main())
    for i, start in enumerate(admitted):  # every window that starts at an admission
        assert sum(1 for t in admitted[i:] if t < start + window) <= rpm
    assert len(admitted) > 100


def test_retry_hint_is_exact_for_tokens() -> None:
    clock = FakeClock()
    limiter = MemoryRateLimiter(clock=clock)
    limits = KeyLimits(tpm=100)

    async def main() -> None:
        await limiter.acquire("k", limits, 60)
        clock.now += 10
        await limiter.acquire("k", limits, 30)
        clock.now += 5
        try:
            await limiter.acquire("k", limits, 50)
        except RateLimited as err:
            # 90 used, 50 wanted: the first 60 must leave, 45 s from now.
            assert err.headers["retry-after-ms"] == "45000"
        else:
            raise AssertionError("admitted over the tpm limit")
        clock.now += 44.999
        try:
            await limiter.acquire("k", limits, 50)
        except RateLimited:
            pass
        else:
            raise AssertionError("admitted before the window slid")
        clock.now += 0.001
        lease = await limiter.acquire("k", limits, 50)
        assert lease.headers["x-ratelimit-remaining-tokens"] == "20"

    asyncio.run(main())


def test_idle_keys_are_forgotten() -> None:
    clock = FakeClock()
    limiter = MemoryRateLimiter(clock=clock)

    async def main() -> None:
        for i in range(50):
            lease = await limiter.acquire(f"k{i}", KeyLimits(rpm=1, tpm=10, max_concurrent=1), 1)
            await lease.settle(1)
        clock.now += 61
        await limiter.acquire("other", KeyLimits(rpm=1), 1)
        assert set(limiter._keys) == {"other"}

    asyncio.run(main())
