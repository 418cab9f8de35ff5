"""Per-request cost of rate limiting: no limits vs the in-process limiter vs Redis, in one run.

Part 1, the limiter alone: `acquire` + `settle` per request, N iterations sequentially and N spread over
16 concurrent tasks, for (a) a key with no limits (the baseline: the limiter returns without touching any
state), (b) `MemoryRateLimiter` and (c) `RedisRateLimiter`, each with rpm, tpm and max_concurrent set (so
every request does the full check-and-take and the settle round trip). Limits are huge, nothing refused.

Part 2, the same HTTP request (`tokentill serve` subprocess, SQLite, the deterministic `echo` engine, so
the model costs nothing and the gateway is all there is): an unlimited key vs a key with rpm + tpm +
max_concurrent, on a server with the in-process limiter and on one with TOKENTILL_REDIS_URL.

    .venv/bin/python bench/limiter_overhead.py [--iterations 5000] [--http 300] [--redis URL]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import redis
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.e2e.conftest import TokentillServer  # noqa: E402

from tokentill.limits import KeyLimits, MemoryRateLimiter, RateLimiter  # noqa: E402
from tokentill.limits.redis import RedisRateLimiter  # noqa: E402

CONCURRENCY = 16
LIMITED = KeyLimits(rpm=10**9, tpm=10**12, max_concurrent=10**6)
BODY = {"messages": [{"role": "user", "content": "one two three four"}], "max_completion_tokens": 8}


async def _per_request_us(limiter: RateLimiter, limits: KeyLimits, n: int, tasks: int) -> float:
    key_id = "bench" + uuid.uuid4().hex[:10]

    async def worker(count: int) -> None:
        for _ in range(count):
            lease = await limiter.acquire(key_id, limits, 100)
            await lease.settle(60)

    await worker(min(n, 50))  # warm-up: connections, script load
    start = time.perf_counter()
    await asyncio.gather(*(worker(n // tasks) for _ in range(tasks)))
    return (time.perf_counter() - start) / (n // tasks * tasks) * 1e6


async def limiter_alone(n: int, redis_url: str) -> list[tuple[str, float, float]]:
    rows: list[tuple[str, float, float]] = []
    cases: list[tuple[str, Callable[[], RateLimiter], KeyLimits]] = [
        ("no limits", MemoryRateLimiter, KeyLimits()),
        ("in-process", MemoryRateLimiter, LIMITED),
        ("redis", lambda: RedisRateLimiter(redis_url), LIMITED),
    ]
    for name, make, limits in cases:
        limiter = make()
        try:
            seq = await _per_request_us(limiter, limits, n, 1)
            conc = await _per_request_us(limiter, limits, n, CONCURRENCY)
        finally:
            await limiter.aclose()
        rows.append((name, seq, conc))
    _cleanup(redis_url)
    return rows


def _cleanup(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        own = list(client.scan_iter(match="tt:rl:{bench*"))
        if own:
            client.delete(*own)
    finally:
        client.close()


def _http_us(server: TokentillServer, key: str, n: int, threads: int) -> float:
    session = requests.Session()
    headers = {"Authorization": f"Bearer {key}"}

    def one(_: int) -> None:
        r = session.post(f"{server.url}/v1/echo", json=BODY, headers=headers, timeout=60)
        r.raise_for_status()

    for i in range(20):
        one(i)  # warm-up
    start = time.perf_counter()
    if threads == 1:
        for i in range(n):
            one(i)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, range(n)))
    return (time.perf_counter() - start) / n * 1e6


def through_http(n: int, redis_url: str) -> list[tuple[str, float, float]]:
    rows: list[tuple[str, float, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        catalogue = Path(tmp) / "models.toml"
        catalogue.write_text('[[models]]\nid = "echo"\nengine = "echo"\n')
        for backend, env in (("in-process", {}), ("redis", {"TOKENTILL_REDIS_URL": redis_url})):
            server = TokentillServer(
                Path(tmp) / backend,
                None,
                TOKENTILL_CONFIG=str(catalogue),
                TOKENTILL_LOG_LEVEL="warning",
                **env,
            ).start()
            try:
                plain = server.new_key("bench", credits="1000")
                limited = server.new_key("bench", credits="1000", rpm="1000000", tpm="1000000000")
                if backend == "in-process":
                    rows.append(("no limits", _http_us(server, plain, n, 1), _http_us(server, plain, n, 4)))
                rows.append((backend, _http_us(server, limited, n, 1), _http_us(server, limited, n, 4)))
            finally:
                server.stop()
    return rows


def _print(title: str, rows: list[tuple[str, float, float]], conc: int) -> None:
    base_seq, base_conc = rows[0][1], rows[0][2]
    print(f"\n{title}")
    concurrent = f"{conc} concurrent µs/req"
    print(f"{'limiter':<12} {'sequential µs/req':>18} {'ratio':>7} {concurrent:>22} {'ratio':>7}")
    for name, seq, con in rows:
        print(f"{name:<12} {seq:>18.1f} {seq / base_seq:>7.2f} {con:>22.1f} {con / base_conc:>7.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=5000)
    parser.add_argument("--http", type=int, default=300, help="HTTP requests per case (0 skips part 2)")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    rows = asyncio.run(limiter_alone(args.iterations, args.redis))
    _print(f"acquire + settle, {args.iterations} requests per case", rows, CONCURRENCY)
    if args.http:
        _print(
            f"POST /v1/echo through tokentill serve (SQLite, echo engine), {args.http} requests per case",
            through_http(args.http, args.redis),
            4,
        )


if __name__ == "__main__":
    main()
