"""The upstream engine's wire format: the request we send, the chunks we read, the errors we map.

Pure functions and one small accumulator, no I/O, so every rule here is visible in one place:

- `build_payload`: an OpenAI chat request rebuilt from our validated `EngineRequest` (never the client's
  raw body). Images go as `data:` URIs of the bytes our media layer already fetched and validated, so the
  upstream never fetches a URL. `stream` and `stream_options.include_usage` are always set.
- `estimate_prompt_tokens`: a deliberately high guess, because we cannot run a remote model's tokenizer.
- `StreamState`: folds streamed chunks (or one non-streamed completion) into `TextDelta`s and a final
  `Usage`, counting for ourselves when the upstream reports no usage (then `Usage.estimated` is true).
- `coalesce`: the pieces of the chunks that arrived in one read as deltas, each run of one kind joined
  into one delta that carries its tokens.
- `error_for_status`: an upstream HTTP error answer → the `tokentill.errors` class the client should see.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import re
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from tokentill import errors
from tokentill.engines.base import EngineRequest
from tokentill.types import FinishReason, Message, TextDelta, ToolCallDelta, Usage

__all__ = [
    "IMAGE_TOKEN_ALLOWANCE",
    "Piece",
    "StreamState",
    "build_payload",
    "coalesce",
    "error_for_status",
    "estimate_prompt_tokens",
    "BadAnswer",
    "parse_json",
    "rejects_max_tokens",
]

log = logging.getLogger(__name__)

BYTES_PER_TOKEN = 3  # real tokenizers average ~4 bytes of English per token: /3 over-counts on purpose
TOKENS_PER_MESSAGE = 8  # role markers and separators of any chat template
TOKENS_PER_REQUEST = 48  # the assistant prefix plus a default system prompt some templates inject
IMAGE_TOKEN_ALLOWANCE = 1000  # vision encoders use roughly 256–1500 tokens per image
# stop, content_filter, anything else → "stop"
_FINISH: dict[str, FinishReason] = {"length": "length", "tool_calls": "tool_calls"}
Delta = TextDelta | ToolCallDelta
Piece = tuple[bool, str] | ToolCallDelta
"""What one streamed delta adds, one token: a text as (reasoning, text), or a tool call's fragment. Folding
makes pieces and `coalesce` makes deltas of them, so text that arrives together is one delta, made once."""


def estimate_prompt_tokens(request: EngineRequest) -> int:
    """A conservative (high) prompt token count for a model whose tokenizer we do not have.

    UTF-8 bytes of all message text / 3 rounded up, plus 8 per message, 48 per request and 1000 per
    image. The hold is priced on this; billing uses the upstream's own count when it reports one.
    """
    total = TOKENS_PER_REQUEST
    for message in request.messages:
        total += math.ceil(len(message.text.encode("utf-8")) / BYTES_PER_TOKEN) + TOKENS_PER_MESSAGE
        total += IMAGE_TOKEN_ALLOWANCE * len(message.images)
        for call in message.tool_calls:
            total += math.ceil(len((call.name + call.arguments).encode("utf-8")) / BYTES_PER_TOKEN)
    for tool in request.tools:  # the server writes the tools into the prompt: they are prompt tokens
        total += math.ceil(len(json.dumps(tool.raw).encode("utf-8")) / BYTES_PER_TOKEN)
    if request.response_format is not None:
        total += math.ceil(len(json.dumps(request.response_format.raw).encode("utf-8")) / BYTES_PER_TOKEN)
    return total


def _content(message: Message) -> str | list[dict[str, Any]]:
    """A string without images; else the parts in the order the client sent them (`Message.pieces`)."""
    if not message.images:
        return message.text
    parts: list[dict[str, Any]] = []
    for piece in message.pieces():
        if isinstance(piece, str):
            parts.append({"type": "text", "text": piece})
        else:
            uri = f"data:{piece.mime};base64,{base64.b64encode(piece.data).decode('ascii')}"
            parts.append({"type": "image_url", "image_url": {"url": uri, "detail": piece.detail}})
    return parts


def build_payload(
    request: EngineRequest, *, model: str, reasoning: str, send_max_tokens: bool = True
) -> dict[str, Any]:
    """The JSON body for `POST {base}/chat/completions`.

    The budget goes out as both `max_completion_tokens` (OpenAI's current name; o-series models accept
    only it) and `max_tokens` (the name llama-server, llama-cpp-python and older vLLM/Ollama read; servers
    built on pydantic ignore the name they do not know). `send_max_tokens=False` drops the old name, for
    an upstream that rejected it. `reasoning_effort` is sent only for `reasoning = "native"` (the upstream
    model reasons itself); `scratchpad` runs its own passes in front of a model that may refuse it.
    """
    payload: dict[str, Any] = {
        "model": model,
        "messages": [_message(m) for m in request.messages],
        "max_completion_tokens": request.max_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if send_max_tokens:
        payload["max_tokens"] = request.max_tokens
    if request.seed is not None:
        payload["seed"] = request.seed
    if request.stop:
        payload["stop"] = list(request.stop)
    if request.logit_bias:
        payload["logit_bias"] = {str(token): bias for token, bias in request.logit_bias}
    if request.frequency_penalty:
        payload["frequency_penalty"] = request.frequency_penalty
    if request.presence_penalty:
        payload["presence_penalty"] = request.presence_penalty
    if reasoning == "native":
        payload["reasoning_effort"] = request.reasoning_effort
    # Structured output and tools go as the client sent them: the upstream server enforces them.
    if request.response_format is not None:
        payload["response_format"] = request.response_format.raw
    if request.tools:
        payload["tools"] = [tool.raw for tool in request.tools]
        if request.tool_choice.raw is not None:
            payload["tool_choice"] = request.tool_choice.raw
        elif request.tool_choice.mode == "none":  # a pass that must not call (the scratchpad's notes)
            payload["tool_choice"] = "none"
        if request.parallel_tool_calls is not None:
            payload["parallel_tool_calls"] = request.parallel_tool_calls
    return payload


def _message(message: Message) -> dict[str, Any]:
    out: dict[str, Any] = {"role": message.role, "content": _content(message)}
    if message.tool_calls:
        out["content"] = message.text or None
        out["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in message.tool_calls
        ]
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    return out


def parse_json(data: str | bytes) -> dict[str, Any] | None:
    """`data` as a JSON object, or None if it is anything else.

    orjson parses several times faster than the standard library; what it refuses (NaN, lone surrogate
    escapes, invalid UTF-8, which is read as U+FFFD) falls back to `json`, so nothing is refused that
    `json` accepts. One difference in values: orjson reads an integer past 64 bits as a float, which the
    usage checks refuse (`_int`) like any other non-integer count; no real count comes near it.
    """
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError:
        text = data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):
            return None
    return value if isinstance(value, dict) else None


class BadAnswer(Exception):
    """The upstream's answer does not follow the OpenAI protocol (the caller maps it to a 502)."""


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise BadAnswer(f"usage field is not a non-negative integer: {value!r}")
    return value


