"""What a grammar costs per generated token on the embedded engine (structured outputs, tools).

One run, one machine, the packaged SmolLM2-135M-Instruct: the engine itself (no HTTP), `--streams`
concurrent sequences per round, each asking for up to `--tokens` tokens at temperature 0.7. Per constraint
it prints the median over `--rounds` rounds (alternating between the constraints, new seeds each round) of
the milliseconds between two tokens of a stream (its first token to its last, so the prompt's evaluation is
left out: the tools' description makes that prompt longer) and the ratio to free text measured in the same
run. A grammar that completes ends its answer early, so time per token is the comparable figure.

    .venv/bin/python bench/grammar_overhead.py [--tokens 96] [--streams 4] [--rounds 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tokentill.catalog import ModelSpec  # noqa: E402
from tokentill.engines import create_engine  # noqa: E402
from tokentill.engines.base import Engine, EngineRequest  # noqa: E402
from tokentill.structured.grammar import json_object_grammar, schema_grammar  # noqa: E402
from tokentill.structured.tools import constraint  # noqa: E402
from tokentill.types import Finished, Grammar, Message, ToolChoice, ToolDefinition  # noqa: E402

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "languages": {"type": "array", "items": {"type": "string"}},
        "role": {"enum": ["engineer", "artist", "teacher", "other"]},
    },
    "required": ["name", "age", "languages", "role"],
    "additionalProperties": False,
}
TOOL = ToolDefinition(
    "get_weather",
    "The weather in a city.",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)


def constraints() -> dict[str, tuple[Grammar | None, dict[str, object]]]:
    required = ToolChoice("required")
    return {
        "free text": (None, {}),
        "json_object": (Grammar(json_object_grammar()), {}),
        "json_schema": (Grammar(schema_grammar(PERSON, "s")), {}),
        "required tool": (
            constraint(None, (TOOL,), required, parallel=False),
            {"tools": (TOOL,), "tool_choice": required},
        ),
    }


async def one_round(
    engine: Engine, grammar: Grammar | None, extra: dict[str, object], streams: int, tokens: int, seed: int
) -> float:
    """The median over the streams of ms between two tokens (first token to the last: decode only)."""

    async def one(i: int) -> float:
        request = EngineRequest(
            request_id=f"b{seed}-{i}",
            messages=(Message("user", f"Invent person number {seed * 100 + i} and describe them in JSON."),),
            max_tokens=tokens,
            deadline=time.monotonic() + 600,
            temperature=0.7,
            seed=seed * 100 + i,
            grammar=grammar,
            **extra,  # type: ignore[arg-type]
        )
        first: float | None = None
        async for event in engine.generate(request):
            if first is None:
                first = time.perf_counter()
            if isinstance(event, Finished):
                assert first is not None
                return (time.perf_counter() - first) * 1000 / max(1, event.usage.completion_tokens - 1)
        raise AssertionError("no Finished")

    return statistics.median(await asyncio.gather(*(one(i) for i in range(streams))))


async def main(args: argparse.Namespace) -> None:
    spec = ModelSpec(id="bench", engine="llamacpp", context=1024, n_threads=args.threads)
    engine = create_engine(spec, queue_size=64, n_threads=None, max_parallel=args.streams)
    await engine.start()
    results: dict[str, list[float]] = {}
    try:
        for round_ in range(args.rounds):
            for name, (grammar, extra) in constraints().items():
                ms = await one_round(engine, grammar, extra, args.streams, args.tokens, round_ + 1)
                results.setdefault(name, []).append(ms)
    finally:
        await engine.aclose()
    base = statistics.median(results["free text"])
    print(
        f"{args.streams} concurrent streams, up to {args.tokens} tokens, {args.threads} threads, "
        f"{args.rounds} rounds"
    )
    for name, values in results.items():
        ms = statistics.median(values)
        print(f"  {name:<14} {ms:7.2f} ms/token   ×{ms / base:.2f} of free text")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    asyncio.run(main(parser.parse_args()))
