"""The Responses API end to end: one `tokentill serve` on the embedded SmolLM2, the official openai SDK.

Two catalogue entries on the same weights with the committed tiny projector (so images are accepted):
`o1-preview` (hidden scratchpad reasoning) and `smol` (no reasoning, cheaper on CPU). Budgets stay small;
assertions are on shapes, order, ids, money and status codes, never on what the 135M model writes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import jsonschema
import openai
import pydantic
import pytest
import requests

from tests.e2e.conftest import TokentillServer, llama_available
from tests.e2e.test_upstream_e2e import start_gateway
from tests.media.helpers import data_uri, png_bytes

pytestmark = [pytest.mark.e2e, pytest.mark.llama]

MMPROJ = Path(__file__).resolve().parents[1] / "fixtures" / "tiny-mmproj.gguf"
PRICE_IN, PRICE_OUT = 15, 60  # the catalogue's defaults, µcr per token
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The current weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 30}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokentillServer]:
    llama_available()
    entry = {"engine": "llamacpp", "mmproj": str(MMPROJ), "context": 2048}
    server = start_gateway(
        tmp_path_factory.mktemp("responses"),
        [
            {"id": "o1-preview", "reasoning": "scratchpad", **entry},
            {"id": "smol", "reasoning": "none", **entry},
        ],
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def key(gateway: TokentillServer) -> str:
    return gateway.new_key("resp", credits="50")


@pytest.fixture(scope="module")
def client(gateway: TokentillServer, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)


def _cost(usage: Any) -> Decimal:
    return Decimal(usage.input_tokens * PRICE_IN + usage.output_tokens * PRICE_OUT) / 1_000_000


def _charged(server: TokentillServer, before: Decimal, account: str = "resp") -> Decimal:
    return before - Decimal(server.balance(account))


def test_string_input(gateway: TokentillServer, client: openai.OpenAI) -> None:
    before = Decimal(gateway.balance("resp"))
    response = client.responses.create(model="smol", input="Say hello.", max_output_tokens=8, temperature=0)
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.status in {"completed", "incomplete"}
    assert [item.type for item in response.output] == ["message"]
    assert response.output_text
    usage = response.usage
    assert usage is not None and 0 < usage.output_tokens <= 8
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.output_tokens_details.reasoning_tokens == 0
    assert _charged(gateway, before) == _cost(usage)


def test_items_with_an_image_reasoning_and_a_summary(gateway: TokentillServer, client: openai.OpenAI) -> None:
    before = Decimal(gateway.balance("resp"))
    response = client.responses.create(
        model="o1-preview",
        instructions="Answer in one short sentence.",
        input=[
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "What colour is this picture?"},
                    {"type": "input_image", "image_url": data_uri(png_bytes((32, 32))), "detail": "low"},
                ],
            }
        ],
        reasoning={"effort": "low", "summary": "auto"},
        max_output_tokens=24,
        temperature=0,
    )
    usage = response.usage
    assert usage is not None
    assert usage.output_tokens_details.reasoning_tokens > 0  # the hidden notes, billed as output
    assert usage.output_tokens <= 24
    reasoning = response.output[0]
    assert reasoning.type == "reasoning"
    assert len(reasoning.summary) == 1 and reasoning.summary[0].text  # visible only because it was asked
    assert response.reasoning is not None and response.reasoning.summary == "auto"
    assert _charged(gateway, before) == _cost(usage)


def test_reasoning_stays_hidden_unless_a_summary_is_asked(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model="o1-preview", input="Hi.", reasoning={"effort": "low"}, max_output_tokens=12, temperature=0
    )
    assert response.output[0].type == "reasoning" and response.output[0].summary == []


def test_stream_events_in_order_and_usage_billed(gateway: TokentillServer, client: openai.OpenAI) -> None:
    before = Decimal(gateway.balance("resp"))
    events = list(
        client.responses.create(model="smol", input="Count to three.", max_output_tokens=10, stream=True)
    )
    types = [event.type for event in events]
    assert types[:5] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
    ]
    assert types[-4:-1] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ]
    assert types[-1] in {"response.completed", "response.incomplete"}
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    final = events[-1].response  # type: ignore[union-attr]
    assert deltas == final.output_text and final.output[0].content[0].text == deltas
    assert len({event.response.id for event in events if hasattr(event, "response")}) == 1
    assert final.usage is not None
    assert _charged(gateway, before) == _cost(final.usage)
    assert client.responses.retrieve(final.id).output_text == deltas  # stored before the last event


class Pick(pydantic.BaseModel):
    colour: Literal["red", "green", "blue"]


def test_sdk_stream_helper(gateway: TokentillServer, client: openai.OpenAI) -> None:
    """`responses.stream` with a pydantic `text_format` (a short constrained answer, so the budget is not
    spent: the SDK's helper wants `response.completed`), reasoning with a visible summary."""
    before = Decimal(gateway.balance("resp"))
    with client.responses.stream(
        model="o1-preview",
        input="Pick a colour.",
        text_format=Pick,
        reasoning={"effort": "low", "summary": "concise"},
        max_output_tokens=100,
        temperature=0,
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "response.reasoning_summary_text.delta" in kinds
    assert final.output[0].type == "reasoning" and final.output[0].summary
    assert isinstance(final.output_parsed, Pick)
    assert final.usage is not None and final.usage.output_tokens_details.reasoning_tokens > 0
    assert _charged(gateway, before) == _cost(final.usage)


def test_previous_response_id_continues_the_conversation(client: openai.OpenAI) -> None:
    first = client.responses.create(model="smol", input="My name is Ada.", max_output_tokens=6, temperature=0)
    follow = client.responses.create(
        model="smol", previous_response_id=first.id, input="What is my name?", max_output_tokens=1
    )
    alone = client.responses.create(model="smol", input="What is my name?", max_output_tokens=1)
    assert follow.previous_response_id == first.id
    assert first.usage is not None and follow.usage is not None and alone.usage is not None
    # The earlier input and answer were put before the new input.
    assert follow.usage.input_tokens >= alone.usage.input_tokens + first.usage.output_tokens
    # A chain: the third turn sees the first two.
    third = client.responses.create(
        model="smol", previous_response_id=follow.id, input="Thanks.", max_output_tokens=1
    )
    assert third.usage is not None and third.usage.input_tokens > follow.usage.input_tokens


def test_retrieve_and_delete(client: openai.OpenAI) -> None:
    response = client.responses.create(model="smol", input="Hello.", max_output_tokens=4, metadata={"k": "v"})
    assert client.responses.retrieve(response.id).model_dump() == response.model_dump()
    assert response.metadata == {"k": "v"}
    items = list(client.responses.input_items.list(response.id))
    assert [(item.type, item.role) for item in items] == [("message", "user")]  # type: ignore[union-attr]
    deleted = client.responses.with_raw_response.delete(response.id)
    assert deleted.status_code == 200
    assert json.loads(deleted.text) == {"id": response.id, "object": "response.deleted", "deleted": True}
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(response.id)
    unstored = client.responses.create(model="smol", input="Hello.", max_output_tokens=2, store=False)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def test_another_accounts_response_is_not_found(gateway: TokentillServer, client: openai.OpenAI) -> None:
    response = client.responses.create(model="smol", input="Secret.", max_output_tokens=2)
    stranger = openai.OpenAI(base_url=gateway.url + "/v1", api_key=gateway.new_key("stranger"), max_retries=0)
    with pytest.raises(openai.NotFoundError) as caught:
        stranger.responses.retrieve(response.id)
    assert caught.value.body == {
        "message": f"Response with id '{response.id}' not found.",
        "type": "invalid_request_error",
        "param": "response_id",
        "code": "response_not_found",
    }
    with pytest.raises(openai.NotFoundError):
        stranger.responses.delete(response.id)
    with pytest.raises(openai.BadRequestError) as previous:
        stranger.responses.create(model="smol", input="Hi.", previous_response_id=response.id)
    assert (
        isinstance(previous.value.body, dict) and previous.value.body["code"] == "previous_response_not_found"
    )
    # The owner's other key sees it: responses belong to the account.
    colleague = openai.OpenAI(base_url=gateway.url + "/v1", api_key=gateway.new_key("resp"), max_retries=0)
    assert colleague.responses.retrieve(response.id).id == response.id


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        (
            {"model": "smol", "input": [{"type": "item_reference", "id": "x"}]},
            400,
            "invalid_value",
            "input[0].type",
        ),
        ({"model": "smol", "input": "x", "max_output_tokens": 0}, 400, "invalid_value", "max_output_tokens"),
        ({"model": "smol"}, 400, "missing_required_parameter", "input"),
        (
            {"model": "smol", "input": "x", "frequency_penalty": 1},
            400,
            "unknown_parameter",
            "frequency_penalty",
        ),
        (
            {"model": "smol", "input": "x", "tools": [{"type": "web_search"}]},
            400,
            "invalid_value",
            "tools[0].type",
        ),
        ({"model": "nope", "input": "x"}, 404, "model_not_found", "model"),
    ],
)
def test_error_envelopes(
    gateway: TokentillServer, key: str, body: dict[str, Any], status: int, code: str, param: str
) -> None:
    reply = requests.post(
        gateway.url + "/v1/responses", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30
    )
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"] == "application/json"
    error = reply.json()["error"]
    assert (error["code"], error["param"]) == (code, param)
    assert set(error) == {"message", "type", "param", "code"}


