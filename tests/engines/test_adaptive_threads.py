"""The thread tuner is wired into the llama.cpp decode loop (real model; the tuner's decisions themselves
are tested with made-up timings in test_thread_tuner.py, so nothing here depends on this machine's speed).
"""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Any

import pytest

from tests._services import require
from tests.engines._helpers import collect_text
from tokentill.catalog import ModelSpec
from tokentill.engines import create_engine, llamacpp
from tokentill.engines.base import EngineRequest
from tokentill.engines.llamacpp import LlamaCppEngine
from tokentill.engines.threads import ThreadTuner
from tokentill.types import Message

pytestmark = pytest.mark.llama


def _generate(adapt: bool) -> str:
    """A 24-token greedy completion from an engine allowed 2 threads (which reports its count)."""
    spec = ModelSpec(id="smol", engine="llamacpp", context=512, n_threads=2)
    engine = create_engine(spec, queue_size=2, n_threads=None, max_parallel=2, adapt_threads=adapt)
    assert isinstance(engine, LlamaCppEngine)
    request = EngineRequest(
        request_id=f"adapt-{adapt}",
        messages=(Message("user", "Count from 1 to 200, separated by commas."),),
        max_tokens=24,
        deadline=time.monotonic() + 120,
        temperature=0.0,
    )

    async def run() -> str:
        await engine.start()
        try:
            text, _ = await collect_text(engine, request)
            health = engine.health()
            assert health.threads in (1, 2)
            return text
        finally:
            await engine.aclose()

    return asyncio.run(run())


def test_the_decode_loop_probes_thread_counts_and_outputs_do_not_change(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    try:
        import llama_cpp
    except ImportError as exc:  # pragma: no cover - depends on the machine
        require("llama.cpp", f"llama-cpp-python is not importable: {exc}")
    fixed = _generate(adapt=False)
    calls: list[tuple[int, int]] = []
    real = llama_cpp.llama_set_n_threads

    def spy(ctx: Any, n_threads: int, n_threads_batch: int) -> None:
        calls.append((n_threads, n_threads_batch))
        real(ctx, n_threads, n_threads_batch)

    monkeypatch.setattr(llama_cpp, "llama_set_n_threads", spy)
    # probe at once and without pause, so that a short completion alternates 1 and 2 threads
    eager = functools.partial(ThreadTuner, first_probe_s=0.0, max_interval_s=0.0)
    monkeypatch.setattr(llamacpp, "ThreadTuner", eager)
    adaptive = _generate(adapt=True)
    assert (1, 1) in calls and (2, 2) in calls  # both counts, the batch count set alike
    assert adaptive == fixed  # ggml gives each output element to one thread: same logits, same text


def test_a_fixed_count_is_never_changed(monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        import llama_cpp
    except ImportError as exc:  # pragma: no cover - depends on the machine
        require("llama.cpp", f"llama-cpp-python is not importable: {exc}")
    calls: list[object] = []
    monkeypatch.setattr(llama_cpp, "llama_set_n_threads", lambda *args: calls.append(args))
    monkeypatch.setattr(
        llamacpp, "ThreadTuner", functools.partial(ThreadTuner, first_probe_s=0.0, max_interval_s=0.0)
    )
    _generate(adapt=False)
    assert calls == []
