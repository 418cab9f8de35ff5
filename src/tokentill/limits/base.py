"""The rate-limiter interface and what every implementation shares: limits, leases, headers, errors.

Algorithm (both implementations): a **sliding-window log** per key and limit. Every admitted request
records `(admitted_at, lease_id)`, and, when a tokens-per-minute limit applies, the tokens it reserved.
A request is admitted at time `t` only if, counting the entries in the half-open window `(t - 60 s, t]`,

* requests + 1 <= rpm,
* reserved tokens + tokens <= tpm,
* in-flight leases + 1 <= max_concurrent,

and then all three are taken together, or none is. This is exact: any 60 s window holds at most `rpm`
requests and `tpm` reserved tokens, and a fresh key admits a burst of `rpm` requests at once. A token
bucket refilling at `rpm/60` per second was considered (it is what OpenAI's headers suggest) and rejected:
after a full burst it keeps admitting one request every `60/rpm` seconds, so a 60 s window can hold up to
`2*rpm - 1` requests, which breaks the "no more than N per minute" promise.

Headers follow OpenAI's names: `x-ratelimit-limit-*`, `x-ratelimit-remaining-*`, and
`x-ratelimit-reset-*`, which here is the time until the oldest counted request (or token reservation)
leaves the window, that is, until `remaining` next goes up. With `remaining` at 0 it is the wait before
the next request can be admitted.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from tokentill.errors import Overloaded, RateLimited

__all__ = [
    "WINDOW_S",
    "CONCURRENCY_RETRY_S",
    "Decision",
    "KeyLimits",
    "Lease",
    "LimiterUnavailable",
    "RateLimiter",
    "format_reset",
    "headers_for",
    "rejection",
    "screen",
]

WINDOW_S = 60.0
"""Length of the rate-limit window: limits are per minute."""

CONCURRENCY_RETRY_S = 1.0
"""Retry hint when the concurrency limit is full: nobody knows when a running request ends."""

# Decision.failed values, shared with the Redis Lua script (keep the numbers in sync).
FAIL_NONE, FAIL_REQUESTS, FAIL_TOKENS, FAIL_CONCURRENCY = 0, 1, 2, 3


class LimiterUnavailable(Overloaded):
    """503 `overloaded`: the shared limiter's backend cannot be reached, so the request is refused
    (fail closed). A distinct class so that callers do not ask the same dead backend again (for headers)."""


@dataclass(frozen=True)
class KeyLimits:
    """Per-key limits; `None` means unlimited. Values must be positive."""

    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None

    def __post_init__(self) -> None:
        for name in ("rpm", "tpm", "max_concurrent"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"KeyLimits.{name} must be >= 1 or None, got {value!r}")

    @property
    def any(self) -> bool:
        """True when at least one limit is set (otherwise a limiter does no work at all)."""
        return self.rpm is not None or self.tpm is not None or self.max_concurrent is not None


@dataclass(frozen=True)
class Decision:
    """What one atomic check saw, in seconds; the same shape from memory and from Redis.

    `*_used` counts usage before this request when it was refused, and including it when admitted.
    `*_reset_s` is the time until the oldest counted entry leaves the window (0 when none).
    `failed` is one of the FAIL_* codes; `retry_s` is the wait for the limit that failed.
    """

    admitted: bool
    failed: int
    retry_s: float
    requests_used: int
    requests_reset_s: float
    tokens_used: int
    tokens_reset_s: float
    concurrent_used: int


class Lease:
    """An admitted request's claim on its key's limits, returned by `RateLimiter.acquire`.

    Exactly one of `settle` / `release` takes effect; later calls (of either) are no-ops. Both are safe in
    a `finally:` under a cancel shield: they never raise for a backend failure (they log it, and the
    reservation then simply ages out of the window, the concurrency slot out of its lease TTL).
    """

    __slots__ = ("_finish", "headers")

    def __init__(self, headers: dict[str, str], finish: Callable[[int], Awaitable[None]] | None) -> None:
        self.headers = headers
        self._finish = finish

    async def settle(self, actual_tokens: int) -> None:
        """Correct the token reservation to `actual_tokens` and end the concurrency slot.

        Fewer tokens than reserved are refunded to the window; more are recorded as used (the window
        reflects real usage even when an engine overran its budget). The request still counts for rpm.
        """
        if actual_tokens < 0:
            raise ValueError(f"actual_tokens must be >= 0, got {actual_tokens}")
        finish, self._finish = self._finish, None
        # The flag flips before the await: a second call while the first is in flight is still a no-op.
        if finish is not None:
            await finish(actual_tokens)

    async def release(self) -> None:
        """The request failed or was cancelled before using tokens: refund them all, end the slot.

        The request itself still counts toward rpm (it was admitted and reached the server).
        """
        await self.settle(0)


class RateLimiter(Protocol):
    """Per-key rpm / tpm / concurrency limits, exact across every replica sharing the backend."""

    async def acquire(self, key_id: str, limits: KeyLimits, tokens: int) -> Lease:
        """Admit one request reserving `tokens` (worst case: prompt + completion budget), or raise.

        Raises `RateLimited` (429) when any limit is full; nothing is taken then. Raises
        `LimiterUnavailable` (503) when a shared backend cannot be reached (fail closed). With no
        limits set it returns a lease with empty headers and touches no backend.
        """
        ...

    async def peek(self, key_id: str, limits: KeyLimits) -> dict[str, str]:
        """The x-ratelimit-* headers as they stand now, taking nothing (for responses that were never
        admitted, such as a 400 after authentication). Never raises: `{}` when the backend fails."""
        ...

    async def aclose(self) -> None:
        """Release connections; the limiter is unusable afterwards."""
        ...


def format_reset(seconds: float) -> str:
    """Format a duration the way OpenAI's `x-ratelimit-reset-*` headers do (Go's Duration style).

    Millisecond precision: `0s`, `20ms`, `1s`, `1.5s`, `1m30s`, `6m0s`, `1h0m0s`. Negative → `0s`.
    """
    ms = max(0, math.ceil(seconds * 1000 - 1e-6))  # round up: "retry in" must never be too early
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, frac = divmod(rest, 1000)
    sec_text = f"{secs}.{frac:03d}".rstrip("0") if frac else str(secs)
    if hours:
        return f"{hours}h{minutes}m{sec_text}s"
    if minutes:
        return f"{minutes}m{sec_text}s"
    return f"{sec_text}s"


def headers_for(limits: KeyLimits, decision: Decision) -> dict[str, str]:
    """The x-ratelimit-* headers for the limit families that are set (no concurrency header exists)."""
    headers: dict[str, str] = {}
    if limits.rpm is not None:
        headers["x-ratelimit-limit-requests"] = str(limits.rpm)
        headers["x-ratelimit-remaining-requests"] = str(max(0, limits.rpm - decision.requests_used))
        headers["x-ratelimit-reset-requests"] = format_reset(decision.requests_reset_s)
    if limits.tpm is not None:
        headers["x-ratelimit-limit-tokens"] = str(limits.tpm)
        headers["x-ratelimit-remaining-tokens"] = str(max(0, limits.tpm - decision.tokens_used))
        headers["x-ratelimit-reset-tokens"] = format_reset(decision.tokens_reset_s)
    return headers


def screen(key_id: str, limits: KeyLimits, tokens: int) -> bool:
    """Checks that need no state: False when no limit applies (admit without touching any backend).

    Raises `RateLimited` for a request whose `tokens` exceed `tpm` (it can never fit, so nothing is
    taken) and `ValueError` for a negative `tokens` (a caller bug, not a client error).
    """
    if tokens < 0:
        raise ValueError(f"tokens must be >= 0, got {tokens}")
    if not limits.any:
        return False
    if limits.tpm is not None and tokens > limits.tpm:
        raise RateLimited(
            f"Request too large for key {key_id}: the request needs {tokens} tokens but the limit is "
            f"{limits.tpm} tokens per minute. Lower max_completion_tokens or shorten the prompt.",
            limit_type="tokens",
            retry_after_s=WINDOW_S,
            # Waiting cannot help: the openai SDK honours this and does not retry.
            headers={"x-should-retry": "false"},
        )
    return True


def rejection(key_id: str, limits: KeyLimits, tokens: int, decision: Decision) -> RateLimited:
    """The 429 for a refused `decision`, carrying the x-ratelimit-* headers and a precise retry hint."""
    retry_s = max(decision.retry_s, 0.001)
    wait = format_reset(retry_s)
    if decision.failed == FAIL_TOKENS:
        limit_type = "tokens"
        message = (
            f"Rate limit reached for key {key_id} on tokens per minute (TPM): Limit {limits.tpm}, "
            f"Used {decision.tokens_used}, Requested {tokens}. Please try again in {wait}."
        )
    elif decision.failed == FAIL_CONCURRENCY:
        limit_type = "requests"
        message = (
            f"Too many concurrent requests for key {key_id}: Limit {limits.max_concurrent}, "
            f"In flight {decision.concurrent_used}. Please try again when one finishes (in {wait})."
        )
    else:
        limit_type = "requests"
        message = (
            f"Rate limit reached for key {key_id} on requests per minute (RPM): Limit {limits.rpm}, "
            f"Used {decision.requests_used}, Requested 1. Please try again in {wait}."
        )
    headers = headers_for(limits, decision)
    # The official openai SDK prefers this to Retry-After (whole seconds) when it decides how long to wait.
    headers["retry-after-ms"] = str(max(1, math.ceil(retry_s * 1000)))
    headers["Retry-After"] = str(max(1, math.ceil(retry_s)))  # whole seconds, never too early
    return RateLimited(message, limit_type=limit_type, retry_after_s=retry_s, headers=headers)
