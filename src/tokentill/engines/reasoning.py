"""o1-style hidden reasoning for any engine, billed as completion tokens.

`with_reasoning(engine, mode)` wraps an engine according to its catalogue entry's `reasoning`. A wrapper
closes the wrapped engine's generator as soon as its own is closed (`aclosing`), so a client that leaves
stops the engine at once rather than whenever the garbage collector finalizes the inner generator:

- `none`: the engine as it is.
- `native`: the model writes `<think>…</think>` itself (DeepSeek-R1 distills, Qwen3, SmolLM3): the text
  inside the tags becomes hidden reasoning deltas, as it streams, even when a tag is split across deltas.
  The embedded engines split it themselves (`engines/text.py`): they know when the chat template already
  opened `<think>` at the end of the prompt, and they apply stop strings to the answer only. An upstream
  server's `reasoning_content` arrives split; its plain text is split here. `reasoning_effort` does not
  limit native thinking on the embedded engine (only `max_completion_tokens` does); upstreams receive it.
- `scratchpad`: any instruct model. A hidden first pass reasons step by step under a budget set by
  `reasoning_effort` (low 64, medium 192, high 512 tokens, never more than the request's own budget); a
  second pass answers with those notes in view. Both passes count toward `max_completion_tokens`; if the
  reasoning uses it all, the answer is empty and `finish_reason` is "length", as with o1.

  On an engine with `Capabilities.follow_up` (the embedded llama.cpp engine) the answer pass continues the
  notes' own KV sequence: the notes become the assistant's turn and an answer instruction follows, so
  only those few tokens are evaluated, never the prompt and the notes again. Elsewhere (or when the
  engine declines) the answer is a request of its own, with the notes in the system message.

Billing: `prompt_tokens` is the first pass's prompt (the client's messages plus the reasoning instruction,
exactly what the hold was priced on), `cached_tokens` the part of it reused from an earlier request;
`completion_tokens` is reasoning + answer; `reasoning_tokens` the first pass's output (plus any reasoning an
upstream sends in the answer pass, which stays hidden). The answer pass's own prompt (the notes and the
answer instruction) is internal and not billed, and the notes are shortened if that prompt plus the rest
of the budget would not fit the context.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import replace

import anyio

from tokentill.engines.base import (
    Capabilities,
    Engine,
    EngineHealth,
    EngineRequest,
    FollowUp,
    engine_health,
)
from tokentill.engines.text import ThinkSplitter
from tokentill.structured.tools import choice_line
from tokentill.types import EngineEvent, Finished, Message, TextDelta, ToolCallDelta, ToolChoice, Usage

__all__ = ["EFFORT_BUDGETS", "NativeThinking", "Scratchpad", "ThinkSplitter", "with_reasoning"]

EFFORT_BUDGETS = {"low": 64, "medium": 192, "high": 512}

_THINK_INSTRUCTION = (
    "Before answering the user's request, think step by step about it. Write only your reasoning: "
    "the facts that matter, the steps, and checks of your work. Do not write the final answer."
)
_ANSWER_INSTRUCTION = (
    "Your private notes on this request (the user cannot see them):\n\n{notes}\n\nNow answer."
)
# The answer pass's turn when it continues the notes' sequence (the notes are the assistant's turn before).
_ANSWER_TURN = "Now answer my request, using your reasoning. Write only the answer."


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
            grammar=inner.capabilities.grammar,
            early_start=inner.capabilities.early_start,
        )

    async def start(self) -> None:
        await self.inner.start()

    async def aclose(self) -> None:
        await self.inner.aclose()

    def health(self) -> EngineHealth | None:
        return engine_health(self.inner)


class Scratchpad(_Wrapper):
    """Two passes through the wrapped engine: hidden notes, then the answer."""

    def __init__(self, inner: Engine) -> None:
        super().__init__(inner, "scratchpad")

    def _thinking_request(self, request: EngineRequest) -> EngineRequest:
        budget = min(
            EFFORT_BUDGETS.get(request.reasoning_effort, EFFORT_BUDGETS["medium"]), request.max_tokens
        )
        # The instruction opens the (first) system message, the one place every template takes one. There
        # it is the same prefix for every request, which a prefix cache serves without evaluating it
        # again: at the end of the last user turn its 38 tokens were evaluated anew for every request.
        messages = _with_system(request.messages, _THINK_INSTRUCTION, first=True)
        # The notes are free text: no grammar, no tool calls (the answer pass makes those).
        return replace(
            request,
            messages=messages,
            max_tokens=budget,
            stop=(),
            grammar=None,
            response_format=None,
            tool_choice=ToolChoice("none"),
            parallel_tool_calls=None,
        )

    def count_prompt_tokens(self, request: EngineRequest) -> int:
        return self.inner.count_prompt_tokens(self._thinking_request(request))

    def _follow_up(self, request: EngineRequest) -> FollowUp:
        """The answer pass as a continuation of the notes' sequence (engines with `follow_up`)."""
        turn = _ANSWER_TURN
        if request.tools and request.tool_choice.mode != "none":
            turn = f"{turn}\n{choice_line(request.tool_choice)}"  # the first pass was told not to call
        return FollowUp(
            after=(Message(role="user", text=turn),),
            max_tokens=request.max_tokens,
            stop=request.stop,
            grammar=request.grammar,
            tool_choice=request.tool_choice,
        )

    async def generate(self, request: EngineRequest) -> AsyncGenerator[EngineEvent, None]:
        thinking = self._thinking_request(request)
        if self.inner.capabilities.follow_up:
            thinking = replace(thinking, follow_up=self._follow_up(request))
        notes: list[str] = []
        first: Usage | None = None
        async with aclosing(self.inner.generate(thinking)) as events:
            async for event in events:
                if isinstance(event, TextDelta):
                    notes.append(event.text)
                    yield replace(event, reasoning=True)
                elif isinstance(event, Finished):
                    first = event.usage
                    break  # with a follow-up the same generator goes on with the answer
            assert first is not None, "an engine ends every generation with Finished"
            left = request.max_tokens - first.completion_tokens
            reasoning = first.completion_tokens
            if left < 1:
                yield Finished("length", _usage(first, reasoning, 0, reasoning))
                return
            answered = False
            if thinking.follow_up is not None:  # the engine's generator ends here if it declined
                async with aclosing(_answer(events, first, reasoning)) as answer_events:
                    async for event in answer_events:
                        answered = True
                        yield event
            if answered:
                return
        answer = await self._answer_request(request, "".join(notes).strip(), left, reasoning)
        async with aclosing(self.inner.generate(answer)) as events:
            async with aclosing(_answer(events, first, reasoning)) as answer_events:
                async for event in answer_events:
                    yield event

    async def _answer_request(
        self, request: EngineRequest, notes: str, left: int, notes_tokens: int
    ) -> EngineRequest:
        """The answer pass: the notes in the system message, and what is left of the budget.

        The context check priced the first pass's prompt plus the whole budget. The answer prompt holds
        the notes instead of the thinking instruction, which is normally no longer, but a template or a
        retokenization can make it so: then the notes lose their end (or go) until prompt plus `left`
        fits, so the engine never refuses the answer pass or cuts it short for lack of context.
        """
        answer = replace(request, messages=_with_notes(request.messages, notes), max_tokens=left)
        answer = replace(answer, continuation=True)
        if not self.inner.capabilities.exact_prompt_tokens:
            return answer  # estimates: the upstream server judges its own context
        context = self.inner.capabilities.context_length
        for _ in range(3):
            prompt = await anyio.to_thread.run_sync(self.inner.count_prompt_tokens, answer)
            over = prompt + left - context
            if over <= 0:
                return answer
            if not notes:
                return replace(answer, max_tokens=max(1, context - prompt))
            keep = len(notes) * max(0, notes_tokens - over - 16) // max(1, notes_tokens)
            notes = notes[:keep].rstrip()
            answer = replace(answer, messages=_with_notes(request.messages, notes))
        return replace(answer, messages=request.messages)  # no notes at all: the prompt was checked


