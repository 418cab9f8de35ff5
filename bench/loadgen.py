"""A light HTTP/1.1 load generator for the gateway benches: one asyncio process (uvloop when installed),
keep-alive connections over raw streams, the request's bytes built once.

Why not httpx2 or wrk: an HTTP client library costs about a millisecond of CPU per request, which on this
2-core machine is as much as the server being measured; wrk cannot send an exact number of requests (it
stops on a clock and cuts the requests in flight), and the bench checks that the database holds exactly
one usage row per request sent. This one costs tens of microseconds per request (`client_cpu_ms` says how
many), sends exactly `n` requests, and checks every answer: status 200, a complete body, and for a stream
the final `data: [DONE]`.

Latency is to the last byte; `ttfb` is to the end of the response head (for a stream, tokentill sends its
head with the first event, so this is the first-byte overhead).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Figures:
    rps: float
    p50: float  # ms, to the last byte
    p99: float
    ttfb_p50: float  # ms, to the end of the response head
    client_cpu_ms: float  # this process's CPU time per request


class BadAnswer(Exception):
    pass


def run(coro: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run`, on uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def request_bytes(host: str, port: int, path: str, headers: dict[str, str], body: bytes) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"host: {host}:{port}", "content-type: application/json"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class Connection:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def exchange(self, raw: bytes) -> tuple[int, float, bytes]:
        """Send `raw`; (status, seconds to the end of the head, body)."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        started = time.perf_counter()
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        ttfb = time.perf_counter() - started
        status = int(head[9:12])
        fields = {}
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            fields[name.strip().lower()] = value.strip().lower()
        if fields.get(b"transfer-encoding") == b"chunked":
            parts = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await self.reader.readuntil(b"\r\n")  # no trailers: the empty line
                    break
                parts.append((await self.reader.readexactly(size + 2))[:-2])
            body = b"".join(parts)
        else:
            body = await self.reader.readexactly(int(fields.get(b"content-length", b"0")))
        if fields.get(b"connection") == b"close":
            await self.close()
        return status, ttfb, body

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None


async def load(
    host: str, port: int, raw: bytes, n: int, concurrency: int, *, stream: bool, warmup: int = 20
) -> Figures:
    """`warmup` then `n` requests of `raw`, `concurrency` connections each with one request in flight."""
    connections = [Connection(host, port) for _ in range(concurrency)]
    latencies: list[float] = []
    ttfbs: list[float] = []

    def check(status: int, body: bytes) -> None:
        complete = not stream or body.rstrip().endswith(b"data: [DONE]")
        if status != 200 or not complete:
            raise BadAnswer(f"{host}:{port}: HTTP {status}: {body[-300:]!r}")

    try:
        for i in range(warmup):  # connections, caches, the key cache
            status, _, body = await connections[i % concurrency].exchange(raw)
            check(status, body)
        queue = iter(range(n))

        async def worker(connection: Connection) -> None:
            for _ in queue:
                started = time.perf_counter()
                status, ttfb, body = await connection.exchange(raw)
                latencies.append((time.perf_counter() - started) * 1000)
                ttfbs.append(ttfb * 1000)
                check(status, body)

        cpu_before = time.process_time()
        started = time.perf_counter()
        await asyncio.gather(*(worker(c) for c in connections))
        wall = time.perf_counter() - started
        cpu = time.process_time() - cpu_before
    finally:
        for connection in connections:
            await connection.close()
    cuts = statistics.quantiles(latencies, n=100)
    return Figures(
        rps=n / wall,
        p50=statistics.median(latencies),
        p99=cuts[98],
        ttfb_p50=statistics.median(ttfbs),
        client_cpu_ms=cpu * 1000 / n,
    )
