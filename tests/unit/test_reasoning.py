"""Reasoning wrappers over the deterministic echo engine: passes, budgets and usage arithmetic."""

from __future__ import annotations

import time

import pytest

from tests._services import run
from tokentill.catalog import ModelSpec
from tokentill.engines.base import EngineEvent, EngineRequest, Finished, Message, TextDelta
from tokentill.engines.echo import EchoEngine
from tokentill.reasoning import EFFORT_BUDGETS, NativeThinking, Scratchpad, ThinkSplitter, with_reasoning


def _request(text: str, max_tokens: int, effort: str = "medium") -> EngineRequest:
    return EngineRequest(
        request_id="r1",
        messages=(Message(role="user", text=text),),
        max_tokens=max_tokens,
        deadline=time.monotonic() + 30,
        reasoning_effort=effort,
    )


def _collect(engine: object, request: EngineRequest) -> list[EngineEvent]:
    async def main() -> list[EngineEvent]:
        return [e async for e in engine.generate(request)]  # type: ignore[attr-defined]

    return run(main())


def _echo() -> EchoEngine:
    return EchoEngine(ModelSpec(id="echo", engine="echo", context=4096))


def test_scratchpad_hides_reasoning_and_bills_both_passes() -> None:
    engine = Scratchpad(_echo())
    request = _request("alpha beta gamma", max_tokens=500)
    events = _collect(engine, request)
    finished = events[-1]
    assert isinstance(finished, Finished)
    hidden = [e for e in events if isinstance(e, TextDelta) and e.reasoning]
    visible = [e for e in events if isinstance(e, TextDelta) and not e.reasoning]
    assert hidden and visible
    usage = finished.usage
    assert usage.reasoning_tokens == sum(e.tokens for e in hidden) > 0
    assert usage.completion_tokens == usage.reasoning_tokens + sum(e.tokens for e in visible)
    assert usage.prompt_tokens == engine.count_prompt_tokens(request)  # what the hold was priced on
    assert "".join(e.text for e in visible).strip() == "alpha beta gamma"


def test_scratchpad_budget_by_effort_and_exhaustion() -> None:
    engine = Scratchpad(_echo())
    long_text = " ".join(f"w{i}" for i in range(1000))
    for effort, budget in EFFORT_BUDGETS.items():
        usage = _collect(engine, _request(long_text, 5000, effort))[-1]
        assert isinstance(usage, Finished)
        assert usage.usage.reasoning_tokens == budget
    # Reasoning eats the whole budget: empty answer, finish_reason "length" (o1's behaviour).
    events = _collect(engine, _request(long_text, 10))
    assert not [e for e in events if isinstance(e, TextDelta) and not e.reasoning]
    last = events[-1]
    assert isinstance(last, Finished) and last.finish_reason == "length"
    assert last.usage.completion_tokens == last.usage.reasoning_tokens == 10


@pytest.mark.parametrize(
    ("chunks", "hidden", "shown"),
    [
        (["<think>plan</think>answer"], "plan", "answer"),
        (["<thi", "nk>pl", "an</th", "ink>ans", "wer"], "plan", "answer"),
        (["no tags at all"], "", "no tags at all"),
        (["a < b and <thin", "g>"], "", "a < b and <thing>"),
        (["<think>unfinished"], "unfinished", ""),
    ],
)
def test_think_splitter(chunks: list[str], hidden: str, shown: str) -> None:
    splitter = ThinkSplitter()
    parts = [p for c in chunks for p in splitter.feed(c)] + splitter.flush()
    assert "".join(t for h, t in parts if h) == hidden
    assert "".join(t for h, t in parts if not h) == shown


def test_native_thinking_over_echo() -> None:
    engine = NativeThinking(_echo())
    events = _collect(engine, _request("<think> plan it </think> the answer", 100))
    finished = events[-1]
    assert isinstance(finished, Finished)
    shown = "".join(e.text for e in events if isinstance(e, TextDelta) and not e.reasoning)
    assert "think" not in shown and "answer" in shown
    assert finished.usage.reasoning_tokens >= 2


def test_with_reasoning_none_is_identity() -> None:
    echo = _echo()
    assert with_reasoning(echo, "none") is echo
