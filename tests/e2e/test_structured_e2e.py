"""Structured outputs and tools on the embedded SmolLM2, through the official SDK and LangChain.

One `tokentill serve` with three entries: `o1-preview` (embedded, hidden scratchpad reasoning, the
default), `smol` (the same weights without reasoning, cheaper on CPU) and `relay` (an upstream: the
scripted OpenAI-compatible server of tests/engines/upstream_servers.py). Answers are checked by
`jsonschema`, a validator nobody here wrote; budgets stay small so the module runs in about a minute.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pydantic
import pytest
import requests

from tests.e2e.conftest import TokentillServer, llama_available
from tests.e2e.test_upstream_e2e import start_gateway
from tests.engines.upstream_servers import TOOL_CALL_DELTAS, USAGE, ScriptedUpstream

pytestmark = [pytest.mark.e2e, pytest.mark.llama]

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0},
        "city": {"type": "string", "maxLength": 40},
        "languages": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3},
        "role": {"enum": ["engineer", "artist", "teacher", "other"]},
    },
    "required": ["name", "age", "city", "languages", "role"],
    "additionalProperties": False,
}


RELAY_PRICE_IN, RELAY_PRICE_OUT = 100, 200
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 40},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
WEATHER_SCHEMA: dict[str, Any] = WEATHER["function"]["parameters"]  # type: ignore[index]


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, scripted: ScriptedUpstream
) -> Iterator[TokentillServer]:
    llama_available()
    workdir: Path = tmp_path_factory.mktemp("structured")
    server = start_gateway(
        workdir,
        [
            {"id": "o1-preview", "reasoning": "scratchpad", "context": 4096},
            {"id": "smol", "reasoning": "none", "context": 4096},
            {
                "id": "relay",
                "engine": "upstream",
                "base_url": scripted.url + "/tools/v1",
                "price_input": RELAY_PRICE_IN,
                "price_output": RELAY_PRICE_OUT,
            },
        ],
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(gateway: TokentillServer) -> openai.OpenAI:
    key = gateway.new_key("structured", credits="100")
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)


class Pet(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=30)
    species: str = pydantic.Field(max_length=20)


class Owner(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=30)
    age: int
    pets: list[Pet] = pydantic.Field(max_length=2)


def test_parse_returns_the_pydantic_object(client: openai.OpenAI) -> None:
    """The SDK's `parse` sends a strict json_schema with `$defs`; the scratchpad answer is constrained."""
    completion = client.chat.completions.parse(
        model="o1-preview",
        messages=[{"role": "user", "content": "Alice is 34 and has a cat called Tom."}],
        response_format=Owner,
        reasoning_effort="low",
        max_completion_tokens=160,
        temperature=0,
    )
    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "stop", message.content
    assert isinstance(message.parsed, Owner)
    assert completion.usage is not None and completion.usage.completion_tokens_details is not None
    assert completion.usage.completion_tokens_details.reasoning_tokens > 0  # notes were free-form


def test_json_schema_answers_validate_across_twenty_prompts(client: openai.OpenAI) -> None:
    subjects = [
        "a baker in Lyon", "a pilot from Osaka", "a retired teacher", "a painter in Lisbon",
        "a student in Nairobi", "a chess player", "a nurse from Quito", "a fisherman", "a software engineer",
        "a violinist in Vienna", "a farmer in Iowa", "a poet", "a doctor in Cairo", "a carpenter",
        "a child who loves trains", "an astronaut", "a librarian in Oslo", "a chef from Lima",
        "a taxi driver in Delhi", "a gardener",
    ]  # fmt: skip
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": PERSON, "strict": True},
    }

    def ask(subject: str) -> tuple[str, str | None, str]:
        completion = client.chat.completions.create(
            model="smol",
            messages=[{"role": "user", "content": f"Invent a person: {subject}. Answer in JSON."}],
            response_format=response_format,  # type: ignore[arg-type]  # a plain dict, as clients send
            max_completion_tokens=120,
            temperature=0.7,
            seed=len(subject),
        )
        return subject, completion.choices[0].finish_reason, completion.choices[0].message.content or ""

    invalid = []
    with ThreadPoolExecutor(4) as pool:  # decoded together by the engine's continuous batching
        answers = list(pool.map(ask, subjects))
    for subject, finish, content in answers:
        try:
            jsonschema.validate(json.loads(content), PERSON)
        except (ValueError, jsonschema.ValidationError) as exc:
            invalid.append((subject, finish, content, str(exc)[:200]))
    assert len(answers) == 20 and invalid == []