@dataclass
class StreamState:
    """Everything learnt from one upstream answer so far.

    `deltas` counts the non-empty text deltas received: with no upstream usage it becomes the completion
    token count (servers stream about one token per delta; it is an estimate and is marked as one).
    `max_tokens` is the request's completion budget: a streamed delta past it is dropped and `cut` set
    (an upstream that ignores the budget), and no usage we report exceeds it.
    """

    prompt_estimate: int
    max_tokens: int
    deltas: int = 0
    reasoning_deltas: int = 0
    finish_reason: FinishReason | None = None
    usage: dict[str, Any] | None = None
    done: bool = False
    cut: bool = False
    _seen_choice: bool = field(default=False, repr=False)

    def chunk(self, obj: dict[str, Any]) -> list[Delta]:
        """Fold one `chat.completion.chunk`; returns its text as deltas (reasoning ones flagged)."""
        pieces: list[Piece] = []
        self.fold(obj, pieces)
        return coalesce(pieces)

    def fold(self, obj: dict[str, Any], pieces: list[Piece]) -> None:
        """Fold one `chat.completion.chunk`, appending what it adds to `pieces` (see `coalesce`)."""
        self._fold(obj, pieces, streamed=True)

    def _fold(self, obj: dict[str, Any], out: list[Piece], *, streamed: bool) -> None:
        if "error" in obj:
            raise BadAnswer(f"error event in the stream: {str(obj['error'])[:300]}")
        usage = obj.get("usage")
        if isinstance(usage, dict):  # the last non-null one wins (vLLM may send usage on every chunk)
            self.usage = usage
        choices = obj.get("choices")
        if not isinstance(choices, list):
            if self.finish_reason is not None:
                return  # after the answer: a usage-only chunk that omits `choices`, or a trailer
            raise BadAnswer("chunk without a choices list")
        for choice in choices:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            self._seen_choice = True
            delta = choice.get("delta") or {}
            if not isinstance(delta, dict):
                raise BadAnswer("choice delta is not an object")
            self._texts(delta, out, streamed=streamed)
            if "tool_calls" in delta:
                self._tool_calls(delta, out, streamed=streamed)
            if self.cut:
                self.finish_reason = "length"
                return
            reason = choice.get("finish_reason")
            if isinstance(reason, str):
                self.finish_reason = _FINISH.get(reason, "stop")

    def completion(self, obj: dict[str, Any]) -> list[Delta]:
        """Fold a whole non-streamed `chat.completion` (an upstream that ignored `stream: true`)."""
        choices = obj.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise BadAnswer("completion without choices")
        message = choices[0].get("message")
        if not isinstance(message, dict):
            raise BadAnswer("completion choice without a message")
        delta_like = {k: message.get(k) for k in ("content", "reasoning_content", "reasoning")}
        calls = message.get("tool_calls")
        if isinstance(calls, list):
            delta_like["tool_calls"] = [
                {"index": i, **c} if isinstance(c, dict) else c for i, c in enumerate(calls)
            ]
        reason = choices[0].get("finish_reason")
        # One delta per field, not per token: the budget is enforced on the reported usage instead.
        pieces: list[Piece] = []
        self._fold({"choices": [{"delta": delta_like, "finish_reason": reason}]}, pieces, streamed=False)
        if isinstance(obj.get("usage"), dict):
            self.usage = obj["usage"]
        self.done = True
        return coalesce(pieces)

    def _tool_calls(self, delta: dict[str, Any], out: list[Piece], *, streamed: bool) -> None:
        """Append `delta.tool_calls` entries to `out` as they came (index, id, name, argument fragments)."""
        calls = delta.get("tool_calls")
        if calls is None:
            return
        if not isinstance(calls, list):
            raise BadAnswer("delta tool_calls is not a list")
        for call in calls:
            if not isinstance(call, dict):
                raise BadAnswer("a tool call delta is not an object")
            function = call.get("function")
            function = function if isinstance(function, dict) else {}
            index, call_id = call.get("index", 0), call.get("id")
            name, arguments = function.get("name"), function.get("arguments") or ""
            if (
                isinstance(index, bool)
                or not isinstance(index, int)
                or index < 0
                or not isinstance(call_id, str | None)
                or not isinstance(name, str | None)
                or not isinstance(arguments, str)
            ):
                raise BadAnswer(f"malformed tool call delta: {str(call)[:200]}")
            if streamed and self.deltas >= self.max_tokens:
                self.cut = True
                break
            self.deltas += 1
            out.append(ToolCallDelta(index, id=call_id, name=name, arguments=arguments))

    def _texts(self, delta: dict[str, Any], out: list[Piece], *, streamed: bool) -> None:
        """Append the delta's reasoning text, then its content, to `out`."""
        reasoning_text = delta.get("reasoning_content")
        if not (reasoning_text and isinstance(reasoning_text, str)):
            reasoning_text = delta.get("reasoning")  # servers that send both send the same text twice
        if not isinstance(reasoning_text, str):
            reasoning_text = None
        text = delta.get("content")
        if text is not None and not isinstance(text, str):
            raise BadAnswer("delta content is not a string")
        for piece, reasoning in ((reasoning_text, True), (text, False)):
            if not piece:
                continue
            if streamed and self.deltas >= self.max_tokens:
                self.cut = True  # every streamed delta is at least one token: the budget is spent
                break
            self.deltas += 1
            self.reasoning_deltas += int(reasoning)
            out.append((reasoning, piece))

    def final_usage(self) -> Usage:
        """The upstream's usage if it sent one, else our own count marked `estimated`; never over budget.

        A usage object that leaves out `prompt_tokens` or `completion_tokens` gets our count for it (and
        is `estimated`); one whose counts are not non-negative integers raises `BadAnswer`.
        """
        if self.usage is None or self.cut:
            completion = min(self.deltas, self.max_tokens)
            return Usage(
                prompt_tokens=self.prompt_estimate,
                completion_tokens=completion,
                reasoning_tokens=min(self.reasoning_deltas, completion),
                estimated=True,
            )
        usage = self.usage
        prompt = _int(usage["prompt_tokens"]) if "prompt_tokens" in usage else self.prompt_estimate
        completion = _int(usage["completion_tokens"]) if "completion_tokens" in usage else self.deltas
        details = self.usage.get("completion_tokens_details") or {}
        prompt_details = self.usage.get("prompt_tokens_details") or {}
        reported = _int(details.get("reasoning_tokens") or 0) if isinstance(details, dict) else 0
        cached = _int(prompt_details.get("cached_tokens") or 0) if isinstance(prompt_details, dict) else 0
        if completion > self.max_tokens:
            log.warning(
                "upstream reported %d completion tokens for a budget of %d; billing the budget",
                completion,
                self.max_tokens,
            )
            completion = self.max_tokens
        return Usage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            cached_tokens=min(cached, prompt),
            # vLLM/SGLang stream reasoning_content but may not report reasoning_tokens: count the deltas
            reasoning_tokens=min(completion, max(reported, self.reasoning_deltas)),
            estimated=not ("prompt_tokens" in usage and "completion_tokens" in usage),
        )

    @property
    def started(self) -> bool:
        return self._seen_choice


