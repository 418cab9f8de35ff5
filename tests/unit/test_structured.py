"""The schema → grammar compiler's refusals and the tool-call text parser (no model needed)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tokentill.errors import InvalidRequest
from tokentill.structured.grammar import schema_grammar
from tokentill.structured.tools import ToolCallParser, call_text
from tokentill.types import TextDelta, ToolCall, ToolCallDelta


@pytest.mark.parametrize(
    ("schema", "param"),
    [
        ({"type": "string", "pattern": "a+"}, "s.pattern"),
        ({"type": "object", "properties": {"a": {"type": "number", "minimum": 3}}}, "s.properties.a.minimum"),
        ({"type": "array", "items": {"oneOf": [{"type": "string"}]}}, "s.items.oneOf"),
        ({"type": "objekt"}, "s.type"),
        ({"$ref": "#/$defs/Missing"}, "s.$ref"),
        ({"type": "string", "format": "email"}, "s.format"),
        ({"type": "array", "maxItems": 5000}, "s.maxItems"),
        ({"anyOf": [{"type": "string"}, {"type": "integer", "multipleOf": 2}]}, "s.anyOf[1].multipleOf"),
        ({"$defs": {"A": {"$ref": "#/$defs/A"}}, "$ref": "#/$defs/A"}, "s.$defs.A.$ref"),  # left recursion
        ({"anyOf": [{"$ref": "#"}, {"type": "null"}]}, "s.anyOf[0].$ref"),
        ({"type": "array", "items": {"type": "array", "items": {"minItems": -1}}}, "s.items.items.minItems"),
        ({"type": [{"x": 1}]}, "s.type[0]"),  # unhashable values are refused, not a crash
        ({"type": "string", "format": ["date"]}, "s.format"),
        ({"enum": [1, float("nan")]}, "s.enum"),
    ],
)
def test_unsupported_features_are_refused_by_json_path(schema: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        schema_grammar(schema, "s")
    assert caught.value.code == "invalid_json_schema"
    assert caught.value.param == param


def test_absurd_nesting_is_a_400_not_a_crash() -> None:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(5000):
        schema = {"anyOf": [schema]}
    with pytest.raises(InvalidRequest) as caught:
        schema_grammar(schema, "s")
    assert caught.value.code == "invalid_json_schema" and caught.value.param == "s"


def test_recursive_refs_and_annotations_compile() -> None:
    schema = {
        "title": "Tree",
        "description": "ignored",
        "$defs": {
            "Node": {
                "type": "object",
                "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/Node"}}},
            }
        },
        "$ref": "#/$defs/Node",
    }
    grammar = schema_grammar(schema, "s")
    assert grammar.startswith("root ::= ") and "ref-node" in grammar


def _run(parser: ToolCallParser, pieces: list[str]) -> list[TextDelta | ToolCallDelta]:
    out: list[TextDelta | ToolCallDelta] = []
    for piece in pieces:
        out += parser.feed(piece, 1)
    return out + parser.finish()


def test_parser_turns_calls_into_deltas_and_keeps_every_token() -> None:
    text = "Let me check.\n" + call_text(ToolCall("x", "get_weather", '{"city":"Paris"}')) + "\n"
    text += call_text(ToolCall("y", "get_time", "{}"))
    pieces = [text[i : i + 3] for i in range(0, len(text), 3)]  # tags and tails split across tokens
    items = _run(ToolCallParser(), pieces)
    assert sum(i.tokens for i in items) == len(pieces)
    assert "".join(i.text for i in items if isinstance(i, TextDelta)) == "Let me check.\n"
    calls: dict[int, list[ToolCallDelta]] = {}
    for item in items:
        if isinstance(item, ToolCallDelta):
            calls.setdefault(item.index, []).append(item)
    assert [c[0].name for c in calls.values()] == ["get_weather", "get_time"]
    assert all(c[0].id and c[0].id.startswith("call_") for c in calls.values())
    assert json.loads("".join(d.arguments for d in calls[0])) == {"city": "Paris"}
    assert "".join(d.arguments for d in calls[1]) == "{}"


def test_plain_text_passes_through() -> None:
    items = _run(ToolCallParser(), ["Hello <tool", "s> are fine"])
    assert "".join(i.text for i in items if isinstance(i, TextDelta)) == "Hello <tools> are fine"
