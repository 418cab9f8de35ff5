"""Rate limits shared by every replica through one Redis: exact, atomic, one round trip per request.

Atomicity: `acquire` is a single EVALSHA of `ACQUIRE_LUA`, which trims, checks rpm + tpm + concurrency
and takes all three (or nothing) inside Redis, where scripts run one at a time. No WATCH/MULTI retries,
no read-then-write race between replicas.

Clocks: the script reads `redis.call('TIME')`, the Redis server's clock, so replicas whose own clocks are
skewed still agree on every window. (A Redis failover to a host with a different clock can shift windows
by the skew between the two Redis hosts; it cannot double-admit within one primary's lifetime.)

Keys, per API key id (the `{...}` is a Redis Cluster hash tag, so one key's data shares a slot, which a
multi-key script needs): `tt:rl:{id}:req` (zset lease → admitted_at µs), `tt:rl:{id}:tok` (zset lease →
admitted_at µs), `tt:rl:{id}:tokn` (hash lease → tokens counted, plus field `~sum`), `tt:rl:{id}:conc`
(zset lease → slot expiry µs). Each write refreshes a PEXPIRE, so an idle key's data vanishes after a
window (concurrency slots: after the lease TTL); a replica that crashes mid-request leaks its slot only
until that TTL.

Retries and cancellation: a script is sent once more after a dropped idle connection (`redis_scripts`),
and the first attempt may already have run, so the script is idempotent per lease id (a resend never
takes twice). A caller cancelled while the script is in flight leaves a tracked task that releases the
lease if it was admitted.

Failure: any Redis error or timeout on `acquire` raises `LimiterUnavailable` (503 `overloaded`): we fail
closed rather than serve unmetered. A timeout can come *after* the script ran and took a slot, so a
failed acquire also schedules a background FINISH with 0 tokens for its lease id (harmless when nothing
was taken). `settle`/`release` never raise; they log, and the reservation ages out.
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from collections.abc import Coroutine
from typing import Any
from urllib.parse import urlsplit

from redis.exceptions import RedisError

from tokentill.limits.base import (
    CONCURRENCY_RETRY_S,
    WINDOW_S,
    Decision,
    KeyLimits,
    Lease,
    LimiterUnavailable,
    headers_for,
    rejection,
    screen,
)
from tokentill.limits.redis_scripts import Script, ScriptRunner

__all__ = ["ACQUIRE_LUA", "FINISH_LUA", "PEEK_LUA", "RedisRateLimiter"]

logger = logging.getLogger(__name__)

_REDIS_FAILURES = (RedisError, OSError)  # OSError covers socket errors and builtin TimeoutError
_GIVE_BACK_DELAYS_S = (0.0, 0.5, 2.0)  # after a failed acquire, when to try freeing its slot
_CLOSE_WAIT_S = 3.0  # how long `aclose` waits for those background calls

# Shared by the scripts below. `int` renders a count as HINCRBY's argument: Lua negates 0 to -0, which
# redis.call sends as "-0", and HINCRBY refuses that ("value is not an integer"), so every increment goes
# through `%d` and a zero increment is skipped. `trim_tokens` drops token reservations that left the
# window and returns the tokens still in it.
_TRIM_TOKENS_LUA = """
local function int(n)
  return string.format('%d', n)
end
local function trim_tokens(cutoff)
  local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', cutoff)
  if #expired > 0 then
    local freed = 0
    for _, m in ipairs(expired) do
      freed = freed + (tonumber(redis.call('HGET', KEYS[3], m)) or 0)
      redis.call('HDEL', KEYS[3], m)
    end
    redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', cutoff)
    if freed ~= 0 then redis.call('HINCRBY', KEYS[3], '~sum', int(-freed)) end
  end
  return tonumber(redis.call('HGET', KEYS[3], '~sum')) or 0
end
"""

ACQUIRE_LUA = (
    _TRIM_TOKENS_LUA
    + """