def _with_notes(messages: tuple[Message, ...], notes: str) -> tuple[Message, ...]:
    """The notes go after the (first) system message's text."""
    if not notes:
        return messages
    return _with_system(messages, _ANSWER_INSTRUCTION.format(notes=notes), first=False)


def _with_system(messages: tuple[Message, ...], text: str, *, first: bool) -> tuple[Message, ...]:
    """`text` added to the (first) system message, before its own text (`first`) or after; a system
    message of its own when there is none."""
    if messages and messages[0].role == "system":
        own = messages[0].text
        joined = f"{text}\n\n{own}" if first else f"{own}\n\n{text}"
        return (replace(messages[0], text=joined), *messages[1:])
    return (Message(role="system", text=text), *messages)


async def _answer(
    events: AsyncIterator[EngineEvent], first: Usage, reasoning: int
) -> AsyncGenerator[EngineEvent, None]:
    """The answer pass's events, its `Finished` billed as the whole request (see the module docstring)."""
    hidden = 0  # an upstream that reasons on its own may send reasoning in the answer pass too
    async for event in events:
        if isinstance(event, TextDelta):
            hidden += event.tokens if event.reasoning else 0
            yield event
        elif isinstance(event, ToolCallDelta):
            yield event
        else:
            answer_reasoning = max(event.usage.reasoning_tokens, hidden)
            yield Finished(
                event.finish_reason,
                _usage(first, reasoning, event.usage.completion_tokens, reasoning + answer_reasoning),
            )
            return


