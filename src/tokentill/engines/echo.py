"""A deterministic engine without a model, for unit tests and gateway benchmarks (never a default).

Tokens are whitespace-separated words. The completion is the last user message's words, one `TextDelta`
per word: the first word bare, every later one with its leading space (so the deltas join to
`" ".join(words)`); a word held back (a possible stop prefix) still comes as an empty delta with its token.
Prompt tokens = all messages' words + 3 per message. `max_tokens`, stop strings, the deadline and the
context length behave as in the llama.cpp engine; there is no queue (`queue_size` is accepted for the
shared constructor and ignored), and words are produced without delay.

With `reasoning = "native"` in the catalogue, `<think>…</think>` in the words is split off as the llama.cpp
engine does it, starting inside the block when the last message is an assistant turn that ends with
`<think>` (the echo engine's stand-in for a chat template that pre-fills it).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator

from tokentill.catalog import ModelSpec
from tokentill.engines.base import THINK_OPEN, Capabilities, EngineHealth, EngineRequest
from tokentill.engines.text import TextAssembler
from tokentill.errors import InvalidRequest
from tokentill.types import EngineEvent, Finished, FinishReason, Usage

__all__ = ["EchoEngine"]

_TOKENS_PER_MESSAGE = 3


class EchoEngine:
    """`Engine` that repeats the last user message back."""

    def __init__(self, spec: ModelSpec, *, queue_size: int = 0, n_threads: int | None = None) -> None:
        self.spec = spec
        self.capabilities = Capabilities(
            context_length=spec.context, vision=spec.mmproj is not None, reasoning=spec.reasoning
        )

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    def health(self) -> EngineHealth:
        return EngineHealth(replicas_up=1, replicas=1, queued=0, running=0)

    def count_prompt_tokens(self, request: EngineRequest) -> int:
        return sum(len(m.text.split()) + _TOKENS_PER_MESSAGE for m in request.messages)

    async def generate(self, request: EngineRequest) -> AsyncGenerator[EngineEvent, None]:
        prompt_tokens = self.count_prompt_tokens(request)
        context = self.spec.context
        if prompt_tokens >= context:
            raise InvalidRequest(
                f"This model's maximum context length is {context} tokens. However, your messages resulted "
                f"in {prompt_tokens} tokens. Please reduce the length of the messages.",
                code="context_length_exceeded",
                param="messages",
            )
        budget = max(1, min(request.max_tokens, context - prompt_tokens))
        user = [m for m in request.messages if m.role == "user"]
        words = user[-1].text.split() if user else []
        native = self.capabilities.reasoning == "native"
        text = TextAssembler(request.stop, think_tags=native, thinking=native and _opens_thinking(request))
        generated = 0
        reason: FinishReason = "stop"
        for index, word in enumerate(words):
            if generated >= budget:
                reason = "length"
                break
            if time.monotonic() > request.deadline:
                raise request.deadline_error()
            generated += 1
            for delta in text.feed_text(word if index == 0 else " " + word):
                yield delta
            if text.stopped:
                break
            await asyncio.sleep(0)  # a scheduling point, so cancellation and other requests get a turn
        for delta in text.finish():
            yield delta
        usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=generated)
        yield Finished(finish_reason=reason, usage=usage)


def _opens_thinking(request: EngineRequest) -> bool:
    """The echo "prompt" ends inside `<think>` when the last message is an assistant turn ending with it
    (a pre-filled answer, as a DeepSeek-R1 chat template writes)."""
    last = request.messages[-1] if request.messages else None
    return last is not None and last.role == "assistant" and last.text.rstrip().endswith(THINK_OPEN)