-- KEYS: 1 req zset, 2 tok zset, 3 tok hash (lease -> tokens, '~sum'), 4 conc zset
-- ARGV: 1 lease id, 2 rpm, 3 tpm, 4 max_concurrent (0 = no limit), 5 tokens, 6 window us,
--       7 lease ttl us, 8 concurrency retry us
-- Returns {admitted, failed, retry_us, req_used, req_reset_us, tok_used, tok_reset_us, conc_used}
-- (failed: 0 none, 1 requests, 2 tokens, 3 concurrency -- limits/base.py FAIL_*).
if redis.replicate_commands then pcall(redis.replicate_commands) end  -- Redis < 5: replicate effects
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local lease = ARGV[1]
local rpm, tpm, maxc = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local tokens, window, ttl = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local conc_retry = tonumber(ARGV[8])
local cutoff = now - window  -- the window is (now - window, now]
local key_ttl_ms = math.ceil(window / 1000) + 1000

local req_used, tok_used, conc_used = 0, 0, 0
if rpm > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', cutoff)
  req_used = redis.call('ZCARD', KEYS[1])
end
if tpm > 0 then
  tok_used = trim_tokens(cutoff)
end
if maxc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)  -- slots of crashed replicas expire here
  conc_used = redis.call('ZCARD', KEYS[4])
end

-- Idempotent per lease id: redis-py retries a command once after a connection error or timeout, and
-- the first attempt may have run. A lease already recorded is admitted again without taking twice.
local seen = (rpm > 0 and redis.call('ZSCORE', KEYS[1], lease))
  or (tpm > 0 and redis.call('HEXISTS', KEYS[3], lease) == 1)
  or (maxc > 0 and redis.call('ZSCORE', KEYS[4], lease))

-- The longest wait names the limit reported; ties go to requests, then tokens, then concurrency.
local failed, retry = 0, -1
if seen then
  -- already admitted: skip the checks
elseif rpm > 0 and req_used + 1 > rpm then
  local e = redis.call('ZRANGE', KEYS[1], req_used - rpm, req_used - rpm, 'WITHSCORES')
  local wait = tonumber(e[2]) + window - now
  if wait > retry then failed, retry = 1, wait end
end
if not seen and tpm > 0 and tok_used + tokens > tpm then
  -- Walk reservations oldest first until enough would have left the window (refusal path only).
  local wait, freed, start, done = window, 0, 0, false
  while not done do
    local batch = redis.call('ZRANGE', KEYS[2], start, start + 255, 'WITHSCORES')
    if #batch == 0 then break end
    for i = 1, #batch, 2 do
      freed = freed + (tonumber(redis.call('HGET', KEYS[3], batch[i])) or 0)
      if tok_used - freed + tokens <= tpm then
        wait, done = tonumber(batch[i + 1]) + window - now, true
        break
      end
    end
    start = start + 256
  end
  if wait > retry then failed, retry = 2, wait end
end
if not seen and maxc > 0 and conc_used + 1 > maxc then
  if conc_retry > retry then failed, retry = 3, conc_retry end
end

if failed == 0 then retry = 0 end
if failed == 0 and not seen then
  if rpm > 0 then
    redis.call('ZADD', KEYS[1], now, lease)
    redis.call('PEXPIRE', KEYS[1], key_ttl_ms)
    req_used = req_used + 1
  end
  if tpm > 0 then
    redis.call('ZADD', KEYS[2], now, lease)
    redis.call('HSET', KEYS[3], lease, int(tokens))
    if tokens ~= 0 then redis.call('HINCRBY', KEYS[3], '~sum', int(tokens)) end
    redis.call('PEXPIRE', KEYS[2], key_ttl_ms)
    redis.call('PEXPIRE', KEYS[3], key_ttl_ms)
    tok_used = tok_used + tokens
  end
  if maxc > 0 then
    redis.call('ZADD', KEYS[4], now + ttl, lease)
    redis.call('PEXPIRE', KEYS[4], math.ceil(ttl / 1000) + 1000)
    conc_used = conc_used + 1
  end
end

