"""What tokentill costs in front of an engine, side by side with the upstream alone and LiteLLM's proxy.

    .venv/bin/python bench/gateway_overhead.py [--requests 1000] [--concurrency 1 16] [--modes json sse]

One run starts, one after the other (all on 127.0.0.1, as subprocesses so the load generator shares no
GIL with them), and measures each at every concurrency level (connections) and mode:
  - `upstream`: a trivial OpenAI-compatible responder, a bare ASGI app under uvicorn (no model: whatever
    latency it has is the HTTP stack's). `"stream": true` gets a fixed answer as server-sent events, one
    chunk per token (STREAM_TOKENS content chunks, a finish chunk, a usage chunk, `[DONE]`), each its own
    body write, as vLLM streams; any other request gets the same answer as one completion with usage;
  - `tokentill-sqlite`: `tokentill serve` with one catalogue entry `engine = "upstream"` pointing at the
    responder, SQLite in a temporary folder, a key with plenty of credits and an rpm limit high enough
    never to refuse (the limiter runs on every request without shaping the figures);
  - `tokentill-pg-redis`: the same on PostgreSQL (a fresh database on `--postgres`, dropped afterwards)
    and Redis (`--redis-url`) for the rate limits;
  - `litellm`: LiteLLM's proxy (one worker, no database, its master key as the only key) in front of the
    same responder, installed by the bench into `--litellm-venv` on first use; if that fails, the bench
    says why and goes on without it.
Modes: `json` (stream false) and `sse` (stream true with include_usage); tokentill always asks its
upstream to stream, so both measure its SSE reader. Each row: requests/s, p50/p99 latency to the last
byte, the time to the response head (`ttfb`: a stream's first-byte overhead), the same minus the upstream
alone's (`+p50`, `+p99`, `+ttfb`), and the server's CPU ms per request: user + system time of its process
tree (from /proc/<pid>/stat before and after), which, unlike wall-clock figures, hardly depends on how
loaded the machine is. The load generator is `bench/loadgen.py` (one asyncio process; why not wrk or an
HTTP client library: see there). After each tokentill target the bench checks the ledger: every account's
balance equals the sum of its ledger rows, one usage row per request sent, no hold left open.

    --workers 2  runs tokentill with two worker processes (with Redis for the limits, on SQLite too); the
        CPU figure sums the whole process tree.
    --instructions  runs `tokentill serve` under valgrind's callgrind with instrumentation off, switched on
        (`callgrind_control`) only while a row's requests run, and adds each row's instructions per
        request (millions, warm-up included, like the CPU figure): a count that, unlike seconds, does not
        move with the machine's speed (the same tree gives the same count within about 1 %), so two trees
        can be compared on a machine whose speed drifts. Under valgrind a tokentill row's timings are
        valgrind's (about 50 x slower); the LiteLLM row is skipped.
    --profile FILE.txt  runs `tokentill serve` under pyinstrument (wall-clock sampling of the event loop's
        thread; a call tree and the frames by self time; `pip install pyinstrument` first, tokentill does
        not depend on it), FILE.prof under cProfile (`python -m pstats`), one file per tokentill target
        (FILE-tokentill-sqlite.txt, ...).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import httpx2

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loadgen

T = TypeVar("T")

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


def process_tree(pid: int) -> list[int]:
    """`pid` and its live descendants (uvicorn's worker processes)."""
    tree, pending = [], [pid]
    while pending:
        current = pending.pop()
        try:
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited meanwhile
        tree.append(current)
    return tree


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` and its live descendants."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for current in process_tree(pid):
        try:
            stat = Path(f"/proc/{current}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total


def serve_profiled(path: Path) -> None:
    """`tokentill serve` under a profiler: pyinstrument for a `.txt` FILE, else cProfile. The profile is
    written when SIGTERM arrives (uvicorn restores this handler after its graceful shutdown and raises
    the signal again)."""
    import runpy
    import signal

    stop_profiler: Any
    if path.suffix == ".txt":
        from pyinstrument import Profiler

        sampler = Profiler(interval=0.001, async_mode="disabled")

        def stop_profiler() -> None:
            sampler.stop()
            tree = sampler.output_text(show_all=False, short_mode=False)
            flat = sampler.output_text(flat=True)
            path.write_text(f"{flat}\n\n{tree}", encoding="utf-8")

        start_profiler = sampler.start
    else:
        import cProfile

        profiler = cProfile.Profile()

        def stop_profiler() -> None:
            profiler.disable()
            profiler.dump_stats(path)

        start_profiler = profiler.enable

    def stop(_signum: int, _frame: Any) -> None:
        stop_profiler()
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    sys.argv = ["tokentill", "serve"]
    start_profiler()
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


class Target:
    """A server under test: its process, where to send requests, and what to ask it for."""

    def __init__(
        self, name: str, proc: subprocess.Popen[bytes], port: int, model: str, key: str = ""
    ) -> None:
        self.name, self.proc, self.port, self.model = name, proc, port, model
        self.headers = {"authorization": f"Bearer {key}"} if key else {}
        self.sent = 0  # requests sent, warm-ups included (the ledger check counts usage rows)

    def measure(self, mode: str, concurrency: int, n: int) -> tuple[loadgen.Figures, float]:
        """Figures for `n` requests, and the server's CPU ms per request (its process tree)."""
        body = json.dumps({"model": self.model, **BODY, **MODES[mode]}).encode()
        raw = loadgen.request_bytes("127.0.0.1", self.port, CHAT, self.headers, body)
        cpu_before = cpu_seconds(self.proc.pid)
        warmup = 20
        figures = loadgen.run(loadgen.load("127.0.0.1", self.port, raw, n, concurrency, stream=mode == "sse"))
        self.sent += n + warmup
        # The warm-up's CPU is in the difference too: counted as requests, it is the same work.
        return figures, (cpu_seconds(self.proc.pid) - cpu_before) * 1000 / (n + warmup)

    def stop(self, timeout_s: float = 30) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


CHAT = "/v1/chat/completions"
MODES: dict[str, dict[str, Any]] = {
    "json": {},
    "sse": {"stream": True, "stream_options": {"include_usage": True}},
}


def start(cmd: list[str], env: dict[str, str], log: Path, ready: str) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=out)
    try:
        wait_ready(ready, proc, log)
    except BaseException:
        proc.kill()
        raise
    return proc


def start_tokentill(
    name: str, folder: Path, responder_url: str, args: argparse.Namespace, database_url: str | None
) -> tuple[Target, dict[str, str]]:
    port = free_port()
    catalogue = folder / "catalogue.toml"
    catalogue.write_text(
        f'[[models]]\nid = "bench"\nengine = "upstream"\nbase_url = "{responder_url}/v1"\n'
        "price_input = 15\nprice_output = 60\ncontext = 8192\ntimeout_s = 30\n",
        encoding="utf-8",
    )
    env = {
        **os.environ,
        "TOKENTILL_DATA_DIR": str(folder / name),
        "TOKENTILL_HOST": "127.0.0.1",
        "TOKENTILL_PORT": str(port),
        "TOKENTILL_CONFIG": str(catalogue),
        "TOKENTILL_QUEUE_SIZE": "64",
        "TOKENTILL_WORKERS": str(args.workers),
        # under valgrind one thread runs at a time: a worker answers uvicorn's health ping late
        "TOKENTILL_WORKER_HEALTHCHECK_S": "600" if args.instructions else "5",
    }
    if database_url:
        env["TOKENTILL_DATABASE_URL"] = database_url
    if database_url or args.workers > 1:  # workers share their rate limits through Redis
        env["TOKENTILL_REDIS_URL"] = args.redis_url
    tokentill_cli(env, "init")  # the CLI creates no database by itself
    account = f"bench-{os.getpid()}"
    tokentill_cli(env, "accounts", "create", account, "--credits", "1000000")
    created = tokentill_cli(env, "keys", "create", "--account", account, "--rpm", "1000000")
    serve = ["-m", "tokentill", "serve"]
    if args.profile:
        path = args.profile.with_name(f"{args.profile.stem}-{name}{args.profile.suffix}")
        serve = [__file__, "--serve-profiled", str(path)]
    command = [sys.executable, *serve]
    if args.instructions:
        out = folder / f"callgrind-{name}.%p"
        command = [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--trace-children={'yes' if args.workers > 1 else 'no'}",
            f"--callgrind-out-file={out}",
            *command,
        ]
    proc = start(command, env, folder / f"{name}.log", f"http://127.0.0.1:{port}/readyz")
    return Target(name, proc, port, "bench", created["key"]), env


def instructions_of(target: Target, folder: Path, work: Callable[[], T]) -> tuple[T, int]:
    """`work()`'s result, and the instructions the target's processes ran meanwhile (callgrind; with
    `--workers` the supervisor and every worker, all run under valgrind with `--trace-children`)."""
    # Only processes under callgrind can be told anything (a child valgrind did not follow cannot).
    pids = [str(pid) for pid in process_tree(target.proc.pid) if _under_callgrind(pid)]

    def control(*argv: str, of: list[str] | None = None) -> None:
        for pid in pids if of is None else of:
            subprocess.run(["callgrind_control", *argv, pid], check=True, capture_output=True, timeout=120)

    control("--zero")
    control("--instr=on")
    try:
        result = work()
    finally:
        control("--instr=off")
    total = 0
    for pid in pids:
        dumps_before = set(folder.glob(f"callgrind-{target.name}.{pid}.*"))
        control("--dump=row", of=[pid])
        (dump,) = set(folder.glob(f"callgrind-{target.name}.{pid}.*")) - dumps_before
        text = dump.read_text(encoding="utf-8", errors="replace")
        totals = [line for line in text.splitlines() if line.startswith("totals:")]
        if not totals:
            raise SystemExit(f"no totals in {dump}")
        total += int(totals[0].split()[1])
    return result, total


def _under_callgrind(pid: int) -> bool:
    """Whether process `pid` is alive and runs under callgrind (its command line is valgrind's)."""
    try:
        return "callgrind" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return False


def litellm_python(venv: Path) -> Path | str:
    """The LiteLLM proxy's venv, created and filled on first use; a string says why there is none."""
    python = venv / "bin" / "python"
    if (venv / "bin" / "litellm").exists():
        return python
    print(f"installing litellm[proxy] into {venv} (once) ...", flush=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "litellm[proxy]"],
            check=True,
            capture_output=True,
            text=True,
            timeout=900,
        )
    except subprocess.CalledProcessError as exc:
        return f"pip failed: {(exc.stderr or '')[-500:]}"
    except subprocess.TimeoutExpired:
        return "pip took over 15 minutes"
    return python


def start_litellm(folder: Path, responder_url: str, venv: Path) -> Target | str:
    python = litellm_python(venv)
    if isinstance(python, str):
        return python
    port = free_port()
    config = folder / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        "  - model_name: bench\n"
        "    litellm_params:\n"
        "      model: openai/responder\n"
        f"      api_base: {responder_url}/v1\n"
        "      api_key: none\n",
        encoding="utf-8",
    )
    # No database: its cheapest configuration; the master key (which it requires) is the only key. The
    # cost map is the packaged one (nothing leaves this machine).
    master = "sk-bench-" + os.urandom(16).hex()
    env = {
        **os.environ,
        "LITELLM_MASTER_KEY": master,
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_TELEMETRY": "False",
    }
    cmd = [str(venv / "bin" / "litellm"), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
    try:
        proc = start(
            [*cmd, "--num_workers", "1"],
            env,
            folder / "litellm.log",
            f"http://127.0.0.1:{port}/health/liveliness",
        )
    except SystemExit as exc:
        return f"the proxy did not start: {str(exc)[-500:]}"
    return Target("litellm", proc, port, "bench", master)


LEDGER_QUERIES = {  # each account's balance beside its ledger sum; the holds left open
    "drift": "SELECT a.id, a.balance, COALESCE((SELECT SUM(l.amount) FROM ledger l "
    "WHERE l.account_id = a.id), 0) FROM accounts a",
    "open": "SELECT COUNT(*) FROM holds WHERE status = 'open'",
}


def check_ledger(target: Target, env: dict[str, str]) -> list[str]:
    """The invariant after the load: every account's balance is the sum of its ledger rows, one usage row
    per request sent (all were answered 200), no hold left open. Problems found (none: holds)."""
    from sqlalchemy import create_engine, text

    url = env.get("TOKENTILL_DATABASE_URL") or f"sqlite:///{Path(env['TOKENTILL_DATA_DIR']) / 'tokentill.db'}"
    queries = {**LEDGER_QUERIES, "usage": "SELECT COUNT(*) FROM usage"}
    if url.startswith("postgresql"):
        rows = asyncio.run(_pg_rows(url, queries))
    else:
        engine = create_engine(url.replace("+aiosqlite", ""))
        with engine.connect() as conn:
            rows = {name: [tuple(r) for r in conn.execute(text(sql))] for name, sql in queries.items()}
        engine.dispose()
    problems = [f"account {a}: balance {b} != ledger sum {s}" for a, b, s in rows["drift"] if b != s]
    if rows["usage"][0][0] != target.sent:
        problems.append(f"{rows['usage'][0][0]} usage rows for {target.sent} requests")
    if rows["open"][0][0]:
        problems.append(f"{rows['open'][0][0]} holds left open")
    return problems


async def _pg_rows(url: str, queries: dict[str, str]) -> dict[str, list[tuple[Any, ...]]]:
    import asyncpg

    conn = await asyncpg.connect(url.replace("+asyncpg", ""))
    try:
        return {name: [tuple(r) for r in await conn.fetch(sql)] for name, sql in queries.items()}
    finally:
        await conn.close()


async def _pg_admin(server: str, sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(server.replace("+asyncpg", "") + "/postgres")
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=1000, help="timed requests per row")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument(
        "--postgres",
        default="postgresql+asyncpg://postgres@127.0.0.1:5432",
        help="PostgreSQL server (a fresh database is created and dropped); 'off' skips the row",
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0", help="Redis, with --postgres")
    parser.add_argument("--no-sqlite", action="store_true", help="skip tokentill on SQLite")
    parser.add_argument("--litellm-venv", type=Path, default=Path("/tmp/litellm-venv"))
    parser.add_argument("--no-litellm", action="store_true", help="skip the LiteLLM proxy")
    parser.add_argument("--workers", type=int, default=1, help="tokentill serve --workers (>1 needs Redis)")
    parser.add_argument(
        "--profile", type=Path, help="run tokentill serve under a profiler, writing FILE-<target>.SUFFIX"
    )
    parser.add_argument(
        "--instructions", action="store_true", help="count tokentill's instructions per request (valgrind)"
    )
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
        responder_port = free_port()
        responder_url = f"http://127.0.0.1:{responder_port}"
        responder = start(
            [sys.executable, __file__, "--serve-responder", str(responder_port)],
            dict(os.environ),
            folder / "responder.log",
            responder_url + "/v1/models",
        )
        try:
            bench(args, folder, Target("upstream", responder, responder_port, "responder"), responder_url)
        finally:
            Target("upstream", responder, responder_port, "responder").stop()


def bench(args: argparse.Namespace, folder: Path, upstream: Target, responder_url: str) -> None:
    n = args.requests
    print(
        f"{n} requests per row (+20 warm-up), 127.0.0.1, {os.cpu_count()} CPUs, "
        f"Python {sys.version.split()[0]}"
    )
    print("load generator: bench/loadgen.py (one asyncio process, raw HTTP/1.1 keep-alive connections)")
    print("added = the row's latency minus the upstream alone's, same mode and connections")
    print("cpu ms/req: the server's own CPU time (its whole process tree) per request")
    header = (
        f"{'mode':<5} {'target':<17} {'conn':>4} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'ttfb':>6} "
        f"{'+p50':>6} {'+p99':>6} {'+ttfb':>6} {'cpu ms/req':>10} {'load avg':>15}"
        + (f" {'Minstr/req':>12}" if args.instructions else "")
    )
    if args.instructions:
        print("Minstr/req: millions of instructions per request in the tokentill process (callgrind)")
    print(header, flush=True)
    base: dict[tuple[str, int], loadgen.Figures] = {}
    rps: dict[tuple[str, str, int], float] = {}

    def row(target: Target) -> None:
        for mode in args.modes:
            for concurrency in args.concurrency:
                counted = args.instructions and target.name.startswith("tokentill")
                if counted:
                    (figures, cpu), instructions = instructions_of(
                        target, folder, partial(target.measure, mode, concurrency, n)
                    )
                else:
                    figures, cpu = target.measure(mode, concurrency, n)
                rps[target.name, mode, concurrency] = figures.rps
                ref = base.setdefault((mode, concurrency), figures)
                added = (
                    ""
                    if ref is figures
                    else (
                        f"{figures.p50 - ref.p50:>+6.2f} {figures.p99 - ref.p99:>+6.2f} "
                        f"{figures.ttfb_p50 - ref.ttfb_p50:>+6.2f}"
                    )
                )
                cpu_text = "" if target.name == "upstream" else f"{cpu:>10.2f}"
                print(
                    f"{mode:<5} {target.name:<17} {concurrency:>4} {figures.rps:>8.1f} {figures.p50:>7.2f} "
                    f"{figures.p99:>7.2f} {figures.ttfb_p50:>6.2f} {added:>20} {cpu_text:>10} "
                    f"{load_average():>15}" + (f" {instructions / (n + 20) / 1e6:>12.3f}" if counted else ""),
                    flush=True,
                )

    row(upstream)
    invariants: list[str] = []
    targets: list[tuple[str, str | None]] = []
    if not args.no_sqlite:
        targets.append(("tokentill-sqlite", None))
    database = f"tokentill_bench_{os.getpid()}"
    if args.postgres != "off":
        asyncio.run(_pg_admin(args.postgres, f"CREATE DATABASE {database}"))
        targets.append(("tokentill-pg-redis", f"{args.postgres}/{database}"))
    try:
        for name, url in targets:
            target, env = start_tokentill(name, folder, responder_url, args, url)
            try:
                row(target)
            finally:
                # a profiler writes its file first
                target.stop(timeout_s=600 if args.profile or args.instructions else 30)
            problems = check_ledger(target, env) or [
                f"holds ({target.sent} requests, {target.sent} usage rows, every balance = its ledger sum, "
                "no open hold)"
            ]
            invariants.append(f"{name}: " + "; ".join(problems))
    finally:
        if args.postgres != "off":
            asyncio.run(_pg_admin(args.postgres, f"DROP DATABASE IF EXISTS {database} WITH (FORCE)"))
    if not args.no_litellm and not args.instructions:
        litellm = start_litellm(folder, responder_url, args.litellm_venv)
        if isinstance(litellm, str):
            print(f"litellm proxy: not measured: {litellm}")
        else:
            try:
                row(litellm)
            except loadgen.BadAnswer as exc:
                print(f"litellm proxy: {exc}")
            finally:
                litellm.stop()
    print("\nledger invariant:")
    print("\n".join(f"  {line}" for line in invariants))
    if any(name == "litellm" for name, _, _ in rps):
        print("\nthroughput against the LiteLLM proxy, same run:")
    for (name, mode, concurrency), value in rps.items():
        other = rps.get(("litellm", mode, concurrency))
        if name.startswith("tokentill") and other:
            print(f"  {mode} {concurrency} conn: {name} x{value / other:.1f}")
    if any(": holds (" not in line for line in invariants):
        raise SystemExit("ledger invariant broken")


if __name__ == "__main__":
    main()
