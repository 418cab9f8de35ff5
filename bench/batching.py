"""The embedded engine under traffic: tokentill vs llama-cpp-python's server vs bare batched decode.

One run, one machine, the packaged SmolLM2-135M-Instruct GGUF, the same thread count everywhere, three
workloads (rounds alternate between the contenders; every round asks new prompts, so no round is served
from an earlier round's cache; each figure is the median over `--rounds`):

  (i)   what a new user gets: the built-in catalogue entry as shipped (`o1-preview`, scratchpad reasoning),
        default sampling (no temperature, no top_p sent), `--requests` prompts (three short questions to one
        long document), `--concurrency` in flight, `max_completion_tokens` = `--max-completion-tokens`,
        natural stops (see bench/natural_traffic.py);
  (ii)  the same with `reasoning = "none"`;
  (iii) fixed-length greedy streams: N concurrent streams each decoding exactly `--tokens` tokens (end tokens
        banned with `logit_bias` over HTTP and masked in the bare loop), for N in `--streams`.

Contenders:
  (a) tokentill: a real `tokentill serve` (auth, credits, ledger), streaming SSE, `TOKENTILL_MAX_PARALLEL` =
      `--parallel`, tokentill's default wait policy and adaptive thread count (at most `--threads`);
  (b) llama-cpp-python's own server (`python -m llama_cpp.server`), streaming, `--interrupt_requests False`
      (its default cuts a running stream off when the next request arrives, so most would not finish); it has
      no hidden reasoning, so one measurement of the natural workload serves (i) and (ii);
  (c) bare batched `llama_decode` with the same number of sequences, no HTTP: the limit. For (i) and (ii) it
      replays the prompts and, per request, the completion tokens tokentill produced in that round
      (`natural_traffic.bare_replay`), so the work is equal.

Figures: aggregate completion tok/s (reasoning included; all tokens / wall time from the first request to
the last `[DONE]`), time to the first visible token p50/p95, per-request tok/s p50. The HTTP client is one
asyncio thread reading raw HTTP/1.1: on a 2-core machine a thread per stream would take CPU from the server
being measured. Then the contention case: workload (ii) on tokentill, quiet and beside one
`python -c "while True: pass"`, throughput per available core (cores, then cores - 1). The ratios a/c and
a/b come last.

    .venv/bin/python bench/batching.py [--rounds 2] [--requests 32] [--concurrency 8] [--threads 2]
        [--max-completion-tokens 256] [--streams 8] [--tokens 128] [--skip-server] [--skip-contention]
        [--quick]

`BENCH_TT_LOG_LEVEL=info` runs tokentill with info logs (the thread tuner's switches) in its server log.

`--contention-only` prints instead the busy-machine table: one greedy stream of bare `llama_decode` at 1
thread and at all cores, with llama.cpp's OpenMP workers spinning (`OMP_WAIT_POLICY=ACTIVE`), sleeping
(`PASSIVE`) or spinning briefly then sleeping (`GOMP_SPINCOUNT=3000` with `OMP_WAIT_POLICY=ACTIVE`,
tokentill's default `TOKENTILL_LLAMA_WAIT_POLICY=adaptive`), then one greedy stream through tokentill's
engine (no HTTP) with its adaptive thread count (at most all cores; at least 256 tokens, so that it probes)
and with all cores fixed (`TOKENTILL_LLAMA_ADAPT_THREADS=false`), on the machine as it is ("quiet") and
beside one CPU hog (`python -c "while True: pass"`, as in issue 14: cores - 1 left); each in a fresh process
(libgomp reads the policy when it loads).

(b) needs llama-cpp-python's server extras in the venv: `.venv/bin/pip install 'llama-cpp-python[server]'`
(or `./scripts/install test`, which brings its dependencies); without them use `--skip-server`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import natural_traffic as natural  # noqa: E402
from tests.e2e.conftest import TokentillServer, free_port  # noqa: E402

from tokentill.catalog import ModelSpec, default_weights_path  # noqa: E402
from tokentill.settings import llama_wait_environment  # noqa: E402

# llama.cpp's OpenMP workers wait at barriers in all three contenders as in tokentill by default
# (TOKENTILL_LLAMA_WAIT_POLICY=adaptive: a short spin, then sleep). Set before llama.cpp loads (nothing
# above imports it); inherited by the llama_cpp.server subprocess. The operator's own setting wins.
os.environ.update(llama_wait_environment("adaptive", os.environ))

# Tokens per sequence, everywhere: the built-in entry's. It is not free: with one KV stream per sequence,
# a sequence's cells lie `CONTEXT` cells apart, and a decode step of 8 rows near position 900 took
# 5-8 % longer at 8192 than at 1024 (bench/kv_context.py), so the bare limit runs with the same figure.
CONTEXT = 8192


def prompt(i: int, round_: int) -> str:
    return f"Count from {i + 1 + 100 * round_} to 1000, separated by commas."


def end_tokens() -> list[int]:
    """The model's end-of-generation token ids (banned everywhere, so every stream runs its budget)."""
    import llama_cpp

    lib: Any = llama_cpp
    llm = llama_cpp.Llama(model_path=str(default_weights_path()), vocab_only=True, verbose=False)
    try:
        vocab = lib.llama_model_get_vocab(llm.model)
        return [t for t in range(lib.llama_vocab_n_tokens(vocab)) if lib.llama_vocab_is_eog(vocab, t)]
    finally:
        llm.close()


