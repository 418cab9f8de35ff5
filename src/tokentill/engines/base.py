"""The engine interface: what the service hands an engine and what comes back.

An engine turns an `EngineRequest` into a stream of `EngineEvent`s: zero or more `TextDelta`s and
`ToolCallDelta`s, then exactly one `Finished` carrying the usage. Engines know nothing of keys, credits or
storage; they raise the `tokentill.errors` server errors (`Overloaded` 503, `DeadlineExceeded` 504,
`UpstreamError` 502, `InvalidRequest` with code `context_length_exceeded`) and stop work promptly when the
consumer stops iterating (that is how a client disconnect reaches the decode loop)."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from tokentill.types import Grammar, ResponseFormat, ToolCall, ToolCallDelta, ToolChoice, ToolDefinition

__all__ = [
    "Capabilities",
    "Engine",
    "EngineEvent",
    "EngineRequest",
    "Finished",
    "ImageInput",
    "Message",
    "THINK_CLOSE",
    "THINK_OPEN",
    "TextDelta",
    "ToolCallDelta",
    "Usage",
]

# The tags that `native` reasoning models write around their thinking.
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

FinishReason = Literal["stop", "length", "tool_calls"]


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
class EngineRequest:
    request_id: str
    messages: tuple[Message, ...]
    max_tokens: int  # completion budget, reasoning included; already clamped to what the account affords
    deadline: float  # time.monotonic() value after which the engine raises DeadlineExceeded
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # OpenAI's logit_bias as (token id, bias) pairs, and the two repetition penalties (0 = off).
    logit_bias: tuple[tuple[int, float], ...] = ()
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    reasoning_effort: str = "medium"
    # A later pass of a request that was already admitted (the scratchpad's answer pass): the engine takes
    # it ahead of waiting requests and past the queue limit, so an admitted request never fails halfway.
    continuation: bool = False
    # Structured output and tools, as the client asked for them (upstreams relay them as sent)...
    response_format: ResponseFormat | None = None
    tools: tuple[ToolDefinition, ...] = ()
    tool_choice: ToolChoice = ToolChoice()
    parallel_tool_calls: bool | None = None
    # ...and, for engines with `Capabilities.grammar`, the grammar that enforces them (None: free text).
    grammar: Grammar | None = None


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


@dataclass(frozen=True)
class Capabilities:
    context_length: int
    vision: bool = False
    reasoning: str = "none"  # none | native | scratchpad
    exact_prompt_tokens: bool = True  # False: count_prompt_tokens is an estimate (remote tokenizer)
    # True: the engine samples under `EngineRequest.grammar` and writes tools into the prompt itself;
    # False: it relays `response_format` and `tools` to a server that enforces them.
    grammar: bool = False
    extra: dict[str, str] = field(default_factory=dict)


@runtime_checkable
class Engine(Protocol):
    capabilities: Capabilities

    async def start(self) -> None:
        """Load weights / open connections. Called once from the app lifespan."""

    def count_prompt_tokens(self, request: EngineRequest) -> int:
        """Exact prompt tokens (chat template applied) — used to price the hold before generating."""

    def generate(self, request: EngineRequest) -> AsyncGenerator[EngineEvent, None]:
        """TextDelta events, then one Finished. Closing the generator early cancels the generation."""

    async def aclose(self) -> None:
        """Stop the decode loop / close connections; pending requests fail with Overloaded."""