def coalesce(pieces: list[Piece], *, content: bool = True) -> list[Delta]:
    """`pieces` (those of the chunks one read brought) as deltas: each run of texts of one kind (reasoning
    or not) is one `TextDelta`, each run of one tool call's fragments one `ToolCallDelta`, carrying the
    run's tokens (one per piece), so what is billed does not change.

    Chunks arrive together when the gateway reads slower than the upstream writes (a loaded gateway, a
    fast upstream): passing one delta on instead of many is what lets it catch up, and a streaming client
    gets the same text in fewer chunks, none later. `content=False` leaves answer text (not reasoning)
    one delta per piece: an entry whose model writes its reasoning as `<think>` tags in the answer is
    split by `reasoning.NativeThinking`, which counts reasoning tokens by delta.
    """
    out: list[Delta] = []
    start, end = 0, len(pieces)
    while start < end:
        first = pieces[start]
        stop = start + 1
        if isinstance(first, tuple):
            reasoning = first[0]
            if content or reasoning:
                while stop < end and isinstance(piece := pieces[stop], tuple) and piece[0] == reasoning:
                    stop += 1
            run = pieces[start:stop]
            text = first[1] if stop == start + 1 else "".join(p[1] for p in run if isinstance(p, tuple))
            out.append(TextDelta(text, reasoning=reasoning, tokens=stop - start))
        else:
            while stop < end and _continues(first, pieces[stop]):
                stop += 1
            if stop == start + 1:
                out.append(first)
            else:
                calls = [p for p in pieces[start:stop] if isinstance(p, ToolCallDelta)]
                arguments = "".join(call.arguments for call in calls)
                out.append(replace(first, arguments=arguments, tokens=sum(call.tokens for call in calls)))
        start = stop
    return out