def _usage(first: Usage, reasoning: int, answer: int, reasoning_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=first.prompt_tokens,
        completion_tokens=reasoning + answer,
        cached_tokens=first.cached_tokens,
        reasoning_tokens=reasoning_tokens,
        image_tokens=first.image_tokens,
        estimated=first.estimated,
    )


class NativeThinking(_Wrapper):
    """Moves the model's own `<think>…</think>` text out of the answer and counts it as reasoning.

    Deltas the engine already marked as reasoning pass through (the embedded engines split the tags
    themselves, upstreams send `reasoning_content`); plain text is split here, starting outside a block.
    """

    def __init__(self, inner: Engine) -> None:
        super().__init__(inner, "native")

    def count_prompt_tokens(self, request: EngineRequest) -> int:
        return self.inner.count_prompt_tokens(request)

    async def generate(self, request: EngineRequest) -> AsyncGenerator[EngineEvent, None]:
        splitter = ThinkSplitter()
        reasoning = 0
        async with aclosing(self.inner.generate(request)) as events:
            async for event in events:
                if isinstance(event, TextDelta):
                    if event.reasoning:  # the engine already separated it (an upstream's reasoning field)
                        reasoning += event.tokens
                        yield event
                        continue
                    was_inside = splitter.inside
                    parts = splitter.feed(event.text)
                    # A delta's tokens go with its first part; a delta that is only a tag is reasoning.
                    if not parts:
                        parts = [(was_inside or splitter.inside, "")]
                    reasoning += event.tokens if parts[0][0] else 0
                    for index, (hidden, text) in enumerate(parts):
                        yield TextDelta(text, reasoning=hidden, tokens=event.tokens if index == 0 else 0)
                    continue
                if isinstance(event, ToolCallDelta):
                    yield event
                    continue
                for hidden, text in splitter.flush():
                    yield TextDelta(text, reasoning=hidden, tokens=0)
                usage = replace(event.usage, reasoning_tokens=max(event.usage.reasoning_tokens, reasoning))
                yield Finished(event.finish_reason, usage)
