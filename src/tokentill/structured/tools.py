"""Tools and JSON answers on a model that only writes text (the embedded engine).

The model learns of the tools from a system message (`tools_prompt`) and calls one by writing

    <tool_call>{"name":"get_weather","arguments":{"city":"Paris"}}</tool_call>

(the Hermes / Qwen convention many small models were trained on). `constraint` compiles the grammar that
makes such a call valid: every call when `tool_choice` is required or names a function; with `auto` the
grammar is lazy and applies from `<tool_call>` on, so the model may answer in text instead. Arguments are
constrained by each function's `parameters` schema (see `grammar.py`). `ToolCallParser` turns the text back
into OpenAI's tool-call deltas as it streams; `template_messages` writes earlier calls and tool results
into the conversation as text the chat template accepts.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import replace

from tokentill.structured.grammar import GrammarBuilder, gbnf_literal, json_object_grammar
from tokentill.types import (
    EngineEvent,
    Finished,
    Grammar,
    Message,
    ResponseFormat,
    TextDelta,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
    ToolDefinition,
)

__all__ = [
    "CALL_CLOSE",
    "CALL_OPEN",
    "ToolCallParser",
    "call_text",
    "choice_line",
    "constraint",
    "new_call_id",
    "parse_tool_calls",
    "template_messages",
    "tools_prompt",
]

Item = TextDelta | ToolCallDelta

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_HEAD = '{"name":"'
_MIDDLE = '","arguments":'
_TAIL = "}" + CALL_CLOSE
MAX_PARALLEL_CALLS = 8  # calls one answer may make when parallel_tool_calls is on


def new_call_id() -> str:
    return "call_" + secrets.token_urlsafe(18).replace("-", "a").replace("_", "b")


def tools_prompt(tools: Sequence[ToolDefinition], choice: ToolChoice) -> str:
    """The system text that tells the model about `tools` (billed as prompt tokens)."""
    lines = [
        "You can call functions. To call one, write exactly",
        f'{CALL_OPEN}{{"name":"<function name>","arguments":<arguments as a JSON object>}}{CALL_CLOSE}',
        "and nothing else. The functions:",
    ]
    for tool in tools:
        entry = {"name": tool.name, "description": tool.description, "parameters": tool.parameters or {}}
        lines.append(json.dumps(entry, ensure_ascii=False, separators=(",", ":")))
    lines.append(choice_line(choice))
    return "\n".join(lines)


def choice_line(choice: ToolChoice) -> str:
    """What `tools_prompt` tells the model about calling, for `choice`."""
    if choice.mode == "required":
        return "You must call a function now."
    if choice.mode == "function":
        return f"You must call the function {choice.name} now."
    if choice.mode == "none":
        return "Do not call a function now; answer in text."
    return "Call a function only if it helps; otherwise answer in text."


def constraint(
    response_format: ResponseFormat | None,
    tools: Sequence[ToolDefinition],
    choice: ToolChoice,
    parallel: bool,
) -> Grammar | None:
    """The grammar for this request, or None; raises `invalid_json_schema` for schemas it cannot enforce.

    Tool calls take precedence when the model may call (`tool_choice` not none); a json_schema / json_object
    `response_format` then applies to a text answer only when `tool_choice` is none (with auto the text
    before a call stays free, as OpenAI's own models may also answer in text). `parallel`: several calls
    in one answer (up to MAX_PARALLEL_CALLS), else exactly one.
    """
    calling = bool(tools) and choice.mode != "none"
    if calling:
        return _tools_grammar(tools, choice, parallel)
    if response_format is None:
        return None
    if response_format.type == "json_object":
        return Grammar(json_object_grammar())
    builder = GrammarBuilder()
    root = builder.schema(response_format.schema or {}, "response_format.json_schema.schema")
    return Grammar(builder.render(root))


def _tools_grammar(tools: Sequence[ToolDefinition], choice: ToolChoice, parallel: bool) -> Grammar:
    builder = GrammarBuilder()
    alternatives = []
    for i, tool in enumerate(tools):
        if choice.mode == "function" and tool.name != choice.name:
            continue
        schema = tool.parameters if tool.parameters is not None else {"type": "object", "properties": {}}
        args = builder.schema(schema, f"tools[{i}].function.parameters")
        head = gbnf_literal(f"{CALL_OPEN}{_HEAD}{tool.name}{_MIDDLE}")
        alternatives.append(f"{head} {args} {gbnf_literal(_TAIL)}")
    call = builder.rule("call", " | ".join(f"( {a} )" for a in alternatives))
    more = f' ( "\\n" {call} ){{0,{MAX_PARALLEL_CALLS - 1}}}' if parallel else ""  # see `constraint`
    lazy = choice.mode == "auto"
    return Grammar(builder.render(f"{call}{more}"), triggers=(CALL_OPEN,) if lazy else ())


class ToolCallParser:
    """Visible answer text in, text and `ToolCallDelta`s out, as the model writes calls (streaming).

    The grammar guarantees the exact form `<tool_call>{"name":"N","arguments":ARGS}</tool_call>`; text
    that could still become `<tool_call>` is held back until decided. Arguments stream as written, minus
    the closing `}</tool_call>` (held back while it might be that). Billing: every `tokens` fed comes out
    on exactly one returned item (the first of the call's results, or an empty text).
    """

    def __init__(self) -> None:
        self._buffer = ""
        self._state = "text"  # text | head | name | middle | args
        self._name = ""
        self.calls = 0

    def feed(self, text: str, tokens: int) -> list[Item]:
        out: list[Item] = []
        self._buffer += text
        while self._step(out):
            pass
        return _with_tokens(out, tokens)

    def finish(self) -> list[Item]:
        """Whatever is held back, when the answer ends (a cut-short call keeps its partial arguments)."""
        rest, self._buffer = self._buffer, ""
        if not rest:
            return []
        if self._state == "text":
            return [TextDelta(rest, tokens=0)] if rest.strip() else []
        if self._state == "args" and not _TAIL.startswith(rest):  # cut short inside the arguments
            return [ToolCallDelta(self.calls - 1, arguments=rest, tokens=0)]
        return []

    def _step(self, out: list[Item]) -> bool:
        buf = self._buffer
        if self._state == "text":
            at = buf.find(CALL_OPEN)
            if at < 0:
                # Whitespace waits for what follows: between or after calls it is not an answer.
                keep = len(buf) if not buf.strip() else _partial(buf, CALL_OPEN)
                if len(buf) > keep:
                    out.append(TextDelta(buf[: len(buf) - keep], tokens=0))
                self._buffer = buf[len(buf) - keep :]
                return False
            if at > 0 and buf[:at].strip():
                out.append(TextDelta(buf[:at], tokens=0))
            self._buffer, self._state = buf[at + len(CALL_OPEN) :], "head"
            return True
        if self._state == "head":
            if len(buf) < len(_HEAD):
                return False
            self._buffer, self._state = buf[len(_HEAD) :], "name"
            return True
        if self._state == "name":
            end = buf.find('"')
            if end < 0:
                return False
            self._name, self._buffer, self._state = buf[:end], buf[end + 1 :], "middle"
            out.append(ToolCallDelta(self.calls, id=new_call_id(), name=self._name, tokens=0))
            self.calls += 1
            return True
        if self._state == "middle":
            if len(buf) < len(_MIDDLE) - 1:
                return False
            self._buffer, self._state = buf[len(_MIDDLE) - 1 :], "args"
            return True
        at = buf.find(_TAIL)
        if at >= 0:
            if at:
                out.append(ToolCallDelta(self.calls - 1, arguments=buf[:at], tokens=0))
            self._buffer, self._state = buf[at + len(_TAIL) :].lstrip("\n"), "text"
            return True
        keep = _partial(buf, _TAIL)
        if len(buf) > keep:
            out.append(ToolCallDelta(self.calls - 1, arguments=buf[: len(buf) - keep], tokens=0))
        self._buffer = buf[len(buf) - keep :]
        return False


def _with_tokens(items: list[Item], tokens: int) -> list[Item]:
    """The token count goes on the first item; a token that produced nothing yet is an empty text."""
    if not items:
        return [TextDelta("", tokens=tokens)]
    return [replace(items[0], tokens=tokens), *items[1:]]


def _partial(text: str, tag: str) -> int:
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return size
    return 0


def call_text(call: ToolCall) -> str:
    """An earlier call as the model would have written it."""
    arguments = call.arguments.strip() or "{}"
    return f"{CALL_OPEN}{_HEAD}{call.name}{_MIDDLE}{arguments}{_TAIL}"


def template_messages(
    messages: Sequence[Message], tools: Sequence[ToolDefinition], choice: ToolChoice
) -> tuple[Message, ...]:
    """The conversation as a chat template that knows nothing of tools can render it.

    The tools' description joins the (first) system message; an assistant turn's calls are written as the
    model writes them; a tool result becomes a user turn `<tool_response>…</tool_response>` (many
    templates refuse the role `tool`).
    """
    out: list[Message] = []
    for message in messages:
        if message.role == "tool":
            text = f"<tool_response>\n{message.text}\n</tool_response>"
            out.append(replace(message, role="user", text=text, tool_call_id=None))
        elif message.tool_calls:
            calls = "\n".join(call_text(call) for call in message.tool_calls)
            text = f"{message.text}\n{calls}" if message.text else calls
            out.append(replace(message, text=text, tool_calls=()))
        else:
            out.append(message)
    if tools:
        prompt = tools_prompt(tools, choice)
        if out and out[0].role == "system":
            out[0] = replace(out[0], text=f"{out[0].text}\n\n{prompt}" if out[0].text else prompt)
        else:
            out.insert(0, Message(role="system", text=prompt))
    return tuple(out)


async def parse_tool_calls(events: AsyncIterator[EngineEvent]) -> AsyncGenerator[EngineEvent, None]:
    """`events` with the calls written in the answer text turned into `ToolCallDelta`s; a finish after
    at least one call is `tool_calls`. Reasoning deltas pass through untouched."""
    parser = ToolCallParser()
    async for event in events:
        if isinstance(event, TextDelta) and not event.reasoning:
            for item in parser.feed(event.text, event.tokens):
                yield item
        elif isinstance(event, Finished):
            for item in parser.finish():
                yield item
            if parser.calls and event.finish_reason == "stop":
                event = replace(event, finish_reason="tool_calls")
            yield event
        else:
            yield event