def bare(n: int, tokens: int, threads: int, round_: int, banned: list[int]) -> tuple[float, float]:
    """(aggregate tok/s, seconds to the first token of every sequence) for n sequences in one batch."""
    import llama_cpp
    from llama_cpp import Llama

    lib: Any = llama_cpp
    llm = Llama(
        model_path=str(default_weights_path()), n_ctx=256, n_batch=64, n_threads=threads, verbose=False
    )
    params = lib.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch = n * CONTEXT, 512 + n, 512
    params.n_seq_max, params.kv_unified = n, False
    params.n_threads = params.n_threads_batch = threads
    ctx = lib.llama_init_from_model(llm.model, params)
    batch = lib.llama_batch_init(512 + n, 0, 1)
    vocab = lib.llama_model_get_vocab(llm.model)
    n_vocab = lib.llama_vocab_n_tokens(vocab)
    prompts = [
        llm.tokenize(
            f"<|im_start|>user\n{prompt(i, round_)}<|im_end|>\n<|im_start|>assistant\n".encode(),
            add_bos=False,
            special=True,
        )
        for i in range(n)
    ]

    def fill(items: list[tuple[int, list[int], int]]) -> list[int]:
        rows: list[int] = []
        k = 0
        for seq, toks, pos in items:
            for j, t in enumerate(toks):
                batch.token[k], batch.pos[k], batch.n_seq_id[k] = t, pos + j, 1
                batch.seq_id[k][0] = seq
                batch.logits[k] = j == len(toks) - 1
                k += 1
            rows.append(k - 1)
        batch.n_tokens = k
        if lib.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        return rows

    def argmax(row: int) -> int:
        return _argmax(lib.llama_get_logits_ith(ctx, row), n_vocab, banned)

    try:
        start = time.perf_counter()
        rows = fill([(i, p, 0) for i, p in enumerate(prompts)])
        nexts = [argmax(r) for r in rows]
        first = time.perf_counter() - start
        positions = [len(p) for p in prompts]
        for _ in range(tokens - 1):
            rows = fill([(i, [nexts[i]], positions[i]) for i in range(n)])
            positions = [p + 1 for p in positions]
            nexts = [argmax(r) for r in rows]
        elapsed = time.perf_counter() - start
    finally:
        lib.llama_batch_free(batch)
        lib.llama_free(ctx)
        llm.close()
    return n * tokens / elapsed, first


def _argmax(logits: Any, n_vocab: int, banned: list[int]) -> int:
    import numpy as np

    row = np.ctypeslib.as_array(logits, shape=(n_vocab,))
    row[banned] = -np.inf
    return int(np.argmax(row))


