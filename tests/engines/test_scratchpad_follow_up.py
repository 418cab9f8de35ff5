"""The scratchpad's answer pass continues the notes' KV sequence on the llama.cpp engine (packaged SmolLM2).

`LlamaCppEngine.prompt_tokens_evaluated` counts what the runner really evaluated as prompt, so these tests
see that the first prompt and the notes are not read again, and compare with the re-prefill path (the same
engine with `follow_up` switched off, which is what an engine without the capability gets).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.engines._helpers import new_llama_engine
from tokentill.engines.base import EngineRequest
from tokentill.engines.llamacpp import LlamaCppEngine
from tokentill.engines.reasoning import _THINK_INSTRUCTION, Scratchpad
from tokentill.types import Finished, Message, TextDelta

pytestmark = pytest.mark.llama

CONTEXT = 1024
LONG = "Count from 1 to 200, separated by commas."  # SmolLM2 keeps going until max_tokens
SYSTEM = (
    "You are a careful assistant for a bakery. The bakery opens at 7, closes at 19, sells bread, "
    "croissants and cakes, and takes orders by phone. Answer briefly and politely. " * 3
)
ANSWER_PROMPT_MAX = 40  # the template's end of turn, the answer instruction and the assistant header


@pytest.fixture(scope="module")
def engine() -> Iterator[LlamaCppEngine]:
    engine = new_llama_engine(parallel=4, context=CONTEXT)
    yield engine
    asyncio.run(engine.aclose())


@dataclasses.dataclass
class _Result:
    notes: str
    answer: str
    finished: Finished
    hidden_tokens: int
    shown_tokens: int


def _request(text: str, request_id: str, **kwargs: object) -> EngineRequest:
    fields: dict[str, object] = {
        "request_id": request_id,
        "messages": (Message("system", SYSTEM), Message("user", text)),
        "max_tokens": 96,
        "deadline": time.monotonic() + 300,
        "temperature": 0.0,
        "reasoning_effort": "low",
    }
    fields.update(kwargs)
    return EngineRequest(**fields)  # type: ignore[arg-type]


async def _collect(engine: Scratchpad, request: EngineRequest) -> _Result:
    notes: list[str] = []
    answer: list[str] = []
    hidden = shown = 0
    async for event in engine.generate(request):
        if isinstance(event, TextDelta):
            (notes if event.reasoning else answer).append(event.text)
            hidden += event.tokens if event.reasoning else 0
            shown += 0 if event.reasoning else event.tokens
        elif isinstance(event, Finished):
            return _Result("".join(notes), "".join(answer), event, hidden, shown)
    raise AssertionError("no Finished event")


def _scratchpad(engine: LlamaCppEngine, *, follow_up: bool) -> Scratchpad:
    """The engine with or without the capability (without: the answer pass is a request of its own)."""
    engine.capabilities = dataclasses.replace(engine.capabilities, follow_up=follow_up)
    return Scratchpad(engine)


@pytest.fixture(autouse=True)
def _restore(engine: LlamaCppEngine) -> Iterator[None]:
    yield
    engine.capabilities = dataclasses.replace(engine.capabilities, follow_up=True)


def test_the_answer_pass_evaluates_only_its_own_prompt(engine: LlamaCppEngine) -> None:
    scratchpad = _scratchpad(engine, follow_up=True)
    request = _request("Which cake would you bake for a birthday, and why?", "kv-1")
    result = asyncio.run(_collect(scratchpad, request))
    usage = result.finished.usage
    assert result.notes and result.answer
    evaluated = engine.prompt_tokens_evaluated("kv-1")
    assert evaluated is not None
    answer_prompt = evaluated - (usage.prompt_tokens - usage.cached_tokens)
    # Neither the prompt (> 150 tokens) nor the notes are evaluated again: only the answer's own prompt.
    assert usage.prompt_tokens > 150 and usage.reasoning_tokens > 10
    assert 0 < answer_prompt <= ANSWER_PROMPT_MAX, answer_prompt

    # The same request through the re-prefill path evaluates the answer prompt (messages and notes) anew.
    rescratch = _scratchpad(engine, follow_up=False)
    again = asyncio.run(_collect(rescratch, dataclasses.replace(request, request_id="kv-2")))
    answer_pass = engine.prompt_tokens_evaluated("kv-2")  # the answer pass's own request, reported last
    assert answer_pass is not None and answer_pass > again.finished.usage.reasoning_tokens > 10


def test_billing_is_exact_and_the_notes_stay_hidden(engine: LlamaCppEngine) -> None:
    scratchpad = _scratchpad(engine, follow_up=True)
    request = _request("Name two breads the bakery sells.", "bill-1", max_tokens=80)
    result = asyncio.run(_collect(scratchpad, request))
    usage = result.finished.usage
    assert usage.prompt_tokens == scratchpad.count_prompt_tokens(request)  # what the hold was priced on
    assert usage.reasoning_tokens == result.hidden_tokens > 0
    assert usage.completion_tokens == result.hidden_tokens + result.shown_tokens
    assert usage.completion_tokens == engine.tokens_decoded("bill-1")  # every sampled token, both passes
    assert usage.completion_tokens <= request.max_tokens
    assert usage.cached_tokens <= usage.prompt_tokens


def test_the_reasoning_instruction_is_a_prefix_served_from_the_cache(engine: LlamaCppEngine) -> None:
    """The instruction opens the conversation, so a second request with another question (no system
    message of its own) evaluates none of it again: its cached tokens cover the template's opening and
    the instruction, and only its own question is evaluated (docs/performance.md, "Engine, fourth pass")."""
    scratchpad = _scratchpad(engine, follow_up=True)
    questions = ("Is rye bread healthy?", "How do croissants get their layers?")
    first, second = (
        asyncio.run(
            _collect(
                scratchpad,
                _request(q, f"prefix-{i}", messages=(Message("user", q),), max_tokens=8),
            )
        ).finished.usage
        for i, q in enumerate(questions)
    )
    instruction = engine.count_prompt_tokens(
        _request("", "x", messages=(Message("system", _THINK_INSTRUCTION),))
    )
    assert second.cached_tokens >= instruction - 8 > 20  # all but the template's end of that turn
    assert second.prompt_tokens - second.cached_tokens < first.prompt_tokens - instruction + 8


def test_reasoning_that_uses_the_whole_budget_leaves_no_answer(engine: LlamaCppEngine) -> None:
    scratchpad = _scratchpad(engine, follow_up=True)
    request = _request(LONG, "spent-1", max_tokens=8)  # less than the low effort budget (64)
    result = asyncio.run(_collect(scratchpad, request))
    assert result.finished.finish_reason == "length" and result.answer == ""
    assert result.finished.usage.reasoning_tokens == result.finished.usage.completion_tokens == 8
    assert engine.tokens_decoded("spent-1") == 8  # no answer pass was started


def test_greedy_alone_equals_in_a_batch(engine: LlamaCppEngine) -> None:
    scratchpad = _scratchpad(engine, follow_up=True)
    questions = ["What is a croissant?", "When does the bakery open?", LONG, "Is bread healthy?"]
    requests = [_request(q, f"inv-{i}", max_tokens=72) for i, q in enumerate(questions)]

    async def alone() -> list[_Result]:
        return [await _collect(scratchpad, r) for r in requests]

    async def together() -> list[_Result]:
        return list(await asyncio.gather(*(_collect(scratchpad, r) for r in requests)))

    expected = asyncio.run(alone())
    for got, want in zip(asyncio.run(together()), expected, strict=True):
        assert (got.notes, got.answer) == (want.notes, want.answer)
        assert got.finished.usage.completion_tokens == want.finished.usage.completion_tokens


def test_the_answer_keeps_its_budget_when_the_context_is_full(engine: LlamaCppEngine) -> None:
    """Prompt + whole budget fill the context: the notes' end gives way to the answer's prompt."""
    scratchpad = _scratchpad(engine, follow_up=True)
    # End tokens banned: the notes fill their budget (64) and the answer runs to the end of its own.
    banned = tuple((token, -100.0) for token in _end_tokens())
    probe = _request("Which cake would you bake for a birthday, and why?", "full-0", logit_bias=banned)
    budget = CONTEXT - scratchpad.count_prompt_tokens(probe)  # what the service allows: all the room
    request = dataclasses.replace(probe, request_id="full-1", max_tokens=budget)
    result = asyncio.run(_collect(scratchpad, request))
    usage = result.finished.usage
    assert result.finished.finish_reason == "length" and result.answer
    assert usage.completion_tokens == budget  # the answer ran to the end of its budget
    evaluated = engine.prompt_tokens_evaluated("full-1")
    assert evaluated is not None
    assert evaluated - (usage.prompt_tokens - usage.cached_tokens) <= ANSWER_PROMPT_MAX  # still in place


def _end_tokens() -> list[int]:
    """The model's end-of-generation token ids."""
    import llama_cpp

    from tokentill.catalog import default_weights_path

    lib: Any = llama_cpp
    llm = llama_cpp.Llama(model_path=str(default_weights_path()), vocab_only=True, verbose=False)
    try:
        vocab = lib.llama_model_get_vocab(llm.model)
        return [t for t in range(lib.llama_vocab_n_tokens(vocab)) if lib.llama_vocab_is_eog(vocab, t)]
    finally:
        llm.close()