def test_bad_json_and_no_key(gateway: TokentillServer, key: str, client: openai.OpenAI) -> None:
    reply = requests.post(
        gateway.url + "/v1/responses", data=b"{", headers={"Authorization": f"Bearer {key}"}, timeout=30
    )
    assert (reply.status_code, reply.json()["error"]["code"]) == (400, "invalid_json")
    reply = requests.post(gateway.url + "/v1/responses", json={"model": "smol", "input": "x"}, timeout=30)
    assert (reply.status_code, reply.json()["error"]["code"]) == (401, "missing_api_key")
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model="smol", input=[{"role": "tool", "content": "x"}])  # type: ignore[list-item]


def test_function_call_then_its_output(gateway: TokentillServer, client: openai.OpenAI) -> None:
    before = Decimal(gateway.balance("resp"))
    called = client.responses.create(
        model="smol",
        input="What is the weather in Paris?",
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=40,
        temperature=0,
    )
    calls = [item for item in called.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].call_id.startswith("call_")
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER["parameters"])
    assert called.usage is not None and _charged(gateway, before) == _cost(called.usage)
    answered = client.responses.create(
        model="smol",
        previous_response_id=called.id,
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": '{"sky": "clear"}'}],
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="none",
        max_output_tokens=8,
    )
    assert [item.type for item in answered.output] == ["message"]