def _continues(call: ToolCallDelta, piece: Piece) -> bool:
    """Whether `piece` is a later fragment of `call` (same index, naming no new call)."""
    return (
        isinstance(piece, ToolCallDelta)
        and piece.index == call.index
        and piece.id is None
        and piece.name is None
    )


# 400 codes of DESIGN §3 an upstream's own code may pass through as; any other code becomes invalid_value.
_CLIENT_CODES = frozenset(
    {
        "invalid_value",
        "invalid_type",
        "missing_required_parameter",
        "unknown_parameter",
        "unsupported_parameter",
        "unsupported_value",
        "context_length_exceeded",
        "invalid_image_url",
        "invalid_image",
        "image_input_unsupported",
    }
)
# vLLM ("maximum context length is"), SGLang ("longer than the model's context length"), llama-server
# ("exceeds the available context size"), Ollama and others say it in words, with a numeric or no code.
_CONTEXT_WORDS = re.compile(r"context (length|size|window)|too many tokens|prompt is too long", re.I)


def _envelope(body: bytes) -> dict[str, Any] | None:
    """The error object of an upstream error answer: OpenAI's `{"error": {...}}`, the top-level
    `{"object": "error", "message": ...}` of SGLang and older vLLM, or `{"error": "text"}` (Ollama)."""
    obj = parse_json(body)
    if obj is None:
        return None
    error = obj.get("error")
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error
    if isinstance(error, str) and error:
        return {"message": error}
    if obj.get("object") == "error" and isinstance(obj.get("message"), str):
        return obj
    return None


