"""OpenAI response objects: `chat.completion`, `chat.completion.chunk`, `usage`, `model`, `list`.

Plain dicts built in one place, so the JSON shape is visible and exact (field order as OpenAI's).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tokentill.types import EngineEvent, Finished, TextDelta, ToolCallDelta, Usage

__all__ = [
    "SYSTEM_FINGERPRINT",
    "Answer",
    "chunk",
    "completion",
    "model_object",
    "tool_call_delta",
    "usage_object",
]

SYSTEM_FINGERPRINT = "fp_tokentill"


def usage_object(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {
            "cached_tokens": usage.cached_tokens,
            "image_tokens": usage.image_tokens,
            "audio_tokens": 0,
        },
        "completion_tokens_details": {
            "reasoning_tokens": usage.reasoning_tokens,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


@dataclass
class Answer:
    """An answer's events added up: the text, the hidden reasoning, the tool calls by index."""

    content: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    calls: dict[int, dict[str, Any]] = field(default_factory=dict)
    finished: Finished | None = None

    def add(self, event: EngineEvent) -> None:
        if isinstance(event, TextDelta):
            (self.reasoning if event.reasoning else self.content).append(event.text)
        elif isinstance(event, ToolCallDelta):
            call = self.calls.setdefault(
                event.index, {"id": "", "type": "function", "function": {"name": "", "arguments": ""}}
            )
            call["id"] = event.id or call["id"]
            call["function"]["name"] = event.name or call["function"]["name"]
            call["function"]["arguments"] += event.arguments
        else:
            self.finished = event

    def tool_calls(self) -> list[dict[str, Any]] | None:
        return [self.calls[i] for i in sorted(self.calls)] or None

    def completion(
        self, *, completion_id: str, created: int, model: str, include_reasoning: bool
    ) -> dict[str, Any]:
        """The `chat.completion` object (only once `finished` is set)."""
        assert self.finished is not None, "an answer is rendered once it has finished"
        return completion(
            completion_id=completion_id,
            created=created,
            model=model,
            content="".join(self.content),
            finish_reason=self.finished.finish_reason,
            usage=self.finished.usage,
            reasoning_content="".join(self.reasoning) if include_reasoning else None,
            tool_calls=self.tool_calls(),
        )


def completion(
    *,
    completion_id: str,
    created: int,
    model: str,
    content: str,
    finish_reason: str,
    usage: Usage,
    reasoning_content: str | None = None,
    tool_calls: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """With `tool_calls`, `content` is null when the model wrote no text (as OpenAI answers)."""
    message: dict[str, Any] = {
        "role": "assistant",
        "content": None if tool_calls and not content else content,
        "refusal": None,
    }
    if tool_calls:
        message["tool_calls"] = tool_calls
    if reasoning_content is not None:
        message["reasoning_content"] = reasoning_content
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage_object(usage),
        "service_tier": "default",
    }


def chunk(
    *,
    completion_id: str,
    created: int,
    model: str,
    delta: dict[str, Any] | None,
    finish_reason: str | None = None,
    usage: Usage | None = None,
) -> dict[str, Any]:
    """One stream chunk; `delta=None` makes the usage-only chunk with `choices: []`."""
    choices: list[dict[str, Any]] = []
    if delta is not None:
        choices.append({"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason})
    return {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": choices,
        "usage": usage_object(usage) if usage is not None else None,
        "service_tier": "default",
    }


def tool_call_delta(event: ToolCallDelta) -> dict[str, Any]:
    """A `delta.tool_calls[]` entry: index always; id, type and name on a call's first delta."""
    entry: dict[str, Any] = {"index": event.index}
    function: dict[str, Any] = {}
    if event.id is not None:
        entry["id"] = event.id
        entry["type"] = "function"
    if event.name is not None:
        function["name"] = event.name
    if event.arguments or event.name is not None:
        function["arguments"] = event.arguments
    if function:
        entry["function"] = function
    return entry


def model_object(model_id: str, created: int, owned_by: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": owned_by}