def concurrent_streams(
    url: str, headers: dict[str, str], model: str, n: int, tokens: int, round_: int, banned: list[int]
) -> tuple[float, float]:
    """Workload (iii): n greedy streams of exactly `tokens` tokens; (aggregate tok/s, median TTFT)."""
    bodies = [
        {
            "model": model,
            "messages": [{"role": "user", "content": prompt(i, round_)}],
            "max_tokens": tokens,
            "temperature": 0,
            "logit_bias": {str(t): -100 for t in banned},
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        for i in range(n)
    ]

    async def together() -> list[natural.Request]:
        return await asyncio.gather(*(natural.stream(url, headers, body) for body in bodies))

    start = time.perf_counter()
    results = asyncio.run(together())
    elapsed = time.perf_counter() - start
    # llama_cpp.server sends no usage: a stream that ends on "length" spent its budget
    counts = [r.tokens if r.reported or r.finish != "length" else tokens for r in results]
    short = [c for c in counts if c != tokens]
    if short:
        raise RuntimeError(f"{len(short)} streams stopped before {tokens} tokens: {short}")
    return sum(counts) / elapsed, statistics.median(r.ttft for r in results)


Measure = Callable[[int, int], tuple[float, float]]  # (streams, round) -> (aggregate tok/s, median TTFT)


@dataclass(frozen=True)
class Endpoint:
    url: str  # .../v1/chat/completions
    headers: dict[str, str]


def server_present() -> bool:
    """Whether llama-cpp-python's server extras are installed (for (b))."""
    try:
        import llama_cpp.server.app  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def llama_cpp_server(threads: int) -> Iterator[Endpoint]:
    port = free_port()
    cmd = [
        sys.executable, "-m", "llama_cpp.server", "--model", str(default_weights_path()),
        "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", str(CONTEXT),
        "--host", "127.0.0.1", "--port", str(port), "--interrupt_requests", "False",
    ]  # fmt: skip
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=log)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 120
            while True:
                try:
                    if requests.get(url + "/v1/models", timeout=1).ok:
                        break
                except requests.ConnectionError:
                    pass
                if time.monotonic() > deadline or proc.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"llama_cpp.server did not start: {log.read()[-2000:]!r}")
                time.sleep(0.3)
            yield Endpoint(url + "/v1/chat/completions", {})
        finally:
            proc.terminate()
            proc.wait(30)


# The built-in entry as shipped (catalog._builtin), and the same model without hidden reasoning.
CATALOGUE = """
[[models]]
id = "o1-preview"
engine = "llamacpp"
context = {context}
price_input = 15
price_output = 60
reasoning = "scratchpad"
max_output = 2048

[[models]]
id = "plain"
engine = "llamacpp"
context = {context}
price_input = 15
price_output = 60
reasoning = "none"
max_output = 2048
"""


@contextlib.contextmanager
def tokentill(threads: int, parallel: int) -> Iterator[Endpoint]:
    with tempfile.TemporaryDirectory() as tmp:
        catalogue = Path(tmp) / "models.toml"
        catalogue.write_text(CATALOGUE.format(context=CONTEXT))
        server = TokentillServer(
            Path(tmp),
            None,
            TOKENTILL_CONFIG=str(catalogue),
            TOKENTILL_N_THREADS=str(threads),
            TOKENTILL_MAX_PARALLEL=str(parallel),
            TOKENTILL_LOG_LEVEL=os.environ.get("BENCH_TT_LOG_LEVEL", "warning"),
        ).start()
        try:
            key = server.new_key("bench", credits="100000")
            yield Endpoint(server.url + "/v1/chat/completions", {"Authorization": f"Bearer {key}"})
        finally:
            server.stop()


def greedy(endpoint: Endpoint, model: str, tokens: int, banned: list[int]) -> Measure:
    """Workload (iii) against one server (after a warm-up request)."""
    concurrent_streams(endpoint.url, endpoint.headers, model, 1, 8, -1, banned)
    return lambda n, round_: concurrent_streams(
        endpoint.url, endpoint.headers, model, n, tokens, round_, banned
    )


