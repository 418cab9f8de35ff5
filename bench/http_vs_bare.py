"""Tokens/s of a completion through tokentill's HTTP path vs bare `llama_cpp.Llama`, in one run.

Both sides use the packaged SmolLM2-135M-Instruct GGUF, the same prompt, greedy decoding, the same thread
count and context. tokentill runs as a real `tokentill serve` subprocess with auth, credits and the ledger
on (catalogue entry with `reasoning = "none"`, so both sides do one pass); the client is plain `requests`.
Then streaming: time to first visible token, for `reasoning = "none"` and for the default hidden
scratchpad (`reasoning_effort=low`), against the non-streaming total time.

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


def first_token(
    server: TokentillServer, key: str, model: str, tokens: int, extra: dict[str, object]
) -> tuple[float, float]:
    """(seconds to the first visible content delta, seconds to [DONE]) for one streamed request."""
    start = time.perf_counter()
    first = float("nan")
    with requests.post(
        f"{server.url}/v1/{model}",
        headers={"Authorization": f"Bearer {key}"},
        json={
            "messages": [{"role": "user", "content": PROMPT}],
            "max_completion_tokens": tokens,
            "temperature": 0,
            "stream": True,
            **extra,
        },
        stream=True,
        timeout=600,
    ) as r:
        for line in r.iter_lines():
            if not line.startswith(b"data: {"):
                continue
            delta = json.loads(line[6:])["choices"]
            if first != first and delta and delta[0]["delta"].get("content"):
                first = time.perf_counter() - start
    return first, time.perf_counter() - start


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
            ttft_plain = [first_token(server, key, "plain", args.tokens, {}) for _ in range(args.runs)]
            ttft_reason = [
                first_token(server, key, "o1-preview", args.tokens + 64, {"reasoning_effort": "low"})
                for _ in range(args.runs)
            ]
        finally:
            server.stop()

    b, h = statistics.median(bare_rates), statistics.median(http_rates)
    print(
        f"machine: {os.cpu_count()} cores, threads={args.threads}, {args.runs} runs, "
        f"{args.tokens} tokens, greedy"
    )
    print(f"{'path':<44}{'median tok/s':>14}")
    print(f"{'bare llama_cpp.Llama.create_chat_completion':<44}{b:>14.1f}")
    print(f"{'tokentill HTTP (auth + credits + ledger)':<44}{h:>14.1f}")
    print(f"ratio tokentill / bare: {h / b:.3f}")
    print()
    print(f"{'streaming, first visible token':<44}{'median s':>14}{'total s':>10}")
    for label, rows in (("reasoning none", ttft_plain), ("scratchpad, reasoning_effort=low", ttft_reason)):
        print(
            f"{label:<44}{statistics.median(r[0] for r in rows):>14.3f}"
            f"{statistics.median(r[1] for r in rows):>10.3f}"
        )


if __name__ == "__main__":
    main()
