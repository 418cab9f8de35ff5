"""Domain types every layer shares: tool definitions and calls, response formats, grammar constraints.

Plain frozen dataclasses, no framework and no wire parsing: `protocol/` validates the client's JSON into
them, engines consume them, the api renders them back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["Grammar", "ResponseFormat", "ToolCall", "ToolCallDelta", "ToolChoice", "ToolDefinition"]


@dataclass(frozen=True)
class ToolDefinition:
    """One `tools[]` entry of type function; `raw` is the entry as the client sent it (upstreams get it)."""

    name: str
    description: str = ""
    parameters: dict[str, Any] | None = None  # a JSON schema; None = no arguments
    strict: bool = False
    raw: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class ToolChoice:
    """`tool_choice`: none | auto | required, or `function` with the one `name` the model must call."""

    mode: Literal["none", "auto", "required", "function"] = "auto"
    name: str | None = None
    raw: Any = None  # as the client sent it (None: not sent)


@dataclass(frozen=True)
class ToolCall:
    """A call the assistant made (in a request's history, or collected from an answer)."""

    id: str
    name: str
    arguments: str  # a JSON text, as OpenAI carries it


@dataclass(frozen=True)
class ToolCallDelta:
    """Part of a tool call as it is generated: OpenAI's `delta.tool_calls[]` entry.

    The first delta of call `index` carries `id` and `name`; later ones only argument text. `tokens`:
    completion tokens this delta accounts for (as `TextDelta.tokens`).
    """

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""
    tokens: int = 1


@dataclass(frozen=True)
class ResponseFormat:
    """`response_format` json_object or json_schema (text is no format at all: None)."""

    type: Literal["json_object", "json_schema"]
    name: str | None = None
    schema: dict[str, Any] | None = None
    strict: bool = False
    raw: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Grammar:
    """A llama.cpp GBNF grammar the embedded engine samples under.

    `triggers` empty: every token is constrained from the first. Otherwise the grammar is lazy: output is
    free until one of the trigger strings appears, and constrained from that string on (its `root` starts
    with it).
    """

    text: str
    triggers: tuple[str, ...] = ()
