"""What tokentill costs in front of an engine: the same requests against a trivial OpenAI-compatible responder
directly, and through `tokentill serve` (auth, rate limits, credit hold + settle in the ledger, usage row).

    .venv/bin/python bench/gateway_overhead.py [--requests 300] [--concurrency 1 8]

One run starts (all on 127.0.0.1, as subprocesses so the load generator does not share their GIL):
  - the responder: a bare ASGI app under uvicorn (no model: whatever latency it has is the HTTP stack's).
    A request with `"stream": true` gets a fixed answer as server-sent events, one chunk per token
    (STREAM_TOKENS content chunks, a finish chunk, a usage chunk, `[DONE]`), each its own body write, as
    vLLM streams; any other request gets the same answer as one non-streamed completion with usage;
  - tokentill with one catalogue entry `engine = "upstream"` pointing at the responder, SQLite in a
    temporary folder, and a key with plenty of credits and an rpm limit high enough never to refuse (so the
    limiter runs on every request without shaping the figures). tokentill always asks its upstream to
    stream, so both modes below measure its SSE reader.
Then, per mode (`json`: client stream false, `sse`: client stream true with include_usage) and concurrency
level, a warm-up and `--requests` timed requests to each target; every answer must be 200 and complete
(a streamed one must end with `[DONE]`). Latency is to the last byte. A third row, `tt+echo`, sends the
same requests to a built-in `echo` model on the same tokentill: the gateway's cost without the upstream
hop, so the two can be told apart. Prints requests/s, p50 and p95 latency, the ratios gateway / direct, and
tokentill's CPU time per request: user + system time of the `tokentill serve` process tree (read from
/proc/<pid>/stat before and after the timed requests), which, unlike wall-clock figures, does not depend on
how loaded the machine is.

    --database-url postgresql+asyncpg://postgres@127.0.0.1:5432/NAME --redis-url redis://127.0.0.1:6379/0
runs tokentill on PostgreSQL + Redis instead (the database must exist; it is used as it is), and
    --workers 2  (with Redis) runs two worker processes; the CPU figure sums the whole process tree.
    --profile FILE  runs `tokentill serve` under cProfile and writes its profile to FILE on exit
(`python -m pstats FILE`, then `sort cumulative` / `sort tottime`, `stats 30`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx2

STREAM_TOKENS = 16  # the answer, " t0 t1 … t15", is the same in both shapes
USAGE = {"prompt_tokens": 12, "completion_tokens": STREAM_TOKENS, "total_tokens": 12 + STREAM_TOKENS}
ANSWER = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 0,
        "model": "responder",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "".join(f" t{i}" for i in range(STREAM_TOKENS))},
                "finish_reason": "stop",
            }
        ],
        "usage": USAGE,
    }
).encode()


def _sse_chunks() -> list[bytes]:
    """The streamed answer: a role chunk, one chunk per token, a finish chunk, a usage chunk, [DONE]."""

    def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        obj = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 0, "model": "responder"}
        return b"data: " + json.dumps({**obj, "choices": choices, **extra}).encode() + b"\n\n"

    def choice(delta: dict[str, str], finish: str | None = None) -> list[dict[str, Any]]:
        return [{"index": 0, "delta": delta, "finish_reason": finish}]

    return [
        event(choice({"role": "assistant", "content": ""})),
        *(event(choice({"content": f" t{i}"})) for i in range(STREAM_TOKENS)),
        event(choice({}, "stop")),
        event([], usage=USAGE),
        b"data: [DONE]\n\n",
    ]


SSE_CHUNKS = _sse_chunks()
MODELS = json.dumps({"object": "list", "data": [{"id": "responder", "object": "model"}]}).encode()
BODY = {"messages": [{"role": "user", "content": "What is 2 + 2?"}], "max_completion_tokens": 16}


async def responder_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The trivial upstream: GET …/models and POST …/chat/completions, fixed answers."""
    if scope["type"] != "http":
        return
    more, raw = True, b""
    while more:  # read the request body
        message = await receive()
        raw += message.get("body", b"")
        more = message.get("more_body", False)
    if scope["method"] == "POST" and json.loads(raw).get("stream"):
        headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for chunk in SSE_CHUNKS:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    body = MODELS if scope["method"] == "GET" else ANSWER
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` and its live descendants (uvicorn's worker processes)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            stat = Path(f"/proc/{current}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited meanwhile
    return total


def serve_profiled(path: Path) -> None:
    """`tokentill serve` under cProfile; the profile is written when SIGTERM arrives (uvicorn restores
    this handler after its graceful shutdown and raises the signal again)."""
    import cProfile
    import runpy
    import signal

    profiler = cProfile.Profile()

    def stop(_signum: int, _frame: Any) -> None:
        profiler.disable()
        profiler.dump_stats(path)
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    sys.argv = ["tokentill", "serve"]
    profiler.enable()
    runpy.run_module("tokentill", run_name="__main__")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{url} exited:\n{log.read_text(errors='replace')[-3000:]}")
        try:
            if httpx2.get(url, timeout=1).status_code == 200:
                return
        except httpx2.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} not ready after {timeout_s}s")


def tokentill_cli(env: dict[str, str], *args: str) -> Any:
    out = subprocess.run(
        [sys.executable, "-m", "tokentill", *args, "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


async def load(
    url: str,
    headers: dict[str, str],
    body: dict[str, Any],
    n: int,
    concurrency: int,
    server_pid: int | None = None,
) -> dict[str, float]:
    """`n` POSTs with `concurrency` in flight; latencies in ms, throughput in requests/s, and (given the
    server's `server_pid`) its CPU ms per request over the timed part."""
    latencies: list[float] = []
    limits = httpx2.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx2.AsyncClient(timeout=httpx2.Timeout(30.0), limits=limits, trust_env=False) as client:

        def check(response: httpx2.Response) -> None:
            complete = not body.get("stream") or response.content.rstrip().endswith(b"data: [DONE]")
            if response.status_code != 200 or not complete:
                raise SystemExit(f"{url}: HTTP {response.status_code}: {response.text[-300:]}")

        for _ in range(min(20, n)):  # warm-up: connections, caches, the key cache
            check(await client.post(url, json=body, headers=headers))
        queue = iter(range(n))

        async def worker() -> None:
            for _ in queue:
                started = time.perf_counter()
                response = await client.post(url, json=body, headers=headers)  # reads to the last byte
                latencies.append((time.perf_counter() - started) * 1000)
                check(response)

        cpu_before = cpu_seconds(server_pid) if server_pid is not None else 0.0
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
        cpu = cpu_seconds(server_pid) - cpu_before if server_pid is not None else float("nan")
    cuts = statistics.quantiles(latencies, n=20)
    return {
        "rps": n / wall,
        "p50": statistics.median(latencies),
        "p95": cuts[18],
        "cpu_ms": cpu * 1000 / n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--database-url", help="tokentill's database (default: SQLite in a temporary folder)")
    parser.add_argument("--redis-url", help="tokentill's Redis (rate limits); default: in-memory limits")
    parser.add_argument("--workers", type=int, default=1, help="tokentill serve --workers (>1 needs Redis)")
    parser.add_argument("--profile", type=Path, help="run tokentill serve under cProfile, writing FILE")
    parser.add_argument("--serve-profiled", type=Path, metavar="FILE", help=argparse.SUPPRESS)
    parser.add_argument("--serve-responder", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_profiled:
        serve_profiled(args.serve_profiled)
        return
    if args.serve_responder:
        import uvicorn

        uvicorn.run(
            responder_app, host="127.0.0.1", port=args.serve_responder, log_level="warning", lifespan="off"
        )
        return

    with tempfile.TemporaryDirectory(prefix="tokentill-bench-") as tmp:
        folder = Path(tmp)
        responder_port, gateway_port = free_port(), free_port()
        responder_url = f"http://127.0.0.1:{responder_port}"
        gateway_url = f"http://127.0.0.1:{gateway_port}"
        catalogue = folder / "catalogue.toml"
        catalogue.write_text(
            "[[models]]\n"
            'id = "bench"\n'
            'engine = "upstream"\n'
            f'base_url = "{responder_url}/v1"\n'
            "price_input = 15\nprice_output = 60\ncontext = 8192\ntimeout_s = 30\n"
            '[[models]]\nid = "bench-echo"\nengine = "echo"\nprice_input = 15\nprice_output = 60\n',
            encoding="utf-8",
        )
        env = {
            **os.environ,
            "TOKENTILL_DATA_DIR": str(folder / "data"),
            "TOKENTILL_HOST": "127.0.0.1",
            "TOKENTILL_PORT": str(gateway_port),
            "TOKENTILL_CONFIG": str(catalogue),
            "TOKENTILL_QUEUE_SIZE": "64",
        }
        if args.database_url:
            env["TOKENTILL_DATABASE_URL"] = args.database_url
        if args.redis_url:
            env["TOKENTILL_REDIS_URL"] = args.redis_url
        env["TOKENTILL_WORKERS"] = str(args.workers)
        procs: list[subprocess.Popen[bytes]] = []
        try:
            log = folder / "responder.log"
            with log.open("ab") as out:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, __file__, "--serve-responder", str(responder_port)],
                        stdout=out,
                        stderr=out,
                    )
                )
            wait_ready(responder_url + "/v1/models", procs[-1], log)
            tokentill_cli(env, "init")  # the CLI creates no database by itself; `serve` would, later
            account = f"bench-{os.getpid()}"  # a database given with --database-url may be reused
            tokentill_cli(env, "accounts", "create", account, "--credits", "1000000")
            key = tokentill_cli(env, "keys", "create", "--account", account, "--rpm", "1000000")["key"]
            log = folder / "tokentill.log"
            profiled = [__file__, "--serve-profiled", str(args.profile)]
            serve = profiled if args.profile else ["-m", "tokentill", "serve"]
            with log.open("ab") as out:
                procs.append(subprocess.Popen([sys.executable, *serve], env=env, stdout=out, stderr=out))
            wait_ready(gateway_url + "/readyz", procs[-1], log)
            run(args.requests, args.concurrency, responder_url, gateway_url, key, procs[-1].pid)
        finally:
            for proc in reversed(procs):
                proc.terminate()
                proc.wait(timeout=20)


def run(n: int, levels: list[int], responder_url: str, gateway_url: str, key: str, pid: int) -> None:
    print(f"{n} requests per row, 127.0.0.1, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    print("cpu ms/req: tokentill's own CPU time (all its threads and processes) per request")
    print(
        f"{'mode':<5} {'target':<10} {'conc':>4} {'req/s':>9} {'p50 ms':>8} {'p95 ms':>8} {'cpu ms/req':>10}"
    )
    summary: list[str] = []
    auth = {"Authorization": f"Bearer {key}"}
    chat = "/v1/chat/completions"
    modes: dict[str, dict[str, Any]] = {
        "json": {},
        "sse": {"stream": True, "stream_options": {"include_usage": True}},
    }
    for mode, extra in modes.items():
        for concurrency in levels:
            direct = asyncio.run(
                load(responder_url + chat, {}, {"model": "responder", **BODY, **extra}, n, concurrency)
            )
            gateway = asyncio.run(
                load(gateway_url + chat, auth, {"model": "bench", **BODY, **extra}, n, concurrency, pid)
            )
            echo = asyncio.run(
                load(gateway_url + chat, auth, {"model": "bench-echo", **BODY, **extra}, n, concurrency, pid)
            )
            for name, figures in (("direct", direct), ("tokentill", gateway), ("tt+echo", echo)):
                rps, p50, p95, cpu = figures["rps"], figures["p50"], figures["p95"], figures["cpu_ms"]
                cpu_text = "" if name == "direct" else f"{cpu:>10.2f}"
                print(f"{mode:<5} {name:<10} {concurrency:>4} {rps:>9.1f} {p50:>8.2f} {p95:>8.2f} {cpu_text}")
            summary.append(
                f"{mode} concurrency {concurrency}: throughput x{gateway['rps'] / direct['rps']:.3f} of "
                f"direct, p50 {gateway['p50'] - direct['p50']:+.2f} ms "
                f"(x{gateway['p50'] / direct['p50']:.1f}), "
                f"p95 {gateway['p95'] - direct['p95']:+.2f} ms; "
                f"the upstream hop itself: p50 {gateway['p50'] - echo['p50']:+.2f} ms over the echo engine"
            )
    print("\n".join(summary))


if __name__ == "__main__":
    main()