def test_text_format_json_schema(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"colour": {"enum": ["red", "green", "blue"]}},
        "required": ["colour"],
        "additionalProperties": False,
    }
    response = client.responses.create(
        model="smol",
        input="Pick a colour.",
        text={"format": {"type": "json_schema", "name": "pick", "schema": schema, "strict": True}},
        max_output_tokens=20,
    )
    jsonschema.validate(json.loads(response.output_text), schema)
    assert response.text is not None and response.text.format is not None
    assert response.text.format.type == "json_schema"


def test_idempotency_key_replays_the_same_response(gateway: TokentillServer, key: str) -> None:
    before = Decimal(gateway.balance("resp"))
    headers = {"Authorization": f"Bearer {key}", "Idempotency-Key": "resp-idem-1"}
    body = {"model": "smol", "input": "Hi.", "max_output_tokens": 3}
    first = requests.post(gateway.url + "/v1/responses", json=body, headers=headers, timeout=60)
    again = requests.post(gateway.url + "/v1/responses", json=body, headers=headers, timeout=60)
    assert first.status_code == again.status_code == 200
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    usage = first.json()["usage"]
    charged = Decimal(usage["input_tokens"] * PRICE_IN + usage["output_tokens"] * PRICE_OUT) / 1_000_000
    assert _charged(gateway, before) == charged  # once


def test_langchain_with_the_responses_api(gateway: TokentillServer, key: str) -> None:
    """LangChain's `ChatOpenAI(use_responses_api=True)`: invoke, stream, structured output, a tool call."""
    from langchain_openai import ChatOpenAI

    def chat(max_tokens: int) -> ChatOpenAI:
        return ChatOpenAI(
            model="smol",
            base_url=gateway.url + "/v1",
            api_key=key,  # type: ignore[arg-type]
            use_responses_api=True,
            max_tokens=max_tokens,  # type: ignore[call-arg]
            temperature=0,
            max_retries=0,
        )

    message = chat(6).invoke("Say hi.")
    assert message.response_metadata["id"].startswith("resp_")
    assert message.text and message.usage_metadata is not None
    assert message.usage_metadata["output_tokens"] <= 6
    chunks = list(chat(6).stream("Say hi."))
    assert "".join(chunk.text for chunk in chunks) and chunks[-1].usage_metadata is not None
    picked = chat(30).with_structured_output(Pick).invoke("Pick a colour.")
    assert isinstance(picked, Pick)

    def get_weather(city: str) -> str:
        """The current weather in a city."""
        return "sunny"

    called = chat(40).bind_tools([get_weather], tool_choice="get_weather").invoke("Weather in Paris?")
    assert [call["name"] for call in called.tool_calls] == ["get_weather"]
    assert isinstance(called.tool_calls[0]["args"]["city"], str)
