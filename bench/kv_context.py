"""What the per-sequence context costs a batched decode step, at equal work: bare `llama_decode`.

    .venv/bin/python bench/kv_context.py [--contexts 1024 8192] [--positions 200 500 900] [--steps 100]

For each starting position P, one process creates a context per `--contexts` value (8 sequences, one KV
stream each, `kv_unified = false`, flash attention off: tokentill's engine's settings), fills every
sequence with P prompt tokens, then times `--steps` decode steps of 8 one-token rows, alternating between
the contexts step by step, so a machine whose speed drifts costs every context alike. Printed: the median
step per context and its ratio to the first. The cells attended to are the same in every context (up to
the longest sequence, padded to 256); only how far apart each sequence's cells lie differs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from tokentill.catalog import default_weights_path
from tokentill.settings import llama_wait_environment

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import natural_traffic as natural

SEQUENCES = 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192], help="tokens per sequence")
    parser.add_argument("--positions", type=int, nargs="+", default=[200, 500, 900])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    os.environ.update(llama_wait_environment("adaptive", os.environ))  # tokentill's default, before loading
    import llama_cpp

    lib: Any = llama_cpp
    llm = llama_cpp.Llama(
        model_path=str(default_weights_path()), n_ctx=256, n_batch=64, n_threads=args.threads, verbose=False
    )
    print(
        f"{os.cpu_count()} CPUs, {args.threads} threads, {SEQUENCES} sequences, median of {args.steps} steps"
    )
    print("| first position | " + " | ".join(f"context {c}: ms/step" for c in args.contexts) + " | ratio |")
    print("|---|" + "---|" * (len(args.contexts) + 1))
    for start in args.positions:
        if start + args.steps > min(args.contexts):
            sys.exit(f"position {start} + {args.steps} steps do not fit a context of {min(args.contexts)}")
        contexts = [natural.bare_context(lib, llm, SEQUENCES, size, args.threads) for size in args.contexts]
        try:
            for ctx, batch in contexts:
                for seq in range(SEQUENCES):
                    for at in range(0, start, 256):
                        tokens = range(at, min(start, at + 256))
                        natural.decode_rows(
                            lib, ctx, batch, [(seq, 100 + (seq + k) % 1000, k, False) for k in tokens]
                        )
            times: list[list[float]] = [[] for _ in contexts]
            for step in range(args.steps):
                for (ctx, batch), spent in zip(contexts, times, strict=True):
                    rows = [(seq, 200 + step, start + step, True) for seq in range(SEQUENCES)]
                    began = time.perf_counter()
                    natural.decode_rows(lib, ctx, batch, rows)
                    spent.append(time.perf_counter() - began)
        finally:
            for ctx, batch in contexts:
                lib.llama_batch_free(batch)
                lib.llama_free(ctx)
        medians = [statistics.median(spent) * 1000 for spent in times]
        print(
            f"| {start} | "
            + " | ".join(f"{m:.1f}" for m in medians)
            + f" | {' / '.join(f'{m / medians[0]:.2f}' for m in medians[1:])} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
