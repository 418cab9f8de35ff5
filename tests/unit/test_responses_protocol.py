"""The Responses API's wire side: a request translated into the chat it amounts to, errors named by this
request's JSON paths, and `ResponseBuilder`'s stream events and final object (which must agree)."""

from __future__ import annotations

from typing import Any

import pytest

from tokentill.errors import InvalidRequest
from tokentill.protocol.response_objects import ResponseBuilder, summarize
from tokentill.protocol.responses import Answer
from tokentill.protocol.responses_api import continued, parse_responses_request, to_chat
from tokentill.protocol.stored_objects import replay_events
from tokentill.types import EngineEvent, Finished, TextDelta, ToolCallDelta, Usage


def _chat(body: dict[str, Any], history: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    request = to_chat(parse_responses_request({"model": "m", **body}), history or [])
    return request.model_dump(exclude_none=True, by_alias=True)


def _refused(body: dict[str, Any]) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        to_chat(parse_responses_request({"model": "m", **body}), [])
    return caught.value


def test_string_input_is_one_user_message_after_the_instructions() -> None:
    chat = _chat({"input": "hi", "instructions": "Be brief.", "max_output_tokens": 7})
    assert chat["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
    ]
    assert chat["max_completion_tokens"] == 7


def test_items_become_messages_tool_calls_and_tool_results() -> None:
    chat = _chat(
        {
            "input": [
                {"role": "user", "content": [{"type": "input_text", "text": "weather?"}]},
                {"type": "reasoning", "id": "rs_1", "summary": []},
                {"type": "function_call", "call_id": "call_1", "name": "weather", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
                {
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": "Sunny.", "annotations": []}],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "input_image", "image_url": "data:image/png;base64,AA", "detail": "low"}
                    ],
                },
            ],
            "tools": [{"type": "function", "name": "weather", "parameters": {"type": "object"}}],
            "tool_choice": {"type": "function", "name": "weather"},
            "text": {
                "format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}, "strict": True}
            },
            "reasoning": {"effort": "minimal"},
        },
        history=[{"role": "user", "content": "earlier"}, {"role": "assistant", "content": "yes"}],
    )
    assert [m["role"] for m in chat["messages"]] == [
        "user",
        "assistant",
        "user",
        "assistant",
        "tool",
        "assistant",
        "user",
    ]
    assert chat["messages"][3]["tool_calls"][0]["function"] == {"name": "weather", "arguments": "{}"}
    assert chat["messages"][4] == {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}
    assert chat["messages"][6]["content"][0]["image_url"] == {
        "url": "data:image/png;base64,AA",
        "detail": "low",
    }
    assert chat["tools"][0]["function"]["name"] == "weather"
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "weather"}}
    assert chat["response_format"]["json_schema"]["schema"] == {"type": "object"}
    assert chat["reasoning_effort"] == "low"


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0].type", "invalid_value"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_file"}]}]},
            "input[0].content[0].type",
            "invalid_value",
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "f"}]}]},
            "input[0].content[0].image_url",
            "unsupported_value",
        ),
        (
            {"input": [{"role": "system", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "input[0].content[0]",
            "invalid_value",
        ),
        ({"input": "x", "reasoning": {"effort": "huge"}}, "reasoning.effort", "invalid_value"),
        ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type", "invalid_value"),
        (
            {"input": "x", "tools": [{"type": "function", "name": "no spaces"}]},
            "tools[0].name",
            "invalid_value",
        ),
        ({"input": "x", "background": True}, "background", "unsupported_parameter"),
        ({"input": "x", "modalities": ["text"]}, "modalities", "unknown_parameter"),
        ({}, "input", "missing_required_parameter"),
        ({"input": 5}, "input", "invalid_type"),
        ({"input": "x", "max_output_tokens": 0}, "max_output_tokens", "invalid_value"),
        ({"input": [{"role": "user", "content": "x"}] * 2049}, "input", "invalid_value"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_text", "text": "x"}] * 5000}] * 2},
            "input[1].content",
            "invalid_value",
        ),
        ({"input": "x", "metadata": {"k": "v" * 513}}, "metadata.k", "invalid_value"),
        ({"input": "x", "temperature": 3}, "temperature", "invalid_value"),
    ],
)
def test_refusals_name_this_requests_parameter(body: dict[str, Any], param: str, code: str) -> None:
    error = _refused(body)
    assert (error.param, error.code) == (param, code), error.message


def test_neutral_values_of_unimplemented_parameters_pass() -> None:
    _chat({"input": "x", "background": False, "truncation": "disabled", "include": [], "store": False})


EVENTS: list[EngineEvent] = [
    TextDelta("First I read. Then I think. Then I check. Then more.", reasoning=True),
    TextDelta("Hel"),
    TextDelta(""),
    TextDelta("lo"),
    ToolCallDelta(0, "call_1", "f", '{"a"'),
    ToolCallDelta(0, arguments=":1}"),
    Finished("stop", Usage(10, 6, cached_tokens=2, reasoning_tokens=3)),
]


def _builder(**body: Any) -> ResponseBuilder:
    request = parse_responses_request({"model": "m", "input": "hi", **body})
    return ResponseBuilder(response_id="resp_abc", created_at=1, model="m", request=request)


def test_stream_events_are_in_openais_order_and_numbered() -> None:
    builder = _builder(reasoning={"summary": "concise"})
    events = builder.start()
    for event in EVENTS:
        events += builder.feed(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.reasoning_summary_part.added",
        "response.reasoning_summary_text.delta",
        "response.reasoning_summary_text.done",
        "response.reasoning_summary_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    final = events[-1]["response"]
    assert final["status"] == "completed"
    assert final["usage"] == {
        "input_tokens": 10,
        "input_tokens_details": {"cached_tokens": 2},
        "output_tokens": 6,
        "output_tokens_details": {"reasoning_tokens": 3},
        "total_tokens": 16,
    }
    reasoning, message, call = final["output"]
    assert reasoning["summary"] == [{"type": "summary_text", "text": "First I read. Then I think."}]
    assert message["content"][0]["text"] == "Hello"
    assert (call["call_id"], call["name"], call["arguments"]) == ("call_1", "f", '{"a":1}')
    # The same answer collected renders the same object (the idempotent replay's), and replays as events
    # that end in it.
    answer = Answer()
    for event in EVENTS:
        answer.add(event)
    assert _builder(reasoning={"summary": "concise"}).from_answer(answer) == final
    replayed = replay_events(final)
    assert replayed[-1]["response"] == final
    types = [e["type"] for e in events]
    one_delta_each = [t for i, t in enumerate(types) if not (t.endswith(".delta") and types[i - 1] == t)]
    assert [e["type"] for e in replayed] == one_delta_each


def test_without_a_summary_request_the_notes_stay_hidden() -> None:
    builder = _builder()
    events = [e for event in EVENTS for e in builder.feed(event)]
    assert builder.response()["output"][0] == {"id": "rs_abc", "type": "reasoning", "summary": []}
    assert not any("summary" in e["type"] for e in events)
    assert "First I read" not in repr(events)


def test_a_length_stop_is_incomplete() -> None:
    builder = _builder(max_output_tokens=2)
    events = [e for event in (TextDelta("Hi"), Finished("length", Usage(3, 2))) for e in builder.feed(event)]
    assert events[-1]["type"] == "response.incomplete"
    final = builder.response()
    assert final["status"] == "incomplete"
    assert final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert final["output"][0]["status"] == "incomplete"


def test_summaries_are_short_and_cut_at_a_word() -> None:
    notes = "One. Two. Three. Four. " + "word " * 500
    assert summarize(notes, "concise") == "One. Two."
    assert summarize(notes, "auto") == "One. Two. Three."
    detailed = summarize(notes, "detailed")
    assert len(detailed) <= 2001 and detailed.endswith("…") and detailed.startswith("One. Two. Three. Four.")


def test_the_conversation_continues_with_the_answer() -> None:
    request = parse_responses_request({"model": "m", "input": "again"})
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    calls = [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    assert continued(history, request, "", calls)[2:] == [
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": None, "tool_calls": calls},
    ]
    assert continued([], request, "", [])[-1] == {"role": "assistant", "content": ""}