def decode_one(threads: int, tokens: int) -> float:
    """tok/s of one greedy stream of bare `llama_decode` (run in a fresh process, see `contention`)."""
    import llama_cpp
    import numpy as np

    lib: Any = llama_cpp
    llm = llama_cpp.Llama(
        model_path=str(default_weights_path()), n_ctx=CONTEXT, n_batch=64, n_threads=threads,
        n_threads_batch=threads, verbose=False,
    )  # fmt: skip
    chat = f"<|im_start|>user\n{prompt(0, 0)}<|im_end|>\n<|im_start|>assistant\n"
    llm.eval(llm.tokenize(chat.encode(), add_bos=False, special=True))
    start = time.perf_counter()
    for _ in range(tokens):
        row = np.ctypeslib.as_array(lib.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
        llm.eval([int(np.argmax(row))])
    rate = tokens / (time.perf_counter() - start)
    llm.close()
    return rate


ADAPTIVE_TOKENS = 256  # the engine's first probe comes after 1 s of decoding


def decode_adaptive(threads: int, tokens: int, *, adapt: bool = True) -> tuple[float, int]:
    """(tok/s, threads at the end) of one greedy stream through tokentill's engine (adaptive threads, or
    `threads` fixed)."""
    from tokentill.engines import create_engine
    from tokentill.engines.base import EngineRequest
    from tokentill.engines.llamacpp import LlamaCppEngine
    from tokentill.types import Message, TextDelta

    spec = ModelSpec(id="bench", engine="llamacpp", context=CONTEXT, n_threads=threads)
    engine = create_engine(spec, queue_size=1, n_threads=None, max_parallel=1, adapt_threads=adapt)
    assert isinstance(engine, LlamaCppEngine)
    banned = tuple((t, -100.0) for t in end_tokens())
    request = EngineRequest(
        request_id="adaptive",
        messages=(Message("user", prompt(0, 0)),),
        max_tokens=tokens,
        deadline=time.monotonic() + 600,
        temperature=0.0,
        logit_bias=banned,
    )

    async def run() -> tuple[float, int]:
        await engine.start()
        try:
            first, n = 0.0, 0
            async for event in engine.generate(request):
                if isinstance(event, TextDelta):
                    n += 1  # one delta per sampled token
                    first = first or time.perf_counter()
            rate = (n - 1) / (time.perf_counter() - first)
            return rate, engine.health().threads or 0
        finally:
            await engine.aclose()

    return asyncio.run(run())


def contention(tokens: int, rounds: int) -> None:
    """Print the busy-machine table: tok/s quiet and beside one CPU hog, per configuration."""
    cores = os.cpu_count() or 1
    spin = llama_wait_environment("adaptive", {})
    spin_label = " ".join(f"{k}={v}" for k, v in spin.items())
    configs: list[tuple[str, str, dict[str, str]]] = [
        ("1", "ACTIVE", {"OMP_WAIT_POLICY": "ACTIVE"}),
        (str(cores), "ACTIVE", {"OMP_WAIT_POLICY": "ACTIVE"}),
        ("1", "PASSIVE", {"OMP_WAIT_POLICY": "PASSIVE"}),
        (str(cores), "PASSIVE", {"OMP_WAIT_POLICY": "PASSIVE"}),
        ("1", spin_label, spin),
        (str(cores), spin_label, spin),
        (f"tokentill, adaptive ≤ {cores}", f"{spin_label}, {ADAPTIVE_TOKENS} tokens", spin),
        (f"tokentill, fixed {cores}", f"{spin_label}, {ADAPTIVE_TOKENS} tokens", spin),
    ]
    ends: dict[bool, list[str]] = {False: [], True: []}

    def measure(threads: str, env_vars: dict[str, str], hog: bool) -> float:
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
        env.update(env_vars)
        engine = not threads.isdigit()
        flag = ["--decode-adaptive", str(cores)] if engine else ["--decode-one", threads]
        if "fixed" in threads:
            flag.append("--fixed")
        n = max(tokens, ADAPTIVE_TOKENS) if engine else tokens
        cmd = [sys.executable, __file__, *flag, "--tokens", str(n)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, timeout=600)
        fields = out.stdout.strip().splitlines()[-1].split()
        if "adaptive" in threads:
            ends[hog].append(fields[1])
        return float(fields[0])

    figures: dict[tuple[str, str, bool], list[float]] = {}
    for _ in range(rounds):
        for hog in (False, True):
            hog_cmd = [sys.executable, "-c", "while True: pass"]
            hogs = [subprocess.Popen(hog_cmd)] if hog else []
            try:
                for threads, label, env_vars in configs:
                    figures.setdefault((threads, label, hog), []).append(measure(threads, env_vars, hog))
            finally:
                for proc in hogs:
                    proc.kill()
                    proc.wait()
    print(f"\nbusy machine: one stream, {tokens} greedy tokens, median of {rounds} rounds, {cores} cores; "
          f"'quiet' is the machine as it is (load average now {os.getloadavg()[0]:.2f})")  # fmt: skip
    available = max(1, cores - 1)
    print("| threads | wait | quiet tok/s | beside one hog tok/s | hog/quiet | per available core |")
    print("|---|---|---|---|---|---|")
    for threads, label, _ in configs:
        quiet = statistics.median(figures[(threads, label, False)])
        busy = statistics.median(figures[(threads, label, True)])
        per_core = (busy / available) / (quiet / cores)
        print(f"| {threads} | {label} | {quiet:.1f} | {busy:.1f} | {busy / quiet:.2f} | {per_core:.2f} |")
    print(f"tokentill's thread count at the end of each run: quiet {', '.join(ends[False])}; "
          f"beside the hog {', '.join(ends[True])}")  # fmt: skip


NATURAL = ("(i) scratchpad, as shipped", "(ii) reasoning none")
MODELS = {NATURAL[0]: "o1-preview", NATURAL[1]: "plain"}
A, B, C = "(a) tokentill", "(b) llama_cpp.server", "(c) bare batched"


def progress(message: str) -> None:
    """A line on stderr while the run goes on (the figures come at the end, on stdout)."""
    print(
        f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.2f}] {message}", file=sys.stderr, flush=True
    )


