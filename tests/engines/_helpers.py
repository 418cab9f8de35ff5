"""Shared by the engine tests: run one generation to its end."""

from __future__ import annotations

from tokentill.engines.base import Engine, EngineRequest, Finished, TextDelta


async def collect_text(engine: Engine, request: EngineRequest) -> tuple[str, Finished]:
    """The joined text of every delta, and the final event; fails if the engine never finishes."""
    parts: list[str] = []
    async for event in engine.generate(request):
        if isinstance(event, TextDelta):
            parts.append(event.text)
        else:
            return "".join(parts), event
    raise AssertionError("no Finished event")
