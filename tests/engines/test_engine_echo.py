"""The echo engine and the lazy engine factory."""

from __future__ import annotations

import asyncio
import sys
import time

import pytest

from tokentill.catalog import ModelSpec
from tokentill.engines import create_engine
from tokentill.engines.base import Engine, EngineRequest
from tokentill.engines.echo import EchoEngine
from tokentill.errors import DeadlineExceeded, InvalidRequest
from tokentill.types import Finished, Message, TextDelta


def _request(text: str, **kwargs: object) -> EngineRequest:
    fields: dict[str, object] = {
        "request_id": "echo-1",
        "messages": (Message("system", "be brief"), Message("user", text)),
        "max_tokens": 100,
        "deadline": time.monotonic() + 30,
    }
    fields.update(kwargs)
    return EngineRequest(**fields)  # type: ignore[arg-type]


async def _collect(engine: Engine, request: EngineRequest) -> tuple[list[str], Finished]:
    deltas: list[str] = []
    async for event in engine.generate(request):
        if isinstance(event, TextDelta):
            deltas.append(event.text)
        else:
            return deltas, event
    raise AssertionError("no Finished event")


def _engine(context: int = 8192) -> EchoEngine:
    return EchoEngine(ModelSpec(id="echo", engine="echo", context=context), queue_size=0, n_threads=None)


def test_factory_imports_lazily() -> None:
    sys.modules.pop("tokentill.engines.echo", None)
    engine = create_engine(ModelSpec(id="echo", engine="echo"), queue_size=2, n_threads=None)
    assert isinstance(engine, Engine)
    assert type(engine).__name__ == "EchoEngine"
    assert engine.capabilities.context_length == 8192


def test_echoes_last_user_message_word_by_word() -> None:
    engine = _engine()
    deltas, finished = asyncio.run(_collect(engine, _request("hello big  world")))
    assert deltas == ["hello", " big", " world"]
    assert finished.finish_reason == "stop"
    assert (
        finished.usage.prompt_tokens
        == engine.count_prompt_tokens(_request("hello big  world"))
        == 2 + 3 + 3 + 3
    )
    assert finished.usage.completion_tokens == 3


def test_max_tokens_gives_length() -> None:
    deltas, finished = asyncio.run(_collect(_engine(), _request("a b c d", max_tokens=2)))
    assert "".join(deltas) == "a b"
    assert finished.finish_reason == "length" and finished.usage.completion_tokens == 2


def test_stop_string_is_not_emitted() -> None:
    deltas, finished = asyncio.run(_collect(_engine(), _request("one two three four", stop=("thr",))))
    assert "".join(deltas) == "one two "
    assert finished.finish_reason == "stop"
    assert finished.usage.completion_tokens == 3


def test_deadline() -> None:
    with pytest.raises(DeadlineExceeded):
        asyncio.run(_collect(_engine(), _request("a b", deadline=time.monotonic() - 1)))


def test_context_length_exceeded() -> None:
    with pytest.raises(InvalidRequest) as info:
        asyncio.run(_collect(_engine(context=256), _request("word " * 300)))
    assert info.value.code == "context_length_exceeded" and info.value.param == "messages"
    assert "maximum context length is 256 tokens" in info.value.message


def test_engines_satisfy_the_protocol_statically() -> None:
    # mypy checks these assignments; at runtime they only need to exist.
    from tokentill.engines.llamacpp import LlamaCppEngine

    engines: list[type[Engine]] = [EchoEngine, LlamaCppEngine]
    assert all(hasattr(cls, "generate") for cls in engines)
