"""Concurrent streams: tokentill's continuous batching vs llama-cpp-python's server vs bare batched decode.

One run, one machine, the packaged SmolLM2-135M-Instruct GGUF, the same thread count everywhere. For N in
1, 4, 8, 16 concurrent streams, each asking for exactly `--tokens` greedy tokens (the model's end tokens are
banned with `logit_bias` over HTTP and masked in the bare loop, so every stream decodes its whole budget
everywhere), it prints the aggregate tokens/s (all completion tokens / wall time from the first request to
the last `[DONE]`, prefill included) and the median time to first token, each the median of `--rounds`
rounds that alternate between the three (every round asks new prompts, so no round is served from an
earlier round's cache), for:

  (a) tokentill: a real `tokentill serve` (auth, credits, ledger), catalogue entry with `reasoning = "none"`,
      streaming SSE, `TOKENTILL_MAX_PARALLEL` = `--parallel`;
  (b) llama-cpp-python's own server (`python -m llama_cpp.server`), streaming, `--interrupt_requests False`
      (its default cuts a running stream off when the next request arrives, so most would not finish);
  (c) bare batched `llama_decode`: N sequences in one batch per step, no HTTP, no Python server: the limit.

The HTTP client is one asyncio thread reading raw HTTP/1.1 (every stream must end with `[DONE]` and report
`--tokens` completion tokens): on a 2-core machine a thread per stream would take CPU from the server
being measured.

    .venv/bin/python bench/batching.py [--tokens 128] [--threads 2] [--parallel 8] [--streams 1,4,8,16]
                                       [--rounds 3] [--contention]

`--contention` adds the busy-machine case: one greedy stream of bare `llama_decode` at 1 thread and at
all cores, with llama.cpp's OpenMP workers spinning (`OMP_WAIT_POLICY=ACTIVE`) or sleeping (`PASSIVE`,
tokentill's default, `TOKENTILL_LLAMA_WAIT_POLICY`), on the machine as it is ("quiet") and beside one
CPU hog per core; each in a fresh process (libgomp reads the policy when it loads). It prints tok/s and
the hog/quiet ratio per configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.e2e.conftest import TokentillServer, free_port  # noqa: E402

from tokentill.catalog import default_weights_path  # noqa: E402

CONTEXT = 1024  # per sequence, everywhere


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


async def stream_one(url: str, headers: dict[str, str], body: dict[str, Any]) -> tuple[float, int]:
    """(seconds to the first content delta, completion tokens) of one streamed chat completion."""
    target = urlsplit(url)
    reader, writer = await asyncio.open_connection(target.hostname, target.port)
    payload = json.dumps(body).encode()
    head = [
        f"POST {target.path} HTTP/1.1",
        f"Host: {target.netloc}",
        "Content-Type: application/json",
        f"Content-Length: {len(payload)}",
        "Connection: close",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    start = time.perf_counter()
    writer.write("\r\n".join(head).encode() + b"\r\n\r\n" + payload)
    status = await reader.readline()
    if b" 200 " not in status:
        raise RuntimeError(f"{status!r}: {await reader.read(2000)!r}")
    chunked = False
    while (line := await reader.readline()) not in (b"\r\n", b""):
        chunked |= line.lower().startswith(b"transfer-encoding: chunked")
    buffer, first, usage, chunks, done, finish = b"", float("nan"), None, 0, False, None
    while True:
        if chunked:
            size = int((await reader.readline()).strip() or b"0", 16)
            if size == 0:
                break
            buffer += (await reader.readexactly(size + 2))[:-2]
        else:
            data = await reader.read(65536)
            if not data:
                break
            buffer += data
        buffer = buffer.replace(b"\r\n", b"\n")  # sse-starlette (llama_cpp.server) ends lines with CRLF
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            if event == b"data: [DONE]":
                done = True
            elif event.startswith(b"data: {"):
                chunk = json.loads(event[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]["completion_tokens"]
                choices = chunk.get("choices") or []
                if choices and choices[0].get("finish_reason"):
                    finish = choices[0]["finish_reason"]
                if choices and choices[0].get("delta", {}).get("content"):
                    chunks += 1
                    if first != first:
                        first = time.perf_counter() - start
    writer.close()
    if not done:
        raise RuntimeError("stream ended without [DONE]")
    if usage is None and finish == "length":  # llama_cpp.server sends no usage: the budget was spent
        usage = body["max_tokens"]
    return first, usage if usage is not None else chunks


def concurrent_streams(
    url: str, headers: dict[str, str], model: str, n: int, tokens: int, round_: int, banned: list[int]
) -> tuple[float, float]:
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

    async def together() -> list[tuple[float, int]]:
        return await asyncio.gather(*(stream_one(url, headers, body) for body in bodies))

    start = time.perf_counter()
    results = asyncio.run(together())
    elapsed = time.perf_counter() - start
    short = [r[1] for r in results if r[1] != tokens]
    if short:
        raise RuntimeError(f"{len(short)} streams stopped before {tokens} tokens: {short}")
    return sum(r[1] for r in results) / elapsed, statistics.median(r[0] for r in results)


Measure = Callable[[int, int], tuple[float, float]]  # (streams, round) -> (aggregate tok/s, median TTFT)


@contextlib.contextmanager
def llama_cpp_server(threads: int, tokens: int, banned: list[int]) -> Iterator[Measure]:
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
            chat = url + "/v1/chat/completions"
            concurrent_streams(chat, {}, "x", 1, 8, -1, banned)  # warm-up
            yield lambda n, round_: concurrent_streams(chat, {}, "x", n, tokens, round_, banned)
        finally:
            proc.terminate()
            proc.wait(30)


@contextlib.contextmanager
def tokentill(threads: int, parallel: int, tokens: int, banned: list[int]) -> Iterator[Measure]:
    with tempfile.TemporaryDirectory() as tmp:
        catalogue = Path(tmp) / "models.toml"
        catalogue.write_text(
            f'[[models]]\nid = "plain"\nengine = "llamacpp"\ncontext = {CONTEXT}\nreasoning = "none"\n'
        )
        server = TokentillServer(
            Path(tmp),
            None,
            TOKENTILL_CONFIG=str(catalogue),
            TOKENTILL_N_THREADS=str(threads),
            TOKENTILL_MAX_PARALLEL=str(parallel),
            TOKENTILL_LOG_LEVEL="warning",
        ).start()
        try:
            key = server.new_key("bench", credits="100000")
            headers = {"Authorization": f"Bearer {key}"}
            chat = server.url + "/v1/chat/completions"
            concurrent_streams(chat, headers, "plain", 1, 8, -1, banned)  # warm-up
            yield lambda n, round_: concurrent_streams(chat, headers, "plain", n, tokens, round_, banned)
        finally:
            server.stop()


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


def contention(tokens: int, rounds: int) -> None:
    """Print the busy-machine table: tok/s quiet and beside one CPU hog per core, per configuration."""
    cores = os.cpu_count() or 1
    configs = [(1, "ACTIVE"), (cores, "ACTIVE"), (1, "PASSIVE"), (cores, "PASSIVE")]

    def measure(threads: int, policy: str) -> float:
        env = {**os.environ, "OMP_WAIT_POLICY": policy}
        cmd = [sys.executable, __file__, "--decode-one", str(threads), "--tokens", str(tokens)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, timeout=600)
        return float(out.stdout.strip().splitlines()[-1])

    figures: dict[tuple[int, str, bool], list[float]] = {}
    for _ in range(rounds):
        for hog in (False, True):
            hog_cmd = [sys.executable, "-c", "while True: pass"]
            hogs = [subprocess.Popen(hog_cmd) for _ in range(cores if hog else 0)]
            try:
                for threads, policy in configs:
                    figures.setdefault((threads, policy, hog), []).append(measure(threads, policy))
            finally:
                for proc in hogs:
                    proc.kill()
                    proc.wait()
    print(f"\nbusy machine: one stream, {tokens} greedy tokens, median of {rounds} rounds, {cores} cores; "
          f"'quiet' is the machine as it is (load average now {os.getloadavg()[0]:.2f})")  # fmt: skip
    print("| threads | OMP_WAIT_POLICY | quiet tok/s | beside a hog per core tok/s | hog/quiet |")
    print("|---|---|---|---|---|")
    for threads, policy in configs:
        quiet = statistics.median(figures[(threads, policy, False)])
        busy = statistics.median(figures[(threads, policy, True)])
        print(f"| {threads} | {policy} | {quiet:.1f} | {busy:.1f} | {busy / quiet:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=8, help="tokentill's TOKENTILL_MAX_PARALLEL")
    parser.add_argument("--streams", default="1,4,8,16")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per figure; the median is printed")
    parser.add_argument("--skip-server", action="store_true", help="leave out llama_cpp.server (slow)")
    parser.add_argument("--contention", action="store_true", help="add the busy-machine case (see above)")
    parser.add_argument("--contention-only", action="store_true", help="only the busy-machine case")
    parser.add_argument("--decode-one", type=int, default=0, help=argparse.SUPPRESS)  # a contention probe
    args = parser.parse_args()
    if args.decode_one:
        print(f"{decode_one(args.decode_one, args.tokens):.3f}")
        return
    if args.contention_only:
        contention(args.tokens, args.rounds)
        return
    streams = [int(s) for s in args.streams.split(",")]
    banned = end_tokens()

    load_before = os.getloadavg()
    with contextlib.ExitStack() as stack:
        # Both servers stay up (idle when not measured) so that rounds can alternate between the three:
        # a machine that slows down for a while then costs every contender alike.
        measures: dict[str, Measure] = {
            "(c) bare batched llama_decode": lambda n, r: bare(n, args.tokens, args.threads, r, banned),
            "(a) tokentill HTTP SSE": stack.enter_context(
                tokentill(args.threads, args.parallel, args.tokens, banned)
            ),
        }
        if not args.skip_server:
            measures["(b) llama_cpp.server SSE"] = stack.enter_context(
                llama_cpp_server(args.threads, args.tokens, banned)
            )
        runs: dict[str, dict[int, list[tuple[float, float]]]] = {name: {} for name in measures}
        for n in streams:
            for round_ in range(args.rounds):
                for name, measure in measures.items():
                    runs[name].setdefault(n, []).append(measure(n, round_))
    load_after = os.getloadavg()
    results = {
        name: {
            n: (statistics.median(r[0] for r in figures), statistics.median(r[1] for r in figures))
            for n, figures in by_n.items()
        }
        for name, by_n in runs.items()
    }

    print(
        f"machine: {os.cpu_count()} cores, threads={args.threads}, tokentill max_parallel={args.parallel}, "
        f"{args.tokens} tokens per stream, greedy, context {CONTEXT}/sequence, median of {args.rounds} "
        "alternating rounds; "
        f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}"
    )
    header = "| streams | " + " | ".join(f"{name} tok/s | TTFT s" for name in results) + " |"
    print(header)
    print("|" + "---|" * (1 + 2 * len(results)))
    for n in streams:
        cells = " | ".join(f"{results[name][n][0]:.1f} | {results[name][n][1]:.3f}" for name in results)
        print(f"| {n} | {cells} |")
    a, c = results["(a) tokentill HTTP SSE"], results["(c) bare batched llama_decode"]
    b = results.get("(b) llama_cpp.server SSE")
    for n in streams:
        ratios = f"a/c = {a[n][0] / c[n][0]:.2f}"
        if b is not None:
            ratios += f", a/b = {a[n][0] / b[n][0]:.2f}"
        print(f"{n} streams: {ratios}")

    if args.contention:
        contention(args.tokens, args.rounds)


if __name__ == "__main__":
    main()