def test_leaving_during_the_answer_frees_the_slot(engine: LlamaCppEngine) -> None:
    scratchpad = _scratchpad(engine, follow_up=True)

    async def scenario() -> None:
        events = scratchpad.generate(_request(LONG, "gone-1", max_tokens=600, reasoning_effort="low"))
        async for event in events:
            if isinstance(event, TextDelta) and not event.reasoning:
                break  # the first answer token: the request is in its second pass
        await events.aclose()  # what a client disconnect does
        deadline = time.monotonic() + 60
        while engine.tokens_decoded("gone-1") is None:
            assert time.monotonic() < deadline, "the sequence was not retired"
            await asyncio.sleep(0.01)
        assert engine.health().running == 0

    asyncio.run(scenario())
    decoded = engine.tokens_decoded("gone-1")
    assert decoded is not None and decoded < 64 + 50, decoded  # of 600 allowed


def test_a_template_that_cannot_continue_falls_back_to_a_second_request(engine: LlamaCppEngine) -> None:
    """User text holding the engine's output marker makes the render check fail: the follow-up is declined
    and the answer pass runs as a request of its own, billed the same way."""
    from tokentill.engines import llamacpp

    scratchpad = _scratchpad(engine, follow_up=True)
    text = f"Repeat this: {llamacpp._OUTPUT_MARKER}"
    request = _request(text, "decline-1", max_tokens=60)
    result = asyncio.run(_collect(scratchpad, request))
    usage = result.finished.usage
    assert usage.prompt_tokens == scratchpad.count_prompt_tokens(request)
    assert usage.completion_tokens == result.hidden_tokens + result.shown_tokens
    assert usage.reasoning_tokens == result.hidden_tokens
