"""The domain types every layer shares: what a chat is made of and what generating one yields.

`protocol`, `media`, `idempotency`, the request lifecycle, `api` and the engines all speak these, so they live
below all of them (like Starlette's `types.py`): this module imports nothing from tokentill. A chat reaches an
engine as `Message`s (images already fetched and validated as `ImageInput`s) and comes back as a stream of
`EngineEvent`s: zero or more `TextDelta`s and `ToolCallDelta`s, then exactly one `Finished` carrying the
`Usage`. Tools and structured output: `ToolDefinition`, `ToolChoice`, `ToolCall` (in a message's history),
`ResponseFormat`, and the `Grammar` the embedded engine samples under.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "EngineEvent",
    "FinishReason",
    "Finished",
    "Grammar",
    "ImageInput",
    "Message",
    "ResponseFormat",
    "TextDelta",
    "ToolCall",
    "ToolCallDelta",
    "ToolChoice",
    "ToolDefinition",
    "Usage",
]

FinishReason = Literal["stop", "length", "tool_calls"]


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


@dataclass(frozen=True)
class ImageInput:
    """An image that the media layer already fetched and validated; engines never fetch anything."""

    data: bytes
    mime: str
    width: int
    height: int
    detail: str = "auto"


@dataclass(frozen=True)
class Message:
    """One chat message with text already joined; `images` are in the order they appeared."""

    role: str  # system | user | assistant | tool  (developer is mapped to system before it gets here)
    text: str
    images: tuple[ImageInput, ...] = ()
    # Where each image sat: an offset into `text` per image, ascending. Empty = all images before the text.
    image_offsets: tuple[int, ...] = ()
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant turn's calls
    tool_call_id: str | None = None  # a tool turn: the call it answers

    def pieces(self) -> list[str | ImageInput]:
        """Text and images in the order the client sent them (empty text pieces left out)."""
        offsets = (
            self.image_offsets if len(self.image_offsets) == len(self.images) else (0,) * len(self.images)
        )
        out: list[str | ImageInput] = []
        start = 0
        for offset, image in zip(offsets, self.images, strict=True):
            if self.text[start:offset]:
                out.append(self.text[start:offset])
            out.append(image)
            start = offset
        if self.text[start:]:
            out.append(self.text[start:])
        return out


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int  # reasoning tokens included
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    image_tokens: int = 0
    estimated: bool = False

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class TextDelta:
    text: str
    reasoning: bool = False  # hidden reasoning, not part of `content`
    # Completion tokens this delta accounts for (billing of interrupted streams). Engines put every token
    # on a delta as it is generated, so a delta may carry tokens and no text (half a character, a held-back
    # stop prefix); renderers skip empty text.
    tokens: int = 1


@dataclass(frozen=True)
class Finished:
    finish_reason: FinishReason
    usage: Usage


EngineEvent = TextDelta | ToolCallDelta | Finished
