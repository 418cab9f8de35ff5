"""Concurrent streams: tokentill's continuous batching vs llama-cpp-python's server vs bare batched decode.

One run, one machine, the packaged SmolLM2-135M-Instruct GGUF, the same thread count everywhere. For N in
1, 4, 8, 16 concurrent streams, each asking for `--tokens` greedy tokens ("count from i to 1000", which
SmolLM2 keeps doing until the budget), it prints the aggregate tokens/s (all completion tokens / wall time
from the first request to the last `[DONE]`, prefill included) and the median time to first token, for:

  (a) tokentill: a real `tokentill serve` (auth, credits, ledger), catalogue entry with `reasoning = "none"`,
      streaming SSE, `TOKENTILL_MAX_PARALLEL` = `--parallel`;
  (b) llama-cpp-python's own server (`python -m llama_cpp.server`), streaming, `--interrupt_requests False`
      (its default cuts a running stream off when the next request arrives, so most would not finish);
  (c) bare batched `llama_decode`: N sequences in one batch per step, no HTTP, no Python server: the limit.

    .venv/bin/python bench/batching.py [--tokens 128] [--threads 2] [--parallel 8] [--streams 1,4,8,16]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.e2e.conftest import TokentillServer, free_port  # noqa: E402

from tokentill.catalog import default_weights_path  # noqa: E402

CONTEXT = 1024  # per sequence, everywhere


def prompt(i: int) -> str:
    return f"Count from {i + 1} to 1000, separated by commas."


def bare(n: int, tokens: int, threads: int) -> tuple[float, float]:
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
            f"<|im_start|>user\n{prompt(i)}<|im_end|>\n<|im_start|>assistant\n".encode(),
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
        return _argmax(lib.llama_get_logits_ith(ctx, row), n_vocab)

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


def _argmax(logits: Any, n_vocab: int) -> int:
    import numpy as np

    return int(np.argmax(np.ctypeslib.as_array(logits, shape=(n_vocab,))))


def stream_one(url: str, headers: dict[str, str], body: dict[str, Any]) -> tuple[float, int]:
    """(seconds to the first content delta, completion tokens) of one streamed chat completion."""
    start = time.perf_counter()
    first, chunks, usage = float("nan"), 0, None
    with requests.post(url, headers=headers, json=body, stream=True, timeout=900) as r:
        r.raise_for_status()
        done = False
        for line in r.iter_lines():
            if line == b"data: [DONE]":
                done = True
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]["completion_tokens"]
            choices = event.get("choices") or []
            if choices and choices[0].get("delta", {}).get("content"):
                chunks += 1
                if first != first:
                    first = time.perf_counter() - start
        if not done:
            raise RuntimeError("stream ended without [DONE]")
    return first, usage if usage is not None else chunks


def concurrent_streams(
    url: str, headers: dict[str, str], model: str, n: int, tokens: int
) -> tuple[float, float]:
    bodies = [
        {
            "model": model,
            "messages": [{"role": "user", "content": prompt(i)}],
            "max_tokens": tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        for i in range(n)
    ]
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        results = list(pool.map(lambda b: stream_one(url, headers, b), bodies))
    elapsed = time.perf_counter() - start
    return sum(r[1] for r in results) / elapsed, statistics.median(r[0] for r in results)


def llama_cpp_server(threads: int, streams: list[int], tokens: int) -> dict[int, tuple[float, float]]:
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
            concurrent_streams(chat, {}, "x", 1, 8)  # warm-up
            return {n: concurrent_streams(chat, {}, "x", n, tokens) for n in streams}
        finally:
            proc.terminate()
            proc.wait(30)


def tokentill(threads: int, parallel: int, streams: list[int], tokens: int) -> dict[int, tuple[float, float]]:
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
            concurrent_streams(chat, headers, "plain", 1, 8)  # warm-up
            return {n: concurrent_streams(chat, headers, "plain", n, tokens) for n in streams}
        finally:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=8, help="tokentill's TOKENTILL_MAX_PARALLEL")
    parser.add_argument("--streams", default="1,4,8,16")
    parser.add_argument("--skip-server", action="store_true", help="leave out llama_cpp.server (slow)")
    args = parser.parse_args()
    streams = [int(s) for s in args.streams.split(",")]

    load_before = os.getloadavg()
    results: dict[str, dict[int, tuple[float, float]]] = {}
    results["(c) bare batched llama_decode"] = {n: bare(n, args.tokens, args.threads) for n in streams}
    results["(a) tokentill HTTP SSE"] = tokentill(args.threads, args.parallel, streams, args.tokens)
    if not args.skip_server:
        results["(b) llama_cpp.server SSE"] = llama_cpp_server(args.threads, streams, args.tokens)
    load_after = os.getloadavg()

    print(
        f"machine: {os.cpu_count()} cores, threads={args.threads}, tokentill max_parallel={args.parallel}, "
        f"{args.tokens} tokens per stream, greedy, context {CONTEXT}/sequence; "
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


if __name__ == "__main__":
    main()
