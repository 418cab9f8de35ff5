"""The upstream hop's HTTP client, measured alone: httpx2 (what `engines/upstream.py` uses) against
aiohttp, each sending the streamed chat request tokentill sends its upstream and reading the whole
server-sent event body, against bench/gateway_overhead.py's trivial responder.

    .venv/bin/python bench/upstream_client.py [--requests 2000] [--concurrency 1 16]

(aiohttp is not a dependency of tokentill: `pip install aiohttp` into the venv first; without it only
httpx2 is measured.) Prints the client's CPU time per request (this process's user + system time; the
responder runs in its own process), which is what the hop costs tokentill's event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx2

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loadgen
from gateway_overhead import BODY, free_port, start

PAYLOAD = {"model": "responder", **BODY, "stream": True, "stream_options": {"include_usage": True}}


async def with_httpx2(url: str, n: int, concurrency: int) -> float:
    limits = httpx2.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx2.AsyncClient(limits=limits, trust_env=False, timeout=30) as client:

        async def one() -> None:
            request = client.build_request("POST", url, json=PAYLOAD, headers={"Authorization": "Bearer x"})
            response = await client.send(request, stream=True)
            try:
                async for _chunk in response.aiter_bytes():
                    pass
            finally:
                await response.aclose()
            if response.status_code != 200:
                raise SystemExit(f"HTTP {response.status_code}")

        return await timed(one, n, concurrency)


async def with_aiohttp(url: str, n: int, concurrency: int) -> float:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, trust_env=False) as session:

        async def one() -> None:
            async with session.post(url, json=PAYLOAD, headers={"Authorization": "Bearer x"}) as response:
                async for _chunk in response.content.iter_any():
                    pass
                if response.status != 200:
                    raise SystemExit(f"HTTP {response.status}")

        return await timed(one, n, concurrency)


async def timed(one: Callable[[], Awaitable[None]], n: int, concurrency: int) -> float:
    """CPU µs per request of `one`, `n` times with `concurrency` in flight (after a warm-up)."""
    for _ in range(50):
        await one()
    queue = iter(range(n))

    async def worker() -> None:
        for _ in queue:
            await one()

    before = time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return (time.process_time() - before) * 1e6 / n


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    args = parser.parse_args()
    clients: dict[str, Callable[[str, int, int], Awaitable[float]]] = {"httpx2": with_httpx2}
    try:
        import aiohttp  # noqa: F401

        clients["aiohttp"] = with_aiohttp
    except ImportError:
        print("aiohttp is not installed: measuring httpx2 only")
    with tempfile.TemporaryDirectory(prefix="tokentill-client-") as tmp:
        port = free_port()
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        responder = start(
            [
                sys.executable,
                str(Path(__file__).with_name("gateway_overhead.py")),
                "--serve-responder",
                str(port),
            ],
            dict(os.environ),
            Path(tmp) / "responder.log",
            f"http://127.0.0.1:{port}/v1/models",
        )
        try:
            print(f"{args.requests} streamed requests per row, load average {loadgen_load()}")
            for concurrency in args.concurrency:
                figures = {
                    name: loadgen.run(run(url, args.requests, concurrency)) for name, run in clients.items()
                }
                line = ", ".join(f"{name} {cpu:.0f} µs" for name, cpu in figures.items())
                ratio = (
                    f" (aiohttp / httpx2 x{figures['aiohttp'] / figures['httpx2']:.2f})"
                    if "aiohttp" in figures
                    else ""
                )
                print(f"{concurrency} in flight: client CPU per request: {line}{ratio}", flush=True)
        finally:
            responder.terminate()
            responder.wait(timeout=20)


def loadgen_load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


if __name__ == "__main__":
    main()