def test_json_object_streamed(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="o1-preview",
        messages=[{"role": "user", "content": "Give the capital of France as JSON."}],
        response_format={"type": "json_object"},
        reasoning_effort="low",
        max_completion_tokens=120,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["stop"], text
    assert isinstance(json.loads(text), dict)


def test_unsupported_schema_is_refused_by_path(gateway: TokentillServer, client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]+$"}}}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="smol",
            messages=[{"role": "user", "content": "hi"}],
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
            max_completion_tokens=5,
        )
    error: Any = caught.value.body
    assert caught.value.code == "invalid_json_schema"
    assert error["param"] == "response_format.json_schema.schema.properties.code.pattern"
    # The same path inside a tool's parameters.
    bad_tool = {"type": "function", "function": {"name": "f", "parameters": schema}}
    response = requests.post(
        gateway.url + "/v1/chat/completions",
        headers={"authorization": f"Bearer {client.api_key}"},
        json={"model": "smol", "messages": [{"role": "user", "content": "hi"}], "tools": [bad_tool]},
        timeout=30,
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "tools[0].function.parameters.properties.code.pattern"


def test_required_tool_call_has_valid_arguments(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="smol",
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="required",
        max_completion_tokens=60,
        temperature=0,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message
    assert choice.message.content is None
    calls = choice.message.tool_calls or []
    assert len(calls) >= 1
    for call in calls:
        assert call.id.startswith("call_") and call.type == "function"
        assert call.function.name == "get_weather"  # type: ignore[union-attr]
        jsonschema.validate(json.loads(call.function.arguments), WEATHER_SCHEMA)  # type: ignore[union-attr]
    # The tools' text is part of the prompt, and billed as such.
    plain = client.chat.completions.create(
        model="smol",
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        max_completion_tokens=1,
    )
    assert completion.usage is not None and plain.usage is not None
    assert completion.usage.prompt_tokens > plain.usage.prompt_tokens + 40


def _tool_loop(client: openai.OpenAI, *, model: str, stream: bool) -> tuple[str, str]:
    """Call → tool result → answer. Returns (the call's arguments, the final answer)."""
    messages: list[Any] = [{"role": "user", "content": "What is the weather in Rome? Use the tool."}]
    effort: dict[str, Any] = {"reasoning_effort": "low"} if model == "o1-preview" else {}
    first = client.chat.completions.create(
        model=model,
        messages=messages,
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False,
        max_completion_tokens=140,
        temperature=0,
        **effort,
    )
    call = (first.choices[0].message.tool_calls or [])[0]
    assert first.choices[0].finish_reason == "tool_calls"
    messages.append(first.choices[0].message.model_dump(exclude_none=True))
    messages.append(
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21, "sky": "clear"}'}
    )
    options: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "tools": [WEATHER],
        **effort,
        "max_completion_tokens": 120,
        "temperature": 0,
        "tool_choice": "none",
    }
    if not stream:
        second = client.chat.completions.create(**options)
        assert second.choices[0].finish_reason in {"stop", "length"}
        return call.function.arguments, second.choices[0].message.content or ""  # type: ignore[union-attr]
    chunks = list(client.chat.completions.create(**options, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return call.function.arguments, text  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("model", "stream"),
    [("o1-preview", False), ("smol", True)],
    ids=["scratchpad-collected", "plain-streamed"],
)
def test_two_turn_tool_loop(client: openai.OpenAI, model: str, stream: bool) -> None:
    """With the hidden scratchpad the notes are free text and only the answer pass is constrained."""
    arguments, answer = _tool_loop(client, model=model, stream=stream)
    jsonschema.validate(json.loads(arguments), WEATHER_SCHEMA)
    assert answer.strip()


def test_tool_call_streamed_as_openai_streams_it(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="smol",
            messages=[{"role": "user", "content": "Weather in Oslo?"}],
            tools=[WEATHER],  # type: ignore[list-item]
            tool_choice="required",
            parallel_tool_calls=False,
            max_completion_tokens=60,
            temperature=0,
            stream=True,
        )
    )
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas and deltas[0].index == 0 and deltas[0].id and deltas[0].id.startswith("call_")
    assert deltas[0].function is not None and deltas[0].function.name == "get_weather"
    assert all(d.id is None and d.index == 0 for d in deltas[1:])  # then argument fragments only
    arguments = "".join(d.function.arguments or "" for d in deltas if d.function)
    jsonschema.validate(json.loads(arguments), WEATHER_SCHEMA)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_upstream_relays_tools_and_response_format(
    gateway: TokentillServer, scripted: ScriptedUpstream
) -> None:
    key = gateway.new_key("relayed", credits="10")
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)
    response_format = {"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER_SCHEMA}}
    history: list[Any] = [
        {"role": "user", "content": "Weather and time in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_old", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_old", "content": "sunny"},
    ]
    chunks = list(
        client.chat.completions.create(
            model="relay",
            messages=history,
            tools=[WEATHER],  # type: ignore[list-item]
            tool_choice="auto",
            parallel_tool_calls=True,
            response_format=response_format,  # type: ignore[arg-type]
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    sent = scripted.seen[-1]["body"]
    assert (
        sent["tools"] == [WEATHER] and sent["tool_choice"] == "auto" and sent["parallel_tool_calls"] is True
    )
    assert sent["response_format"] == response_format
    assert sent["messages"][1]["tool_calls"][0]["id"] == "call_old"
    assert sent["messages"][2] == {"role": "tool", "content": "sunny", "tool_call_id": "call_old"}
    relayed = [
        d.model_dump(exclude_none=True)
        for c in chunks
        if c.choices
        for d in (c.choices[0].delta.tool_calls or [])
    ]
    assert relayed == TOOL_CALL_DELTAS  # every delta intact, in order
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    # Non-streamed: the same calls collected into message.tool_calls.
    collected = client.chat.completions.create(model="relay", messages=history, tools=[WEATHER])  # type: ignore[list-item]
    calls = collected.choices[0].message.tool_calls or []
    assert [(c.id, c.function.name, c.function.arguments) for c in calls] == [  # type: ignore[union-attr]
        ("call_up1", "get_weather", '{"city": "Paris"}'),
        ("call_up2", "get_time", "{}"),
    ]
    # Billed from the upstream's usage at the gateway's prices, twice.
    rows = [r for r in gateway.cli_json("usage", "--account", "relayed")["usage"] if r["model"] == "relay"]
    assert len(rows) == 2
    cost = USAGE["prompt_tokens"] * RELAY_PRICE_IN + USAGE["completion_tokens"] * RELAY_PRICE_OUT
    assert gateway.balance("relayed") == str(Decimal(10) - Decimal(2 * cost) / 1_000_000)


class Weather(pydantic.BaseModel):
    """A weather report."""

    city: str = pydantic.Field(max_length=30)
    temperature_celsius: int


def test_langchain_bind_tools_and_structured_output(gateway: TokentillServer, client: openai.OpenAI) -> None:
    """LangChain's ChatOpenAI, a client nobody here wrote: a bound tool is called, run, and answered from;
    `with_structured_output` returns the pydantic object."""
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        return f"It is 21 degrees and sunny in {city}."

    llm = ChatOpenAI(
        model="smol",
        base_url=gateway.url + "/v1",
        api_key=client.api_key,  # type: ignore[arg-type]
        temperature=0,
        max_completion_tokens=80,
        max_retries=0,
    )
    messages: list[Any] = [HumanMessage("What is the weather in Berlin? Use the tool.")]
    called = llm.bind_tools([get_weather], tool_choice="get_weather").invoke(messages)
    assert called.tool_calls and called.tool_calls[0]["name"] == "get_weather"  # type: ignore[attr-defined]
    call = called.tool_calls[0]  # type: ignore[attr-defined]
    assert isinstance(call["args"].get("city"), str)
    result = get_weather.invoke(call)
    assert isinstance(result, ToolMessage) and result.tool_call_id == call["id"]
    answer = llm.bind_tools([get_weather]).invoke([*messages, called, result])
    assert isinstance(answer.content, str)

    weather = llm.with_structured_output(Weather).invoke("Berlin has 21 degrees. Report the weather.")
    assert isinstance(weather, Weather)
