"""The engine interface: what the service hands an engine and what comes back.

An engine turns an `EngineRequest` into a stream of `EngineEvent`s (`tokentill.types`): zero or more
`TextDelta`s and `ToolCallDelta`s, then exactly one `Finished` carrying the usage. Engines know nothing of
keys, credits or storage; they raise the `tokentill.errors` server errors (`Overloaded` 503,
`DeadlineExceeded` 504, `UpstreamError` 502, `InvalidRequest` with code `context_length_exceeded`) and stop
work promptly when the consumer stops iterating (that is how a client disconnect reaches the decode loop)."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Protocol, cast, runtime_checkable

from tokentill.errors import DeadlineExceeded
from tokentill.types import EngineEvent, Grammar, Message, ResponseFormat, ToolChoice, ToolDefinition

__all__ = [
    "THINK_CLOSE",
    "THINK_OPEN",
    "Capabilities",
    "Engine",
    "EngineHealth",
    "EngineRequest",
    "FollowUp",
    "engine_health",
]

# The tags that `native` reasoning models write around their thinking.
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


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
    # When the request began (time.monotonic()); each pass is a `replace()` of the first and keeps it.
    started: float = field(default_factory=time.monotonic)
    # A second pass that continues this one in the same sequence (engines with `Capabilities.follow_up`).
    follow_up: FollowUp | None = None

    def deadline_error(self) -> DeadlineExceeded:
        """The 504 for this request: its time counts from `started`, so every pass is included."""
        return DeadlineExceeded(f"The request timed out after {self.deadline - self.started:.1f} seconds.")


@dataclass(frozen=True)
class FollowUp:
    """A pass that continues a request's first pass in the same KV sequence (the scratchpad's answer).

    The first pass's output becomes an assistant turn followed by `after`; only the template's text
    after that output is evaluated, so the prompt and the output are never read again. The engine
    yields the first pass's events and its `Finished`, then, when any of `max_tokens` is left, the
    follow-up's events and its `Finished`. It may decline a follow-up (a template that renders the earlier
    turns differently once a later one exists, or no room left in the context): then its generator ends
    after the first `Finished` and the caller runs the second pass as a request of its own.
    The follow-up samples like the first pass except for what is given here.
    """

    after: tuple[Message, ...]
    max_tokens: int  # completion budget of both passes together
    stop: tuple[str, ...] = ()
    grammar: Grammar | None = None
    tool_choice: ToolChoice = ToolChoice()  # the follow-up's own (the tools are the first pass's)


@dataclass(frozen=True)
class Capabilities:
    context_length: int
    vision: bool = False
    reasoning: str = "none"  # none | native | scratchpad
    exact_prompt_tokens: bool = True  # False: count_prompt_tokens is an estimate (remote tokenizer)
    # True: the engine samples under `EngineRequest.grammar` and writes tools into the prompt itself;
    # False: it relays `response_format` and `tools` to a server that enforces them.
    grammar: bool = False
    follow_up: bool = False  # True: honours `EngineRequest.follow_up` (else it must not be set)
    # True: a generation begins with a network request (an upstream server), which `ChatService.prepare`
    # sends while the credit hold commits; its first event may be fetched in another task than the rest.
    early_start: bool = False
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


@dataclass(frozen=True)
class EngineHealth:
    """What the operator console shows of an engine in this process: replicas that answer (1 of 1 for an
    embedded model once loaded), requests waiting for a slot, requests being generated, and the CPU
    threads it decodes with now (embedded llama.cpp only; it adapts them to the machine's load)."""

    replicas_up: int
    replicas: int
    queued: int
    running: int
    threads: int | None = None


def engine_health(engine: object) -> EngineHealth | None:
    """`engine.health()` for engines that report it (an optional method, not part of `Engine`), else None."""
    report = getattr(engine, "health", None)
    return cast(Callable[[], EngineHealth], report)() if callable(report) else None