def natural_round(
    args: argparse.Namespace, round_: int, tt: Endpoint, server: Endpoint | None, banned: list[int]
) -> dict[tuple[str, str], natural.Figures]:
    """Workloads (i) and (ii) once for every contender, in an order that rotates with the round."""
    texts = natural.prompts(args.requests, round_)
    figures: dict[tuple[str, str], natural.Figures] = {}

    def ours(workload: str) -> None:
        progress(f"round {round_}: {workload}, tokentill then bare replay")
        body = natural.bodies(
            MODELS[workload], texts, args.max_completion_tokens, budget_field="max_completion_tokens"
        )
        figures[(workload, A)] = ran = natural.run(tt.url, tt.headers, body, args.concurrency)
        progress(f"  tokentill {ran.aggregate:.1f} tok/s, {sum(ran.counts)} tokens")
        limit = natural.bare_replay(texts, ran.counts, args.concurrency, args.threads, banned, CONTEXT)
        figures[(workload, C)] = limit
        progress(f"  bare replay {limit.aggregate:.1f} tok/s")

    def theirs() -> None:
        assert server is not None
        progress(f"round {round_}: natural workload, llama_cpp.server")
        body = natural.bodies("x", texts, args.max_completion_tokens, budget_field="max_tokens")
        ran = natural.run(server.url, {}, body, args.concurrency)
        figures[(NATURAL[0], B)] = figures[(NATURAL[1], B)] = ran
        progress(f"  llama_cpp.server {ran.aggregate:.1f} tok/s, {sum(ran.counts)} tokens")

    chosen = set(args.workloads.split(","))
    jobs: list[Callable[[], None]] = [
        lambda w=w: ours(w) for w, key in zip(NATURAL, ("i", "ii"), strict=True) if key in chosen
    ]
    if server is not None:
        jobs.append(theirs)
    for k in range(len(jobs)):
        jobs[(k + round_) % len(jobs)]()
    return figures


