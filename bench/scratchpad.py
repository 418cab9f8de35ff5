"""Scratchpad reasoning: the answer pass continuing the notes' KV sequence against re-reading them.

One run, one machine, the packaged SmolLM2-135M-Instruct, the engine itself (no HTTP): `--streams`
concurrent scratchpad requests (`reasoning_effort` low: 64 notes tokens, then `--answer` answer tokens),
half with a long system prompt, half short. The model's end tokens are banned with `logit_bias`, so every
request decodes exactly the same number of tokens in both modes and only the prompt work differs:

  continue:   the answer pass continues the notes' sequence (`Capabilities.follow_up`, the default);
  re-prefill: the answer pass is a request of its own, its prompt (messages + notes) evaluated anew (what
              the engine did before, and still does for engines without the capability).

Rounds alternate between the two modes (every prompt starts with its own tag, so no request reuses
another's cached prefix). Per mode it prints the medians over rounds of: aggregate completion tok/s
(reasoning included, all tokens / wall time from the first request to the last answer), per-request
latency p50, time to the first visible (answer) token p50, and prompt tokens evaluated per request; then
the ratios continue / re-prefill of those medians, and the median of the per-round ratios (each round
pair ran back to back, which matters on a machine whose speed drifts).

    .venv/bin/python bench/scratchpad.py [--streams 8] [--answer 128] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tokentill.catalog import ModelSpec  # noqa: E402
from tokentill.engines import create_engine  # noqa: E402
from tokentill.engines.base import EngineRequest  # noqa: E402
from tokentill.engines.llamacpp import LlamaCppEngine  # noqa: E402
from tokentill.engines.reasoning import EFFORT_BUDGETS, Scratchpad  # noqa: E402
from tokentill.types import Finished, Message, TextDelta  # noqa: E402

SYSTEM = (
    "You are the assistant of a small bakery. It opens at 7 and closes at 19 every day but Monday, sells "
    "sourdough, rye and white bread, croissants, fruit tarts and birthday cakes to order, delivers within "
    "5 km for orders over 30 euros, and takes orders by phone until 17 the day before. Be brief and kind. "
) * 3
TOPICS = [
    "a birthday cake",
    "rye bread",
    "delivery",
    "croissants",
    "opening hours",
    "a tart",
    "gluten",
    "prices",
]


def end_tokens(engine: LlamaCppEngine) -> list[int]:
    import llama_cpp

    lib: Any = llama_cpp
    vocab = lib.llama_model_get_vocab(engine._llm.model)  # the bench may look inside
    return [t for t in range(lib.llama_vocab_n_tokens(vocab)) if lib.llama_vocab_is_eog(vocab, t)]


@dataclasses.dataclass
class Outcome:
    latency: float
    first_visible: float
    tokens: int
    evaluated: int


async def one(
    engine: LlamaCppEngine, scratchpad: Scratchpad, request: EngineRequest, follow: bool
) -> Outcome:
    started = time.monotonic()
    first_visible = 0.0
    finished: Finished | None = None
    async for event in scratchpad.generate(request):
        if isinstance(event, TextDelta) and not event.reasoning and not first_visible:
            first_visible = time.monotonic() - started
        elif isinstance(event, Finished):
            finished = event
    assert finished is not None
    usage = finished.usage
    recorded = engine.prompt_tokens_evaluated(request.request_id) or 0
    # Both passes share the request id: with a follow-up the record covers both, otherwise only the
    # answer pass's own request (the first pass evaluated its prompt minus the cached part).
    evaluated = recorded if follow else recorded + usage.prompt_tokens - usage.cached_tokens
    return Outcome(time.monotonic() - started, first_visible, usage.completion_tokens, evaluated)


async def round_(
    engine: LlamaCppEngine, follow: bool, streams: int, answer: int, index: int, banned: list[int]
) -> dict[str, float]:
    engine.capabilities = dataclasses.replace(engine.capabilities, follow_up=follow)
    scratchpad = Scratchpad(engine)
    requests = []
    for i in range(streams):
        topic = TOPICS[i % len(TOPICS)]
        # A tag first, so no request reuses another's cached prefix: only the answer pass's work differs.
        system = f"Session {index}-{i}-{int(follow)}. " + (SYSTEM if i % 2 else "Be brief and kind.")
        messages = (Message("system", system), Message("user", f"Tell me about {topic}."))
        requests.append(
            EngineRequest(
                request_id=f"r{index}-{i}-{follow}",
                messages=messages,
                max_tokens=EFFORT_BUDGETS["low"] + answer,
                deadline=time.monotonic() + 600,
                temperature=0.0,
                reasoning_effort="low",
                logit_bias=tuple((t, -100.0) for t in banned),
            )
        )
    started = time.monotonic()
    outcomes = await asyncio.gather(*(one(engine, scratchpad, r, follow) for r in requests))
    wall = time.monotonic() - started
    expected = EFFORT_BUDGETS["low"] + answer
    assert all(o.tokens == expected for o in outcomes), [o.tokens for o in outcomes]
    return {
        "tok/s": sum(o.tokens for o in outcomes) / wall,
        "latency p50 s": statistics.median(o.latency for o in outcomes),
        "first visible p50 s": statistics.median(o.first_visible for o in outcomes),
        "evaluated/request": statistics.mean(o.evaluated for o in outcomes),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--answer", type=int, default=128, help="answer tokens after 64 notes tokens")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    spec = ModelSpec(id="smol", engine="llamacpp", context=1024, n_threads=args.threads)
    engine = create_engine(spec, queue_size=64, n_threads=None, max_parallel=args.streams)
    assert isinstance(engine, LlamaCppEngine)
    asyncio.run(engine.start())
    banned = end_tokens(engine)
    print(f"load average before: {os.getloadavg()}", flush=True)
    results: dict[str, list[dict[str, float]]] = {"continue": [], "re-prefill": []}
    try:
        asyncio.run(round_(engine, True, args.streams, 8, -1, banned))  # warm-up, not counted
        for index in range(args.rounds):
            for name, follow in (("continue", True), ("re-prefill", False))[:: 1 if index % 2 == 0 else -1]:
                figures = asyncio.run(round_(engine, follow, args.streams, args.answer, index, banned))
                results[name].append(figures)
                print(f"round {index} {name:10s} " + "  ".join(f"{k} {v:.2f}" for k, v in figures.items()))
    finally:
        asyncio.run(engine.aclose())
    print(f"load average after: {os.getloadavg()}")
    medians = {
        name: {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
        for name, rounds in results.items()
    }
    print(f"\n{args.streams} scratchpad requests, 64 notes + {args.answer} answer tokens each, medians:")
    for name, figures in medians.items():
        print(f"  {name:10s} " + "  ".join(f"{k} {v:.2f}" for k, v in figures.items()))
    ratios = {key: medians["continue"][key] / medians["re-prefill"][key] for key in medians["continue"]}
    print("  ratio continue / re-prefill: " + "  ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    pairs = list(zip(results["continue"], results["re-prefill"], strict=True))
    paired = {key: statistics.median(c[key] / r[key] for c, r in pairs) for key in medians["continue"]}
    print("  median of per-round ratios:  " + "  ".join(f"{k} {v:.3f}" for k, v in paired.items()))


if __name__ == "__main__":
    main()