def _client_error(envelope: dict[str, Any]) -> errors.InvalidRequest:
    message: str = envelope["message"][:2000] or "The upstream model rejected the request as invalid."
    code, param, kind = envelope.get("code"), envelope.get("param"), envelope.get("type")
    if (
        code == "context_length_exceeded"
        or kind == "exceed_context_size_error"
        or _CONTEXT_WORDS.search(message)
    ):
        return errors.InvalidRequest(message, code="context_length_exceeded", param="messages")
    return errors.InvalidRequest(
        message,
        code=code if isinstance(code, str) and code in _CLIENT_CODES else "invalid_value",
        param=param if isinstance(param, str) and param else None,
    )


def error_for_status(status: int, body: bytes, retry_after: str | None, *, where: str) -> errors.APIError:
    """The error our client sees for an upstream answer with HTTP `status` (>= 400) before any output.

    400/413/422 are the client's fault (context length, a value the upstream refuses): passed through as
    400 with the upstream's message and param (see `_envelope` for the shapes understood); its code when it
    is one of ours, `context_length_exceeded` when the message says so, else `invalid_value`. 429 becomes
    503 overloaded with Retry-After. 401/403/404 are the operator's configuration (upstream key, model
    name): logged loudly, 502 with a generic message. Anything else is a 502. `where` names model and
    replica for logs.
    """
    envelope = _envelope(body)
    if status in (400, 413, 422):
        if envelope is not None:
            return _client_error(envelope)
        return errors.InvalidRequest("The upstream model rejected the request as invalid.")
    if status == 429:
        try:
            seconds = float(retry_after) if retry_after else 1.0
        except ValueError:  # an HTTP-date, or nonsense
            seconds = 1.0
        if not math.isfinite(seconds):  # "nan" and "inf" parse as floats
            seconds = 1.0
        return errors.Overloaded(
            "The upstream model is over capacity; retry shortly.", retry_after_s=min(max(seconds, 1.0), 60.0)
        )
    if status in (401, 403):
        log.error("upstream %s refused our credentials (HTTP %d): check the entry's api_key", where, status)
    elif status == 404:
        log.error("upstream %s answered 404: check base_url and upstream_model", where)
    else:
        log.warning("upstream %s answered HTTP %d: %s", where, status, body[:300])
    return errors.UpstreamError("Bad gateway: the upstream model service failed; please try again later.")


def rejects_max_tokens(status: int, body: bytes) -> bool:
    """True for OpenAI's answer to `max_tokens` on o-series models (use max_completion_tokens instead)."""
    envelope = _envelope(body)
    return status == 400 and envelope is not None and envelope.get("param") == "max_tokens"
