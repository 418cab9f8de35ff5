"""o1-style hidden reasoning for any engine, billed as completion tokens.

`with_reasoning(engine, mode)` wraps an engine according to its catalogue entry's `reasoning`:

- `none`: the engine as it is.
- `native`: the model writes `<think>…</think>` itself (DeepSeek-R1 distills, Qwen3, SmolLM3): the text
  inside the tags becomes hidden reasoning deltas, as it streams, even when a tag is split across deltas.
- `scratchpad`: any instruct model. A hidden first pass reasons step by step under a budget set by
  `reasoning_effort` (low 64, medium 192, high 512 tokens, never more than the request's own budget); a
  second pass answers with those notes in view. Both passes count toward `max_completion_tokens`; if the
  reasoning uses it all, the answer is empty and `finish_reason` is "length", as with o1.

Billing: `prompt_tokens` is the first pass's prompt (the client's messages plus the reasoning instruction,
exactly what the hold was priced on); `completion_tokens` is reasoning + answer; `reasoning_tokens` the
first pass's output. The second pass re-reads the notes internally; that is not billed again.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

from tokentill.engines.base import (
    Capabilities,
    Engine,
    EngineEvent,
    EngineRequest,
    Finished,
    Message,
    TextDelta,
    Usage,
)

__all__ = ["EFFORT_BUDGETS", "NativeThinking", "Scratchpad", "ThinkSplitter", "with_reasoning"]

EFFORT_BUDGETS = {"low": 64, "medium": 192, "high": 512}

_THINK_INSTRUCTION = (
    "Before answering, think step by step about the request above. Write only your reasoning: "
    "the facts that matter, the steps, and checks of your work. Do not write the final answer."
)
_ANSWER_INSTRUCTION = (
    "Your private notes on this request (the user cannot see them):\n\n{notes}\n\nNow answer."
)


def with_reasoning(engine: Engine, mode: str) -> Engine:
    if mode == "scratchpad":
        return Scratchpad(engine)
    if mode == "native":
        return NativeThinking(engine)
    return engine


class _Wrapper:
    def __init__(self, inner: Engine, mode: str) -> None:
        self.inner = inner
        self.capabilities = Capabilities(
            context_length=inner.capabilities.context_length,
            vision=inner.capabilities.vision,
            reasoning=mode,
            exact_prompt_tokens=inner.capabilities.exact_prompt_tokens,
        )

    async def start(self) -> None:
        await self.inner.start()

    async def aclose(self) -> None:
        await self.inner.aclose()


class Scratchpad(_Wrapper):
    """Two passes through the wrapped engine: hidden notes, then the answer."""

    def __init__(self, inner: Engine) -> None:
        super().__init__(inner, "scratchpad")

    def _thinking_request(self, request: EngineRequest) -> EngineRequest:
        budget = min(
            EFFORT_BUDGETS.get(request.reasoning_effort, EFFORT_BUDGETS["medium"]), request.max_tokens
        )
        # The instruction rides on the last user turn: chat templates accept that everywhere, while a
        # trailing system message is refused by some.
        messages = request.messages
        if messages and messages[-1].role == "user":
            last = messages[-1]
            messages = (*messages[:-1], replace(last, text=f"{last.text}\n\n{_THINK_INSTRUCTION}"))
        else:
            messages = (*messages, Message(role="user", text=_THINK_INSTRUCTION))
        return replace(request, messages=messages, max_tokens=budget, stop=())

    def count_prompt_tokens(self, request: EngineRequest) -> int:
        return self.inner.count_prompt_tokens(self._thinking_request(request))

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineEvent]:
        thinking = self._thinking_request(request)
        notes: list[str] = []
        first: Usage | None = None
        async for event in self.inner.generate(thinking):
            if isinstance(event, TextDelta):
                notes.append(event.text)
                yield replace(event, reasoning=True)
            else:
                first = event.usage
        assert first is not None, "an engine ends every generation with Finished"
        left = request.max_tokens - first.completion_tokens
        reasoning = first.completion_tokens
        if left < 1:
            yield Finished("length", _usage(first, reasoning, 0, reasoning))
            return
        written = "".join(notes).strip()
        messages = request.messages
        if written:
            # The notes go into the (first) system message, the one place every template takes one.
            context = _ANSWER_INSTRUCTION.format(notes=written)
            if messages and messages[0].role == "system":
                messages = (replace(messages[0], text=f"{messages[0].text}\n\n{context}"), *messages[1:])
            else:
                messages = (Message(role="system", text=context), *messages)
        answer = replace(request, messages=messages, max_tokens=left, continuation=True)
        async for event in self.inner.generate(answer):
            if isinstance(event, TextDelta):
                yield replace(event, reasoning=False)
            else:
                yield Finished(
                    event.finish_reason, _usage(first, reasoning, event.usage.completion_tokens, reasoning)
                )


def _usage(first: Usage, reasoning: int, answer: int, reasoning_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=first.prompt_tokens,
        completion_tokens=reasoning + answer,
        cached_tokens=first.cached_tokens,
        reasoning_tokens=reasoning_tokens,
        image_tokens=first.image_tokens,
        estimated=first.estimated,
    )


class ThinkSplitter:
    """Splits streamed text into (reasoning, visible) parts at `<think>` / `</think>` tags.

    Text that might be the start of a tag is held back until the next delta decides it, so a tag split
    across deltas ("<thi" + "nk>") never leaks into the answer.
    """

    OPEN, CLOSE = "<think>", "</think>"

    def __init__(self) -> None:
        self.inside = False
        self._pending = ""

    def feed(self, text: str) -> list[tuple[bool, str]]:
        """Parts of `text` ready to emit, each as (is_reasoning, text)."""
        data = self._pending + text
        self._pending = ""
        parts: list[tuple[bool, str]] = []
        while data:
            tag = self.CLOSE if self.inside else self.OPEN
            index = data.find(tag)
            if index >= 0:
                if index:
                    parts.append((self.inside, data[:index]))
                data = data[index + len(tag) :]
                self.inside = not self.inside
                continue
            keep = _partial_suffix(data, tag)
            if len(data) > keep:
                parts.append((self.inside, data[: len(data) - keep]))
            self._pending = data[len(data) - keep :]
            break
        return parts

    def flush(self) -> list[tuple[bool, str]]:
        rest, self._pending = self._pending, ""
        return [(self.inside, rest)] if rest else []


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0


class NativeThinking(_Wrapper):
    """Moves the model's own `<think>…</think>` text out of the answer and counts it as reasoning."""

    def __init__(self, inner: Engine) -> None:
        super().__init__(inner, "native")

    def count_prompt_tokens(self, request: EngineRequest) -> int:
        return self.inner.count_prompt_tokens(request)

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineEvent]:
        splitter = ThinkSplitter()
        reasoning = 0
        async for event in self.inner.generate(request):
            if isinstance(event, TextDelta):
                if event.reasoning:  # the engine already separated it (an upstream's reasoning field)
                    reasoning += event.tokens
                    yield event
                    continue
                was_inside = splitter.inside
                parts = [p for p in splitter.feed(event.text) if p[1]]
                # A delta's tokens are billed to the side of the tag it started on.
                reasoning += event.tokens if was_inside or (parts and parts[0][0]) else 0
                for index, (hidden, text) in enumerate(parts):
                    yield TextDelta(text, reasoning=hidden, tokens=event.tokens if index == 0 else 0)
                if not parts:
                    yield TextDelta("", reasoning=was_inside, tokens=event.tokens)
                continue
            for hidden, text in splitter.flush():
                yield TextDelta(text, reasoning=hidden, tokens=0)
            usage = replace(event.usage, reasoning_tokens=max(event.usage.reasoning_tokens, reasoning))
            yield Finished(event.finish_reason, usage)