def natural_contention(args: argparse.Namespace, tt: Endpoint) -> dict[bool, list[float]]:
    """Workload (ii) on tokentill, quiet and beside one CPU hog, alternating: aggregate tok/s per case."""
    out: dict[bool, list[float]] = {False: [], True: []}
    for round_ in range(args.rounds):
        texts = natural.prompts(args.requests, 1000 + round_)
        body = natural.bodies(
            MODELS[NATURAL[1]], texts, args.max_completion_tokens, budget_field="max_completion_tokens"
        )
        for hog in (round_ % 2 == 1, round_ % 2 == 0):
            progress(f"contention round {round_}: {'one CPU hog' if hog else 'quiet'}")
            hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])] if hog else []
            try:
                out[hog].append(natural.run(tt.url, tt.headers, body, args.concurrency).aggregate)
            finally:
                for proc in hogs:
                    proc.kill()
                    proc.wait()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="rounds per figure; the median is printed")
    parser.add_argument("--requests", type=int, default=32, help="requests per natural workload")
    parser.add_argument("--concurrency", type=int, default=8, help="natural requests in flight")
    parser.add_argument("--max-completion-tokens", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=128, help="tokens per greedy stream (iii)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--parallel", type=int, default=8, help="tokentill's TOKENTILL_MAX_PARALLEL")
    parser.add_argument("--streams", default="8", help="concurrent greedy streams (iii), e.g. 1,4,8,16")
    parser.add_argument("--workloads", default="i,ii,iii", help="which workloads, e.g. i,iii")
    parser.add_argument("--skip-server", action="store_true", help="leave out llama_cpp.server (slow)")
    parser.add_argument("--skip-contention", action="store_true", help="leave out the CPU-hog case")
    parser.add_argument("--quick", action="store_true", help="1 round, 8 requests of ≤ 128 tokens, 64 greedy")
    parser.add_argument("--contention-only", action="store_true", help="only the bare busy-machine table")
    parser.add_argument("--decode-one", type=int, default=0, help=argparse.SUPPRESS)  # a contention probe
    parser.add_argument("--decode-adaptive", type=int, default=0, help=argparse.SUPPRESS)  # another
    parser.add_argument("--fixed", action="store_true", help=argparse.SUPPRESS)  # … without adapting
    args = parser.parse_args()
    if args.decode_one:
        print(f"{decode_one(args.decode_one, args.tokens):.3f}")
        return
    if args.decode_adaptive:
        rate, threads = decode_adaptive(args.decode_adaptive, args.tokens, adapt=not args.fixed)
        print(f"{rate:.3f} {threads}")
        return
    if args.contention_only:
        contention(args.tokens, args.rounds)
        return
    if args.quick:
        args.rounds, args.requests, args.max_completion_tokens, args.tokens = 1, 8, 128, 64
    if not args.skip_server and not server_present():
        sys.exit(
            "llama_cpp.server is not installed: `.venv/bin/pip install 'llama-cpp-python[server]'` "
            "(or `./scripts/install test`), or run with --skip-server"
        )
    workloads = set(args.workloads.split(","))
    streams = [int(s) for s in args.streams.split(",")] if "iii" in workloads else []
    banned = end_tokens()
    loads = [os.getloadavg()[0]]
    natural_runs: list[dict[tuple[str, str], natural.Figures]] = []
    greedy_runs: dict[str, dict[int, list[tuple[float, float]]]] = {}
    hogged: dict[bool, list[float]] = {}
    with contextlib.ExitStack() as stack:
        # Both servers stay up (idle when not measured) so that rounds can alternate between contenders:
        # a machine that slows down for a while then costs every contender alike.
        tt = stack.enter_context(tokentill(args.threads, args.parallel))
        server = None if args.skip_server else stack.enter_context(llama_cpp_server(args.threads))
        measures: dict[str, Measure] = {
            C: lambda n, r: bare(n, args.tokens, args.threads, r, banned),
            A: greedy(tt, "plain", args.tokens, banned),
        }
        if server is not None:
            measures[B] = greedy(server, "x", args.tokens, banned)
        for round_ in range(args.rounds):
            if workloads & {"i", "ii"}:
                natural_runs.append(natural_round(args, round_, tt, server, banned))
                loads.append(os.getloadavg()[0])
            for n in streams:
                names = list(measures)
                for k in range(len(names)):
                    name = names[(k + round_) % len(names)]
                    progress(f"round {round_}: greedy, {n} streams, {name}")
                    greedy_runs.setdefault(name, {}).setdefault(n, []).append(measures[name](n, round_))
            loads.append(os.getloadavg()[0])
        if not args.skip_contention and workloads & {"i", "ii"}:
            hogged = natural_contention(args, tt)
            loads.append(os.getloadavg()[0])
    report(args, natural_runs, greedy_runs, streams, hogged, loads)


