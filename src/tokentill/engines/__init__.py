"""Engines: what turns an `EngineRequest` into text. The interface is in `base.py`.

Implementations are chosen by the catalogue's `engine` name and imported only when configured, so
llama.cpp (and its native library) loads only for `llamacpp` models.
"""

from __future__ import annotations

import importlib
from typing import cast

from tokentill.catalog import ModelSpec
from tokentill.engines.base import Engine

__all__ = ["ENGINES", "create_engine"]

ENGINES: dict[str, str] = {
    "llamacpp": "tokentill.engines.llamacpp:LlamaCppEngine",
    "echo": "tokentill.engines.echo:EchoEngine",
    "upstream": "tokentill.engines.upstream:UpstreamEngine",
}


def create_engine(
    spec: ModelSpec,
    *,
    queue_size: int,
    n_threads: int | None,
    max_parallel: int | None = None,
    adapt_threads: bool = True,
) -> Engine:
    """Construct (not start) the engine for `spec`; `await engine.start()` loads it.

    `queue_size` bounds the requests waiting for the model (a full queue answers 503); `n_threads` is the
    default CPU thread count and `max_parallel` the default number of sequences decoded together
    (`llamacpp` only) when the catalogue entry sets none; `adapt_threads` lets `llamacpp` decode with
    fewer threads than that when fewer are faster (a busy machine).
    """
    try:
        target = ENGINES[spec.engine]
    except KeyError:
        raise ValueError(f"unknown engine {spec.engine!r} for model {spec.id!r}") from None
    module_name, _, class_name = target.partition(":")
    engine_class = getattr(importlib.import_module(module_name), class_name)
    extra: dict[str, object] = {}
    if spec.engine == "llamacpp":
        extra = {"max_parallel": max_parallel, "adapt_threads": adapt_threads}
    return cast(Engine, engine_class(spec, queue_size=queue_size, n_threads=n_threads, **extra))