local req_reset, tok_reset = 0, 0
if rpm > 0 and req_used > 0 then
  req_reset = tonumber(redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')[2]) + window - now
end
if tpm > 0 then
  local oldest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  if #oldest > 0 then tok_reset = tonumber(oldest[2]) + window - now end
end
return {failed == 0 and 1 or 0, failed, retry, req_used, req_reset, tok_used, tok_reset, conc_used}
"""
)

FINISH_LUA = """
-- KEYS: 1 tok hash, 2 conc zset.  ARGV: 1 lease id, 2 actual tokens.
-- Corrects a reservation still in the window (HSET/HINCRBY keep the key's TTL; an expired hash is
-- left alone, never recreated), then frees the concurrency slot. Counts go through '%d' and a zero
-- change is skipped, as in _TRIM_TOKENS_LUA.
local reserved = redis.call('HGET', KEYS[1], ARGV[1])
if reserved then
  local change = tonumber(ARGV[2]) - tonumber(reserved)
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  if change ~= 0 then redis.call('HINCRBY', KEYS[1], '~sum', string.format('%d', change)) end
end
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"""

PEEK_LUA = (
    _TRIM_TOKENS_LUA
    + """
-- KEYS: 1 req zset, 2 tok zset, 3 tok hash.  ARGV: 1 rpm, 2 tpm (0 = no limit), 3 window us.
-- Trims like ACQUIRE_LUA and reports {req_used, req_reset_us, tok_used, tok_reset_us}; takes nothing.
if redis.replicate_commands then pcall(redis.replicate_commands) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local rpm, tpm, window = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local cutoff = now - window
local req_used, req_reset, tok_used, tok_reset = 0, 0, 0, 0
if rpm > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', cutoff)
  req_used = redis.call('ZCARD', KEYS[1])
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  if #oldest > 0 then req_reset = tonumber(oldest[2]) + window - now end
end
if tpm > 0 then
  tok_used = trim_tokens(cutoff)
  local oldest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  if #oldest > 0 then tok_reset = tonumber(oldest[2]) + window - now end
end
return {req_used, req_reset, tok_used, tok_reset}
"""
)

_ACQUIRE, _FINISH, _PEEK = Script(ACQUIRE_LUA), Script(FINISH_LUA), Script(PEEK_LUA)


def _keys(key_id: str) -> tuple[str, str, str, str]:
    prefix = f"tt:rl:{{{key_id}}}"
    return f"{prefix}:req", f"{prefix}:tok", f"{prefix}:tokn", f"{prefix}:conc"


def _us(seconds: float) -> int:
    return math.ceil(seconds * 1_000_000)


class RedisRateLimiter:
    """Exact sliding-window rpm / tpm and a concurrency cap per key, shared through Redis.

    `url` is a redis:// or rediss:// URL. Timeouts are explicit and short so a dead Redis costs a
    request about a second before the 503, not the client's patience. `lease_ttl_s` bounds how long a
    crashed replica's concurrency slot survives; keep it above the longest request deadline.
    `window_s` exists for tests.
    """

    def __init__(
        self,
        url: str,
        *,
        lease_ttl_s: float = 900.0,
        window_s: float = WINDOW_S,
        connect_timeout_s: float = 1.0,
        socket_timeout_s: float = 1.0,
    ) -> None:
        self._where = _redacted(url)
        self._lease_ttl_us = _us(lease_ttl_s)
        self._window_us = _us(window_s)
        # A dead Redis fails fast (redis-py's client default is 10 retries with exponential backoff); an
        # idle connection that Redis closed is retried once on a fresh one (`ScriptRunner`).
        self._scripts = ScriptRunner(
            url, connect_timeout_s=connect_timeout_s, socket_timeout_s=socket_timeout_s
        )
        self._background: set[asyncio.Task[None]] = set()

    async def acquire(self, key_id: str, limits: KeyLimits, tokens: int) -> Lease:
        """See `RateLimiter.acquire`. One EVALSHA; raises `LimiterUnavailable` if Redis fails."""
        if not screen(key_id, limits, tokens):
            return Lease({}, None)
        lease_id = uuid.uuid4().hex
        keys = _keys(key_id)
        args = [
            lease_id,
            limits.rpm or 0,
            limits.tpm or 0,
            limits.max_concurrent or 0,
            tokens,
            self._window_us,
            self._lease_ttl_us,
            _us(CONCURRENCY_RETRY_S),
        ]
        # Cancellation hazard: if the caller is cancelled while the script is in flight, Redis may still
        # admit the request, leaving a concurrency slot nobody settles (for the whole lease TTL). The call
        # therefore runs as its own task; a cancelled caller leaves a tracked task that waits for it and
        # releases the lease if it was admitted (`aclose` waits for those).
        call = asyncio.ensure_future(self._evalsha_acquire(list(keys), args))
        try:
            decision = await asyncio.shield(call)
        except asyncio.CancelledError:
            self._in_background(self._undo_if_admitted(call, key_id, lease_id))
            raise
        except LimiterUnavailable:
            # A reply that timed out may belong to a script that ran and took the slot: give it back.
            self._in_background(self._give_back(key_id, lease_id))
            raise
        if not decision.admitted:
            raise rejection(key_id, limits, tokens, decision)
        headers = headers_for(limits, decision)
        if limits.tpm is None and limits.max_concurrent is None:
            return Lease(headers, None)  # rpm only: nothing to correct at the end, save the round trip

        async def finish(actual_tokens: int) -> None:
            await self._finish(key_id, lease_id, actual_tokens)

        return Lease(headers, finish)

    async def peek(self, key_id: str, limits: KeyLimits) -> dict[str, str]:
        """See `RateLimiter.peek`. One EVALSHA; `{}` if Redis fails (the response goes out without)."""
        if limits.rpm is None and limits.tpm is None:
            return {}
        req, tok, tokn, _ = _keys(key_id)
        try:
            raw = await self._scripts.run(
                _PEEK, [req, tok, tokn], [limits.rpm or 0, limits.tpm or 0, self._window_us]
            )
        except _REDIS_FAILURES as exc:
            logger.warning("rate limiter: Redis at %s failed on peek: %r", self._where, exc)
            return {}
        req_used, req_reset_us, tok_used, tok_reset_us = (int(v) for v in raw)
        decision = Decision(
            admitted=True,
            failed=0,
            retry_s=0.0,
            requests_used=req_used,
            requests_reset_s=req_reset_us / 1e6,
            tokens_used=tok_used,
            tokens_reset_s=tok_reset_us / 1e6,
            concurrent_used=0,
        )
        return headers_for(limits, decision)

    async def aclose(self) -> None:
        """Wait (briefly) for pending undo / give-back calls, then close the connection pool.

        They are best effort: against a Redis that does not answer, shutdown must not wait out their
        retries, and a slot they could not free expires with its lease TTL anyway.
        """
        if self._background:
            _, pending = await asyncio.wait(set(self._background), timeout=_CLOSE_WAIT_S)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self._scripts.aclose()

    def _in_background(self, job: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(job)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _evalsha_acquire(self, keys: list[str], args: list[Any]) -> Decision:
        try:
            raw = await self._scripts.run(_ACQUIRE, keys, args)
        except _REDIS_FAILURES as exc:
            logger.warning("rate limiter: Redis at %s failed: %r; refusing the request", self._where, exc)
            raise LimiterUnavailable(
                "Rate limiter unavailable: cannot reach Redis; failing closed. Please retry shortly.",
                retry_after_s=1,
            ) from exc
        admitted, failed, retry_us, req_used, req_reset_us, tok_used, tok_reset_us, conc_used = (
            int(v) for v in raw
        )
        return Decision(
            admitted=bool(admitted),
            failed=failed,
            retry_s=retry_us / 1e6,
            requests_used=req_used,
            requests_reset_s=req_reset_us / 1e6,
            tokens_used=tok_used,
            tokens_reset_s=tok_reset_us / 1e6,
            concurrent_used=conc_used,
        )

    async def _give_back(self, key_id: str, lease_id: str) -> None:
        """Free whatever a failed acquire may have taken; Redis was just failing, so try a few times."""
        for delay in _GIVE_BACK_DELAYS_S:
            await asyncio.sleep(delay)
            if await self._finish(key_id, lease_id, 0):
                return

    async def _finish(self, key_id: str, lease_id: str, actual_tokens: int) -> bool:
        """Run FINISH_LUA; False (logged) when Redis failed."""
        _, _, tok_hash, conc = _keys(key_id)
        try:
            await self._scripts.run(_FINISH, [tok_hash, conc], [lease_id, actual_tokens])
            return True
        except _REDIS_FAILURES as exc:
            # Never raise from settle/release (they run in `finally:`); the reservation ages out of the
            # window and the slot out of its lease TTL.
            logger.warning(
                "rate limiter: could not settle lease %s of key %s at %s: %r",
                lease_id,
                key_id,
                self._where,
                exc,
            )
            return False

    async def _undo_if_admitted(self, call: asyncio.Future[Decision], key_id: str, lease_id: str) -> None:
        try:
            decision = await call
        except Exception:  # LimiterUnavailable: a timed-out script may still have taken the slot
            decision = None
        if decision is None or decision.admitted:
            await self._finish(key_id, lease_id, 0)


def _redacted(url: str) -> str:
    """host:port/db of a Redis URL, without credentials, for logs."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or 'localhost'}:{parts.port or 6379}{parts.path}"