def report(
    args: argparse.Namespace,
    natural_runs: list[dict[tuple[str, str], natural.Figures]],
    greedy_runs: dict[str, dict[int, list[tuple[float, float]]]],
    streams: list[int],
    hogged: dict[bool, list[float]],
    loads: list[float],
) -> None:
    cores = os.cpu_count() or 1
    print(
        f"machine: {cores} cores, threads={args.threads}, tokentill max_parallel={args.parallel}, median of "
        f"{args.rounds} alternating rounds; load average (1 min) at start and after each round: "
        + ", ".join(f"{x:.2f}" for x in loads)
    )
    ratios: list[str] = []
    natural_figures = {
        key: natural.Figures.median([run[key] for run in natural_runs])
        for key in (natural_runs[0] if natural_runs else {})
    }
    for workload in NATURAL:
        rows = [
            (name, natural_figures[(workload, name)])
            for name in (A, B, C)
            if (workload, name) in natural_figures
        ]
        if not rows:
            continue
        print(
            f"\n{workload}: {args.requests} requests (3 short : 1 long), {args.concurrency} in flight, "
            f"max_completion_tokens {args.max_completion_tokens}, default sampling, natural stops"
        )
        print(
            "| contender | aggregate tok/s | TTFT p50 s | TTFT p95 s | per-request tok/s p50 "
            "| tokens/request |"
        )
        print("|---|---|---|---|---|---|")
        for name, f in rows:
            mean = statistics.mean(f.counts)
            print(
                f"| {name} | {f.aggregate:.1f} | {f.ttft_p50:.2f} | {f.ttft_p95:.2f} | {f.per_request:.1f} "
                f"| {mean:.0f} |"
            )
        got = dict(rows)
        line = f"{workload}: a/c = {got[A].aggregate / got[C].aggregate:.2f}"
        if B in got:
            line += f", a/b = {got[A].aggregate / got[B].aggregate:.2f}"
        ratios.append(line)
    if streams:
        print(f"\n(iii) fixed-length greedy: every stream decodes exactly {args.tokens} tokens")
        names = [name for name in (A, B, C) if name in greedy_runs]
        print("| streams | " + " | ".join(f"{name} tok/s | TTFT s" for name in names) + " |")
        print("|" + "---|" * (1 + 2 * len(names)))
        med = {
            name: {
                n: tuple(statistics.median(x) for x in zip(*runs, strict=True)) for n, runs in by_n.items()
            }
            for name, by_n in greedy_runs.items()
        }
        for n in streams:
            print(
                f"| {n} | "
                + " | ".join(f"{med[name][n][0]:.1f} | {med[name][n][1]:.3f}" for name in names)
                + " |"
            )
        for n in streams:
            line = f"(iii) greedy, {n} streams: a/c = {med[A][n][0] / med[C][n][0]:.2f}"
            if B in med:
                line += f", a/b = {med[A][n][0] / med[B][n][0]:.2f}"
            ratios.append(line)
    if hogged:
        quiet, busy = statistics.median(hogged[False]), statistics.median(hogged[True])
        available = max(1, cores - 1)
        print(
            "\ncontention: workload (ii) on tokentill, default (adaptive) threads and wait policy, beside "
            "one CPU hog"
        )
        print("| case | aggregate tok/s | available cores | tok/s per available core |")
        print("|---|---|---|---|")
        print(f"| quiet | {quiet:.1f} | {cores} | {quiet / cores:.1f} |")
        print(f"| one `while True: pass` | {busy:.1f} | {available} | {busy / available:.1f} |")
        ratios.append(
            f"contention: per available core, hog/quiet = {(busy / available) / (quiet / cores):.2f}"
        )
    print("\nratios (a = tokentill, b = llama_cpp.server, c = bare batched limit):")
    for line in ratios:
        print("  " + line)


if __name__ == "__main__":
    main()
