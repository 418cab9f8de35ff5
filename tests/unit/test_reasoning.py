"""Reasoning wrappers over the deterministic echo engine: passes, budgets and usage arithmetic."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import replace

import pytest

from tests._services import run
from tokentill.catalog import ModelSpec
from tokentill.engines.base import Capabilities, EngineRequest
from tokentill.engines.echo import EchoEngine
from tokentill.engines.reasoning import (
    EFFORT_BUDGETS,
    NativeThinking,
    Scratchpad,
    ThinkSplitter,
    with_reasoning,
)
from tokentill.errors import DeadlineExceeded
from tokentill.types import EngineEvent, Finished, Message, TextDelta, Usage


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


def _native_echo() -> NativeThinking:
    return NativeThinking(EchoEngine(ModelSpec(id="r1", engine="echo", context=4096, reasoning="native")))


def _split(events: list[EngineEvent]) -> tuple[str, str, Finished]:
    hidden = "".join(e.text for e in events if isinstance(e, TextDelta) and e.reasoning)
    shown = "".join(e.text for e in events if isinstance(e, TextDelta) and not e.reasoning)
    finished = events[-1]
    assert isinstance(finished, Finished)
    return hidden, shown, finished


def test_native_prefilled_think_does_not_leak() -> None:
    """A template that pre-fills `<think>` (here: the echo engine's trailing assistant turn): the output
    starts inside the block, so the reasoning and the bare `</think>` never reach the answer."""
    request = replace(
        _request("plan the reply </think> answer", 100),
        messages=(Message("user", "plan the reply </think> answer"), Message("assistant", "<think>\n")),
    )
    hidden, shown, finished = _split(_collect(_native_echo(), request))
    assert hidden == "plan the reply "
    assert shown == " answer"
    assert finished.usage.reasoning_tokens == 4  # plan, the, reply and the tag
    assert finished.usage.completion_tokens == 5


def test_native_stop_strings_apply_to_the_answer_only() -> None:
    request = replace(_request("<think> stop here? </think> the answer stop there", 100), stop=("stop",))
    hidden, shown, finished = _split(_collect(_native_echo(), request))
    assert hidden == " stop here? "
    assert shown == " the answer "
    assert finished.finish_reason == "stop"
    assert finished.usage.completion_tokens == 7  # every word up to the stop string


class _Scripted:
    """An inner engine that plays one scripted list of events per call and records the requests."""

    def __init__(self, *passes: list[EngineEvent]) -> None:
        self.capabilities = Capabilities(context_length=4096, exact_prompt_tokens=False)
        self._passes = list(passes)
        self.requests: list[EngineRequest] = []

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    def count_prompt_tokens(self, request: EngineRequest) -> int:
        return 10

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineEvent]:
        self.requests.append(request)
        for event in self._passes.pop(0):
            yield event


def test_scratchpad_keeps_an_upstreams_answer_pass_reasoning_hidden() -> None:
    """Over an upstream that reasons by itself, its reasoning in the answer pass stays hidden and billed."""
    inner = _Scripted(
        [TextDelta("notes"), Finished("stop", Usage(prompt_tokens=10, completion_tokens=1))],
        [
            TextDelta("more thought", reasoning=True, tokens=2),
            TextDelta("answer"),
            Finished("stop", Usage(prompt_tokens=30, completion_tokens=3, reasoning_tokens=2)),
        ],
    )
    events = _collect(Scratchpad(inner), _request("question", 100))
    hidden, shown, finished = _split(events)
    assert hidden == "notesmore thought" and shown == "answer"
    assert finished.usage.completion_tokens == 4
    assert finished.usage.reasoning_tokens == 3
    assert finished.usage.prompt_tokens == 10  # the first pass's, what the hold was priced on


class _WideSystemEcho(EchoEngine):
    """An echo engine whose "template" adds 40 tokens to any system message (as real templates can),
    so the answer pass's prompt with the notes is longer than the first pass's."""

    def count_prompt_tokens(self, request: EngineRequest) -> int:
        extra = sum(40 for m in request.messages if m.role == "system")
        return super().count_prompt_tokens(request) + extra

    seen: list[tuple[int, int]] = []

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineEvent]:
        self.seen.append((self.count_prompt_tokens(request), request.max_tokens))
        async for event in super().generate(request):
            yield event


def test_scratchpad_answer_pass_fits_the_context() -> None:
    """The notes are shortened so the answer prompt plus what is left of the budget fits the context."""
    context = 256
    inner = _WideSystemEcho(ModelSpec(id="echo", engine="echo", context=context))
    inner.seen = []
    engine = Scratchpad(inner)
    text = " ".join(f"w{i}" for i in range(30))
    request = _request(text, 1)
    budget = context - engine.count_prompt_tokens(request)  # what prepare allows: the whole room
    events = _collect(engine, replace(request, max_tokens=budget, reasoning_effort="low"))
    _, shown, finished = _split(events)
    (_, _), (answer_prompt, answer_budget) = inner.seen
    assert answer_prompt + answer_budget <= context
    assert answer_budget == budget - finished.usage.reasoning_tokens  # the answer kept its whole budget
    assert shown  # the answer pass ran


class _FirstPassOutlivesTheDeadline(EchoEngine):
    """Echo whose reasoning pass ends only after the request's deadline, so the answer pass times out."""

    async def generate(self, request: EngineRequest) -> AsyncGenerator[EngineEvent, None]:
        async for event in super().generate(request):
            if isinstance(event, Finished) and not request.continuation:
                await asyncio.sleep(max(0.0, request.deadline - time.monotonic()) + 0.01)
            yield event


def test_scratchpad_deadline_message_counts_both_passes() -> None:
    engine = Scratchpad(_FirstPassOutlivesTheDeadline(ModelSpec(id="echo", engine="echo", context=4096)))
    now = time.monotonic()
    request = replace(_request("alpha beta", max_tokens=500), started=now, deadline=now + 0.3)
    with pytest.raises(DeadlineExceeded, match=r"^The request timed out after 0\.3 seconds\.$"):
        _collect(engine, request)


class _Endless:
    """An engine that never finishes a pass on its own (after `finishes` passes that do), and records the
    moment its generator is closed."""

    capabilities = Capabilities(context_length=4096)

    def __init__(self, finishes: int = 0) -> None:
        self.finishes = finishes
        self.closed = 0

    def count_prompt_tokens(self, request: EngineRequest) -> int:
        return 1

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineEvent]:
        try:
            if self.finishes:
                self.finishes -= 1
                yield TextDelta("notes")
                yield Finished("stop", Usage(prompt_tokens=1, completion_tokens=1))
                return
            while True:
                yield TextDelta("more")
        finally:
            self.closed += 1


@pytest.mark.parametrize(
    ("wrapper", "finishes", "read"),
    [(NativeThinking, 0, 2), (Scratchpad, 0, 2), (Scratchpad, 1, 4)],
    ids=["native", "scratchpad-thinking-pass", "scratchpad-answer-pass"],
)
def test_leaving_early_closes_the_engine_at_once(wrapper: type, finishes: int, read: int) -> None:
    """A client that leaves closes the wrapper's generator; the engine's generator is closed right then,
    not whenever the garbage collector's finalizer task gets round to it (the decode would run on)."""
    inner = _Endless(finishes)

    async def main() -> int:
        events = wrapper(inner).generate(_request("question", 100))
        for _ in range(read):
            await events.__anext__()
        await events.aclose()
        return inner.closed  # read before anything else runs on the loop

    assert run(main()) == finishes + 1
