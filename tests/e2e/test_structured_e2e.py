"""Structured outputs and tools on the embedded SmolLM2, through the official SDK and LangChain.

One `tokentill serve` with two entries over the same weights: `o1-preview` (hidden scratchpad reasoning,
the default) and `smol` (no reasoning, cheaper on CPU). Answers are checked by `jsonschema`, a validator
nobody here wrote; budgets stay small so the module runs in about a minute on one thread.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pydantic
import pytest
import requests

from tests.e2e.conftest import TokentillServer, llama_available
from tests.e2e.test_upstream_e2e import start_gateway

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


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokentillServer]:
    llama_available()
    workdir: Path = tmp_path_factory.mktemp("structured")
    server = start_gateway(
        workdir,
        [
            {"id": "o1-preview", "reasoning": "scratchpad", "context": 4096},
            {"id": "smol", "reasoning": "none", "context": 4096},
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
    invalid = []
    for subject in subjects:
        completion = client.chat.completions.create(
            model="smol",
            messages=[{"role": "user", "content": f"Invent a person: {subject}. Answer in JSON."}],
            response_format=response_format,  # type: ignore[arg-type]  # a plain dict, as clients send
            max_completion_tokens=120,
            temperature=0.7,
            seed=len(subject),
        )
        content = completion.choices[0].message.content or ""
        try:
            jsonschema.validate(json.loads(content), PERSON)
        except (ValueError, jsonschema.ValidationError) as exc:
            invalid.append((subject, completion.choices[0].finish_reason, content, str(exc)[:200]))
    assert invalid == []


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
    # Refused before anything was reserved or charged: the account pays nothing for a bad schema.
    body = requests.get(gateway.url + "/v1/models", headers={"authorization": f"Bearer {client.api_key}"})
    assert body.status_code == 200
