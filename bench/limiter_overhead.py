"""Per-request cost of rate limiting: no limits vs the in-process limiter vs Redis, in one run.

Part 1, the limiter alone: `acquire` + `settle` per request, N iterations sequentially and N spread over
16 concurrent tasks, for (a) a key with no limits (the baseline: the limiter returns without touching any
state), (b) `MemoryRateLimiter` and (c) `RedisRateLimiter`, each with rpm, tpm and max_concurrent set (so
every request does the full check-and-take and the settle round trip). Limits are huge, nothing refused.

Part 2, the same HTTP request (`tokentill serve` subprocess, SQLite, the deterministic `echo` engine, so
the model costs nothing and the gateway is all there is), on a server with the in-process limiter and on
one with TOKENTILL_REDIS_URL. On each server, rounds alternate between an unlimited key and a key with
rpm + tpm + max_concurrent (huge values, nothing refused), so both see the same server, warmed the same
way and under the same machine noise; the table gives the median of the rounds and limited / unlimited.

    .venv/bin/python bench/limiter_overhead.py [--iterations 5000] [--http 200] [--rounds 5] [--redis URL]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
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
HTTP_THREADS = 4
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


def through_http(n: int, rounds: int, redis_url: str) -> list[tuple[str, float, float, float, float]]:
    """Per backend: median µs/req, unlimited and limited key, sequential and concurrent."""
    rows: list[tuple[str, float, float, float, float]] = []
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
                limited = server.new_key(
                    "bench", credits="1000", rpm="100000000", tpm="1000000000", max_concurrent="1000"
                )
                samples: dict[str, list[float]] = {"plain1": [], "limited1": [], "plainC": [], "limitedC": []}
                for _ in range(rounds):
                    for name, key in (("plain", plain), ("limited", limited)):
                        samples[f"{name}1"].append(_http_us(server, key, n, 1))
                        samples[f"{name}C"].append(_http_us(server, key, n, HTTP_THREADS))
                med = {name: statistics.median(values) for name, values in samples.items()}
                rows.append((backend, med["plain1"], med["limited1"], med["plainC"], med["limitedC"]))
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


def _print_http(title: str, rows: list[tuple[str, float, float, float, float]]) -> None:
    print(f"\n{title}")
    print(
        f"{'server':<11} {'seq: none':>10} {'limited':>8} {'ratio':>6}   "
        f"{f'{HTTP_THREADS} threads: none':>17} {'limited':>8} {'ratio':>6}   (median µs/req)"
    )
    for name, p1, l1, pc, lc in rows:
        print(f"{name:<11} {p1:>10.0f} {l1:>8.0f} {l1 / p1:>6.3f}   {pc:>17.0f} {lc:>8.0f} {lc / pc:>6.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=5000)
    parser.add_argument("--http", type=int, default=200, help="HTTP requests per round (0 skips part 2)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per key and server")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()
    rows = asyncio.run(limiter_alone(args.iterations, args.redis))
    _print(f"acquire + settle, {args.iterations} requests per case", rows, CONCURRENCY)
    if args.http:
        _print_http(
            f"POST /v1/echo through tokentill serve (SQLite, echo engine): {args.rounds} alternating rounds "
            f"of {args.http} requests per key",
            through_http(args.http, args.rounds, args.redis),
        )


if __name__ == "__main__":
    main()
