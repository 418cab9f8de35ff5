"""In-process rate limits for a single tokentill process (the embedded default).

Atomicity: everything runs on one event loop and `acquire`'s check-and-take contains no `await`, so no
other task can interleave between the check and the take. Not thread-safe and not shared between
`--workers` processes: with several workers or replicas use `RedisRateLimiter`.

Clock: `time.monotonic` (never goes back, immune to NTP steps), so windows are exact within the process.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from tokentill.limits.base import (
    CONCURRENCY_RETRY_S,
    FAIL_CONCURRENCY,
    FAIL_NONE,
    FAIL_REQUESTS,
    FAIL_TOKENS,
    WINDOW_S,
    Decision,
    KeyLimits,
    Lease,
    headers_for,
    rejection,
    screen,
)

__all__ = ["MemoryRateLimiter"]

logger = logging.getLogger(__name__)


@dataclass
class _KeyState:
    """One key's window. Deques are oldest-first because the monotonic clock never decreases."""

    requests: deque[float] = field(default_factory=deque)  # admission times
    tokens: deque[tuple[float, str]] = field(default_factory=deque)  # (admission time, lease id)
    token_amounts: dict[str, int] = field(default_factory=dict)  # lease id -> tokens counted
    token_sum: int = 0
    inflight: dict[str, float] = field(default_factory=dict)  # lease id -> slot expiry

    def trim(self, now: float, window_s: float) -> None:
        cutoff = now - window_s  # the window is (now - window, now]
        while self.requests and self.requests[0] <= cutoff:
            self.requests.popleft()
        while self.tokens and self.tokens[0][0] <= cutoff:
            _, lease_id = self.tokens.popleft()
            self.token_sum -= self.token_amounts.pop(lease_id, 0)
        for lease_id in [k for k, expires in self.inflight.items() if expires <= now]:
            logger.warning("concurrency slot %s expired without being settled", lease_id)
            del self.inflight[lease_id]

    @property
    def empty(self) -> bool:
        return not (self.requests or self.tokens or self.inflight)


class MemoryRateLimiter:
    """Exact sliding-window rpm / tpm and a concurrency cap per key, held in this process.

    `window_s` (60) and `clock` exist for tests; `lease_ttl_s` bounds how long a lease that is never
    settled (a bug) can hold a concurrency slot.
    """

    def __init__(
        self,
        *,
        lease_ttl_s: float = 900.0,
        window_s: float = WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lease_ttl_s = lease_ttl_s
        self._window_s = window_s
        self._clock = clock
        self._keys: dict[str, _KeyState] = {}
        self._last_sweep = clock()

    async def acquire(self, key_id: str, limits: KeyLimits, tokens: int) -> Lease:
        """See `RateLimiter.acquire`."""
        if not screen(key_id, limits, tokens):
            return Lease({}, None)
        # No await from here to the return: the check and the take are one atomic step on the loop.
        now = self._clock()
        self._sweep(now)
        state = self._keys.setdefault(key_id, _KeyState())
        state.trim(now, self._window_s)
        decision = self._decide(state, limits, tokens, now)
        if not decision.admitted:
            raise rejection(key_id, limits, tokens, decision)
        lease_id = uuid.uuid4().hex
        if limits.rpm is not None:
            state.requests.append(now)
        if limits.tpm is not None:
            state.tokens.append((now, lease_id))
            state.token_amounts[lease_id] = tokens
            state.token_sum += tokens
        if limits.max_concurrent is not None:
            state.inflight[lease_id] = now + self._lease_ttl_s
        admitted = self._decide(state, limits, 0, now, after_admission=True)

        async def finish(actual_tokens: int) -> None:
            self._finish(key_id, lease_id, actual_tokens)

        return Lease(headers_for(limits, admitted), finish)

    async def peek(self, key_id: str, limits: KeyLimits) -> dict[str, str]:
        """See `RateLimiter.peek`."""
        if limits.rpm is None and limits.tpm is None:
            return {}
        now = self._clock()
        state = self._keys.get(key_id) or _KeyState()
        state.trim(now, self._window_s)
        return headers_for(limits, self._decide(state, limits, 0, now, after_admission=True))

    async def aclose(self) -> None:
        """Forget all state."""
        self._keys.clear()

    def _finish(self, key_id: str, lease_id: str, actual_tokens: int) -> None:
        state = self._keys.get(key_id)
        if state is None:  # swept: its window has already passed
            return
        reserved = state.token_amounts.get(lease_id)
        if reserved is not None:  # still in the window: correct the reservation to real usage
            state.token_amounts[lease_id] = actual_tokens
            state.token_sum += actual_tokens - reserved
        state.inflight.pop(lease_id, None)

    def _decide(
        self, state: _KeyState, limits: KeyLimits, tokens: int, now: float, *, after_admission: bool = False
    ) -> Decision:
        """Check every limit on a trimmed `state`; the longest wait names the limit reported."""
        window = self._window_s
        failures: list[tuple[float, int]] = []
        requests_used = len(state.requests)
        if not after_admission and limits.rpm is not None and requests_used + 1 > limits.rpm:
            # The (used - rpm + 1)-th oldest entry must leave before one more fits (rpm may have shrunk).
            failures.append((state.requests[requests_used - limits.rpm] + window - now, FAIL_REQUESTS))
        if not after_admission and limits.tpm is not None and state.token_sum + tokens > limits.tpm:
            freed, wait = 0, window
            for admitted_at, lease_id in state.tokens:
                freed += state.token_amounts.get(lease_id, 0)
                if state.token_sum - freed + tokens <= limits.tpm:
                    wait = admitted_at + window - now
                    break
            failures.append((wait, FAIL_TOKENS))
        if (
            not after_admission
            and limits.max_concurrent is not None
            and len(state.inflight) + 1 > limits.max_concurrent
        ):
            failures.append((CONCURRENCY_RETRY_S, FAIL_CONCURRENCY))
        # Ties go to requests, then tokens, then concurrency (the order above; max keeps the first).
        retry_s, failed = max(failures, key=lambda f: f[0]) if failures else (0.0, FAIL_NONE)
        return Decision(
            admitted=not failures,
            failed=failed,
            retry_s=max(retry_s, 0.0),
            requests_used=requests_used,
            requests_reset_s=state.requests[0] + window - now if state.requests else 0.0,
            tokens_used=state.token_sum,
            tokens_reset_s=state.tokens[0][0] + window - now if state.tokens else 0.0,
            concurrent_used=len(state.inflight),
        )

    def _sweep(self, now: float) -> None:
        """Once per window, drop idle keys so memory follows active keys, not every key ever seen."""
        if now - self._last_sweep < self._window_s:
            return
        self._last_sweep = now
        for key_id in list(self._keys):
            state = self._keys[key_id]
            state.trim(now, self._window_s)
            if state.empty:
                del self._keys[key_id]
