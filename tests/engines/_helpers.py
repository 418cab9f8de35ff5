"""Shared by the engine tests: run one generation to its end."""

from __future__ import annotations

import asyncio

from tests._services import require
from tokentill.catalog import ModelSpec
from tokentill.engines import create_engine
from tokentill.engines.base import Engine, EngineRequest
from tokentill.engines.llamacpp import LlamaCppEngine
from tokentill.types import Finished, TextDelta


async def collect_text(engine: Engine, request: EngineRequest) -> tuple[str, Finished]:
    """The joined text of every delta, and the final event; fails if the engine never finishes."""
    parts: list[str] = []
    async for event in engine.generate(request):
        if isinstance(event, TextDelta):
            parts.append(event.text)
        else:
            return "".join(parts), event
    raise AssertionError("no Finished event")


def new_llama_engine(*, parallel: int, queue_size: int = 32, context: int = 1024) -> LlamaCppEngine:
    """A started engine on the packaged SmolLM2 weights, one thread (the tests share 2 cores)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the machine
        require("llama.cpp", f"llama-cpp-python is not importable: {exc}")
    spec = ModelSpec(id="smol", engine="llamacpp", context=context, n_threads=1)
    engine = create_engine(spec, queue_size=queue_size, n_threads=None, max_parallel=parallel)
    assert isinstance(engine, LlamaCppEngine)
    asyncio.run(engine.start())
    return engine
