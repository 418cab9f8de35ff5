"""Tokens/s of a completion through tokentill's HTTP path vs bare `llama_cpp.Llama`, in one run.

Both sides use the packaged SmolLM2-135M-Instruct GGUF, the same prompt, greedy decoding, the same thread
count and context. tokentill runs as a real `tokentill serve` subprocess with auth, credits and the ledger
on (catalogue entry with `reasoning = "none"`, so both sides do one pass); the client is plain `requests`.
Then streaming against non-streaming, alternating run by run: time to the first visible token (for a JSON
answer that is its total time) and completion tokens/s, for `reasoning = "none"` (budget `--tokens`) and
for the hidden scratchpad at `reasoning_effort=low` (budget `--tokens` + 64: the 64 notes tokens, then the
answer), with the ratios streamed / not streamed.

    .venv/bin/python bench/http_vs_bare.py [--runs 5] [--tokens 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.e2e.conftest import TokentillServer  # noqa: E402

from tokentill.catalog import default_weights_path  # noqa: E402

PROMPT = "Write a short story about a robot who learns to paint."


def bare(runs: int, tokens: int, threads: int) -> list[float]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(default_weights_path()), n_ctx=2048, n_threads=threads, verbose=False)
    rates: list[float] = []
    try:
        for _ in range(runs):
            start = time.perf_counter()
            out = llm.create_chat_completion(
                messages=[{"role": "user", "content": PROMPT}], max_tokens=tokens, temperature=0
            )
            elapsed = time.perf_counter() - start
            rates.append(out["usage"]["completion_tokens"] / elapsed)  # type: ignore[index]
    finally:
        llm.close()
    return rates


def through_http(server: TokentillServer, key: str, model: str, runs: int, tokens: int) -> list[float]:
    rates: list[float] = []
    for _ in range(runs):
        start = time.perf_counter()
        r = requests.post(
            f"{server.url}/v1/{model}",
            headers={"Authorization": f"Bearer {key}"},
            json={
                "messages": [{"role": "user", "content": PROMPT}],
                "max_completion_tokens": tokens,
                "temperature": 0,
            },
            timeout=600,
        )
        elapsed = time.perf_counter() - start
        r.raise_for_status()
        rates.append(r.json()["usage"]["completion_tokens"] / elapsed)
    return rates


def timed(
    server: TokentillServer, key: str, model: str, budget: int, extra: dict[str, Any], *, stream: bool
) -> tuple[float, float, int]:
    """(seconds to the first visible content, seconds to the end, completion tokens) of one request.

    Not streamed, the first visible token arrives with the whole answer: its time is the total time.
    Streamed, the completion tokens come from the usage chunk (`stream_options.include_usage`).
    """
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": PROMPT}],
        "max_completion_tokens": budget,
        "temperature": 0,
        **extra,
    }
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = float("nan")
    tokens = 0
    with requests.post(
        f"{server.url}/v1/{model}",
        headers={"Authorization": f"Bearer {key}"},
        json=body,
        stream=stream,
        timeout=600,
    ) as r:
        r.raise_for_status()
        if not stream:
            tokens = r.json()["usage"]["completion_tokens"]
            total = time.perf_counter() - start
            return total, total, tokens
        for line in r.iter_lines():
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            choices = chunk["choices"]
            if first != first and choices and choices[0]["delta"].get("content"):
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return first, time.perf_counter() - start, tokens


# (label, model, budget, extra body): the scratchpad budget is the answer's plus low effort's 64 notes.
MODES: tuple[tuple[str, str, int, dict[str, Any]], ...] = (
    ("reasoning none", "plain", 0, {}),
    ("scratchpad, reasoning_effort=low", "o1-preview", 64, {"reasoning_effort": "low"}),
)


def stream_vs_collected(
    server: TokentillServer, key: str, runs: int, tokens: int
) -> dict[tuple[str, bool], list[tuple[float, float, int]]]:
    """Each mode streamed and not, alternating run by run so both see the same machine load."""
    results: dict[tuple[str, bool], list[tuple[float, float, int]]] = {}
    for label, model, notes, extra in MODES:
        for _ in range(runs):
            for stream in (True, False):
                row = timed(server, key, model, tokens + notes, extra, stream=stream)
                results.setdefault((label, stream), []).append(row)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    bare_rates = bare(args.runs, args.tokens, args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        catalogue = Path(tmp) / "models.toml"
        catalogue.write_text(
            '[[models]]\nid = "plain"\nengine = "llamacpp"\ncontext = 2048\nreasoning = "none"\n\n'
            '[[models]]\nid = "o1-preview"\nengine = "llamacpp"\ncontext = 2048\nreasoning = "scratchpad"\n'
        )
        server = TokentillServer(
            Path(tmp), None, TOKENTILL_CONFIG=str(catalogue), TOKENTILL_N_THREADS=str(args.threads)
        ).start()
        try:
            key = server.new_key("bench", credits="1000")
            http_rates = through_http(server, key, "plain", args.runs, args.tokens)
            results = stream_vs_collected(server, key, args.runs, args.tokens)
        finally:
            server.stop()

    b, h = statistics.median(bare_rates), statistics.median(http_rates)
    print(
        f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}, threads={args.threads}, "
        f"{args.runs} runs, {args.tokens} answer tokens, greedy"
    )
    print(f"{'path':<44}{'median tok/s':>14}")
    print(f"{'bare llama_cpp.Llama.create_chat_completion':<44}{b:>14.1f}")
    print(f"{'tokentill HTTP (auth + credits + ledger)':<44}{h:>14.1f}")
    print(f"ratio tokentill / bare: {h / b:.3f}")
    print()
    print("first visible token (not streamed: the whole answer) and completion tokens/s, medians")
    print(f"{'mode':<36}{'budget':>7}{'rendering':>12}{'first s':>9}{'total s':>9}{'tokens':>8}{'tok/s':>8}")
    for label, _, notes, _ in MODES:
        summary: dict[bool, tuple[float, float]] = {}
        for stream in (True, False):
            rows = results[(label, stream)]
            first = statistics.median(r[0] for r in rows)
            total = statistics.median(r[1] for r in rows)
            tokens = statistics.median(r[2] for r in rows)
            rate = statistics.median(r[2] / r[1] for r in rows)
            summary[stream] = (first, rate)
            rendering = "stream" if stream else "JSON"
            print(
                f"{label:<36}{args.tokens + notes:>7}{rendering:>12}{first:>9.3f}{total:>9.3f}"
                f"{tokens:>8.0f}{rate:>8.1f}"
            )
        (s_first, s_rate), (j_first, j_rate) = summary[True], summary[False]
        print(
            f"{'':<36}ratios stream / JSON: first visible token {s_first / j_first:.3f}, "
            f"tok/s {s_rate / j_rate:.3f}"
        )


if __name__ == "__main__":
    main()
