"""The upstream hop measured alone: httpx2 and aiohttp (the engine's client) reading the streamed chat
request tokentill sends its upstream, and tokentill's own `UpstreamEngine` doing the whole hop (the
payload, aiohttp, the event-stream reader, the chunks folded into deltas and usage), all against
bench/gateway_overhead.py's trivial responder (16 content chunks, a finish chunk, a usage chunk, [DONE]).

    .venv/bin/python bench/upstream_client.py [--requests 2000] [--concurrency 1 16] [--rounds 3]

Prints the client's CPU time per request (this process's user + system time; the responder runs in its
own process), which is what the hop costs tokentill's event loop, per round, and the engine's ratio to
bare aiohttp reading the same body: what tokentill adds to its HTTP client. Rounds alternate the clients,
so a machine whose speed drifts moves them alike. To compare two trees of tokentill, run this script
with `PYTHONPATH=<tree>/src`, alternating.
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


async def with_engine(url: str, n: int, concurrency: int) -> float:
    from tokentill.catalog import ModelSpec
    from tokentill.engines import create_engine
    from tokentill.engines.base import EngineRequest
    from tokentill.types import Finished, Message

    base_url = url.removesuffix("/chat/completions")
    spec = ModelSpec(id="responder", engine="upstream", base_url=base_url)
    engine = create_engine(spec, queue_size=concurrency + 1, n_threads=None)
    await engine.start()
    messages = tuple(Message(m["role"], m["content"]) for m in BODY["messages"])

    async def one() -> None:
        request = EngineRequest(
            request_id="req-bench",
            messages=messages,
            max_tokens=BODY["max_completion_tokens"],
            deadline=time.monotonic() + 30,
        )
        last = None
        async for event in engine.generate(request):
            last = event
        if not isinstance(last, Finished):
            raise SystemExit(f"the engine ended without usage: {last!r}")

    try:
        return await timed(one, n, concurrency)
    finally:
        await engine.aclose()


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


CLIENTS: dict[str, Callable[[str, int, int], Awaitable[float]]] = {
    "httpx2": with_httpx2,
    "aiohttp": with_aiohttp,
    "engine": with_engine,
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--clients", nargs="+", choices=list(CLIENTS), default=list(CLIENTS))
    args = parser.parse_args()
    clients = {name: CLIENTS[name] for name in args.clients}
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
            engine_ratios: dict[int, list[float]] = {c: [] for c in args.concurrency}
            for round_ in range(args.rounds):
                for concurrency in args.concurrency:
                    figures = {
                        name: loadgen.run(run(url, args.requests, concurrency))
                        for name, run in clients.items()
                    }
                    line = ", ".join(f"{name} {cpu:.0f} µs" for name, cpu in figures.items())
                    ratios = []
                    if "httpx2" in figures and "aiohttp" in figures:
                        ratios.append(f"aiohttp / httpx2 x{figures['aiohttp'] / figures['httpx2']:.2f}")
                    if "engine" in figures and "aiohttp" in figures:
                        engine_ratios[concurrency].append(figures["engine"] / figures["aiohttp"])
                        ratios.append(f"engine / aiohttp x{engine_ratios[concurrency][-1]:.2f}")
                    print(
                        f"round {round_}, {concurrency} in flight: client CPU per request: {line}"
                        + (f" ({', '.join(ratios)})" if ratios else ""),
                        flush=True,
                    )
            for concurrency, ratios in engine_ratios.items():
                if not ratios:
                    continue
                mean = sum(ratios) / len(ratios)
                print(f"{concurrency} in flight: engine / aiohttp x{mean:.2f} (mean of {len(ratios)} rounds)")
        finally:
            responder.terminate()
            responder.wait(timeout=20)


def loadgen_load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


if __name__ == "__main__":
    main()
