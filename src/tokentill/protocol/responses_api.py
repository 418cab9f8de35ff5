"""OpenAI's Responses API request (`POST /v1/responses`), and its translation into a chat completion.

A Responses request is another spelling of a chat: `instructions` is a system message, `input` a string
(one user message) or a list of items — messages (`input_text` / `input_image` / `output_text` parts),
`function_call` items (an assistant turn's tool calls), `function_call_output` items (tool messages) and
`reasoning` items (the model's own notes handed back: dropped, as the notes are hidden and re-made).
`to_chat` builds the chat completion body that every chat check, the lifecycle and the engines already
take; `chat_param` names a chat error's parameter the way this request spelled it.

Validation is as strict as chat's: unknown keys are refused by name, parameters OpenAI has and this
service does not implement are accepted only with their neutral value. Errors name JSON paths of this
request (`input[1].content[0].image_url`).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    Tag,
    ValidationError,
)

from tokentill.errors import InvalidRequest
from tokentill.protocol.chat import (
    MAX_CONTENT_PARTS,
    MAX_TOKENS,
    MAX_USER_CHARS,
    ChatCompletionRequest,
    JSONObjectFormat,
    NamedFunction,
    deepest_error,
    invalid_request,
    known_arguments,
    load_json_body,
    parse_chat_request,
)
from tokentill.protocol.chat import TextFormat as TextFormatText

__all__ = [
    "MAX_INPUT_ITEMS",
    "ResponsesRequest",
    "chat_param",
    "continued",
    "decode_responses_body",
    "input_messages",
    "parse_responses_request",
    "to_chat",
]

MAX_INPUT_ITEMS = 2048  # as chat's MAX_MESSAGES: the cost of validating one body stays bounded
_EFFORT = {"minimal": "low", "low": "low", "medium": "medium", "high": "high"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class InputText(_Strict):
    type: Literal["input_text"]
    text: StrictStr


class InputImage(_Strict):
    type: Literal["input_image"]
    image_url: StrictStr | None = None
    file_id: StrictStr | None = None
    detail: Literal["low", "high", "auto"] = "auto"


class OutputText(_Strict):
    """An earlier answer's text, as the client hands `response.output` back in."""

    type: Literal["output_text"]
    text: StrictStr
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None


class RefusalPart(_Strict):
    type: Literal["refusal"]
    refusal: StrictStr


ContentPart = Annotated[InputText | InputImage | OutputText | RefusalPart, Field(discriminator="type")]


class MessageItem(_Strict):
    type: Literal["message"] | None = None  # an "easy input message" has no type
    role: Literal["user", "system", "developer", "assistant"]
    content: StrictStr | list[ContentPart]
    id: StrictStr | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None
    phase: Literal["commentary", "final_answer"] | None = None


class FunctionCallItem(_Strict):
    type: Literal["function_call"]
    call_id: StrictStr
    name: StrictStr
    arguments: StrictStr
    id: StrictStr | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class FunctionCallOutputItem(_Strict):
    type: Literal["function_call_output"]
    call_id: StrictStr
    output: StrictStr
    id: StrictStr | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class ReasoningItem(_Strict):
    type: Literal["reasoning"]
    id: StrictStr | None = None
    summary: list[Any] = Field(default_factory=list)
    content: list[Any] | None = None
    encrypted_content: StrictStr | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


def _item_kind(value: Any) -> str:
    if isinstance(value, dict):
        kind = value.get("type", "message")
        return kind if isinstance(kind, str) else "?"
    return "?"


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[ReasoningItem, Tag("reasoning")],
    Discriminator(_item_kind),
]


class FunctionTool(_Strict):
    """A function tool, flat: chat's `function` object with `type` beside its fields (`type` first, so a
    tool of another kind is refused for its type, not for a missing name)."""

    type: Literal["function"]
    name: StrictStr
    description: StrictStr | None = None
    parameters: dict[StrictStr, Any] | None = None
    strict: StrictBool | None = None


class FunctionChoice(NamedFunction):
    type: Literal["function"]


class TextFormatJSONSchema(_Strict):
    type: Literal["json_schema"]
    name: StrictStr
    schema_: dict[StrictStr, Any] = Field(alias="schema")
    description: StrictStr | None = None
    strict: StrictBool | None = None


TextFormat = Annotated[TextFormatText | JSONObjectFormat | TextFormatJSONSchema, Field(discriminator="type")]


class TextConfig(_Strict):
    format: TextFormat | None = None
    verbosity: Literal["medium"] | None = None  # the only length this service writes


class ReasoningConfig(_Strict):
    effort: Literal["minimal", "low", "medium", "high"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None  # OpenAI's older spelling

    @property
    def summary_mode(self) -> str | None:
        return self.summary or self.generate_summary


class ResponsesStreamOptions(_Strict):
    include_obfuscation: StrictBool | None = None  # nothing is obfuscated here; accepted and ignored


class ResponsesRequest(_Strict):
    model: StrictStr
    input: StrictStr | list[InputItem]
    instructions: StrictStr | None = None
    max_output_tokens: StrictInt | None = Field(default=None, ge=1, le=MAX_TOKENS)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: StrictBool | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    stream: StrictBool | None = None
    stream_options: ResponsesStreamOptions | None = None
    store: StrictBool | None = None
    previous_response_id: StrictStr | None = Field(default=None, max_length=64)
    metadata: dict[StrictStr, StrictStr] | None = None
    user: StrictStr | None = Field(default=None, max_length=MAX_USER_CHARS)
    safety_identifier: StrictStr | None = Field(default=None, max_length=MAX_USER_CHARS)

    @property
    def stored(self) -> bool:
        """`store` defaults to true, as at OpenAI."""
        return self.store is not False

    @property
    def summary_mode(self) -> str | None:
        return self.reasoning.summary_mode if self.reasoning is not None else None


# OpenAI parameters we know but do not implement: accepted only with their neutral value.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "background": (None, False),
    "include": (None, []),
    "service_tier": (None, "auto", "default"),
    "truncation": (None, "disabled"),
    "top_logprobs": (None, 0),
    "max_tool_calls": (None,),
    "prompt": (None,),
    "conversation": (None,),
    "prompt_cache_key": (None,),
}
_KNOWN = set(ResponsesRequest.model_fields)


def decode_responses_body(raw: bytes) -> tuple[Any, ResponsesRequest]:
    """Raw request bytes → (decoded JSON, validated request); every failure is an `InvalidRequest`.
    Pure CPU work with no I/O, so the API runs it in a worker thread for large bodies."""
    payload = load_json_body(raw)
    return payload, parse_responses_request(payload)


def parse_responses_request(body: Any) -> ResponsesRequest:
    """Validate a decoded JSON body; every failure is an `InvalidRequest` naming the parameter."""
    known = known_arguments(body, _KNOWN, _NEUTRAL)
    _check_sizes(known.get("input"))
    try:
        request = ResponsesRequest.model_validate(known)
    except ValidationError as exc:
        error = deepest_error(exc)
        message = None
        if error["type"] == "union_tag_invalid" and len(error["loc"]) == 2:  # an item kind not taken
            kind = (error.get("ctx") or {}).get("tag")
            message = (
                f"Invalid value: '{kind}'. Supported values are: 'message', 'function_call', "
                "'function_call_output' and 'reasoning'."
            )
        raise invalid_request(error, _without_item_tags(error["loc"]), message) from exc
    _check(request)
    return request


def _check_sizes(items: Any) -> None:
    """Refuse oversized `input` before validation, whose cost grows with it (as chat's `_check_sizes`)."""
    if not isinstance(items, list):
        return
    if len(items) > MAX_INPUT_ITEMS:
        raise InvalidRequest(
            f"Invalid 'input': array too long. Expected an array with maximum length {MAX_INPUT_ITEMS}, "
            f"but got an array with length {len(items)} instead.",
            code="invalid_value",
            param="input",
        )
    parts = 0
    for i, item in enumerate(items):
        content = item.get("content") if isinstance(item, dict) else None
        parts += len(content) if isinstance(content, list) else 0
        if parts > MAX_CONTENT_PARTS:
            raise InvalidRequest(
                f"Invalid 'input[{i}].content': a request takes at most {MAX_CONTENT_PARTS} content parts "
                "in all.",
                code="invalid_value",
                param=f"input[{i}].content",
            )


_ITEM_TAGS = {"message", "function_call", "function_call_output", "reasoning", "?"}


def _without_item_tags(loc: tuple[int | str, ...]) -> tuple[int | str, ...]:
    """pydantic's location less the item kind it inserts after `input[i]` (not a key of the item)."""
    return tuple(
        part
        for k, part in enumerate(loc)
        if not (k >= 2 and loc[0] == "input" and k == 2 and isinstance(loc[1], int) and part in _ITEM_TAGS)
    )


def _check(request: ResponsesRequest) -> None:
    if request.stream_options is not None and not request.stream:
        raise InvalidRequest(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            code="invalid_value",
            param="stream_options",
        )
    for i, item in enumerate(request.input if isinstance(request.input, list) else ()):
        if not isinstance(item, MessageItem) or isinstance(item.content, str):
            continue
        for j, part in enumerate(item.content):
            where = f"input[{i}].content[{j}]"
            if isinstance(part, InputImage):
                if part.image_url is None:
                    raise InvalidRequest(
                        "Images are taken as `image_url` (an https URL or a data URI); uploaded files "
                        "(`file_id`) are not supported.",
                        code="unsupported_value"
                        if part.file_id is not None
                        else "missing_required_parameter",
                        param=f"{where}.image_url",
                    )
                if item.role != "user":
                    raise InvalidRequest(
                        f"Image content is only allowed in user messages, not '{item.role}'.",
                        code="invalid_value",
                        param=where,
                    )
            elif isinstance(part, OutputText | RefusalPart) and item.role != "assistant":
                raise InvalidRequest(
                    f"Invalid value: '{part.type}'. Supported values are: 'input_text' and 'input_image' "
                    f"in a '{item.role}' message.",
                    code="invalid_value",
                    param=f"{where}.type",
                )


def _chat_content(content: str | list[Any]) -> str | list[dict[str, Any]]:
    if isinstance(content, str):
        return content
    parts: list[dict[str, Any]] = []
    for part in content:
        if isinstance(part, InputImage):
            parts.append({"type": "image_url", "image_url": {"url": part.image_url, "detail": part.detail}})
        elif isinstance(part, RefusalPart):
            parts.append({"type": "text", "text": part.refusal})
        else:
            parts.append({"type": "text", "text": part.text})
    return parts


def input_messages(request: ResponsesRequest) -> list[dict[str, Any]]:
    """`input` as chat messages (without `instructions`): what a later `previous_response_id` resumes.

    Consecutive `function_call` items are one assistant turn's calls, joined to the assistant message
    just before them if there is one.
    """
    if isinstance(request.input, str):
        return [{"role": "user", "content": request.input}]
    messages: list[dict[str, Any]] = []
    for item in request.input:
        if isinstance(item, MessageItem):
            messages.append({"role": item.role, "content": _chat_content(item.content)})
        elif isinstance(item, FunctionCallItem):
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
        # ReasoningItem: the notes are hidden and re-made on every turn; nothing to pass on.
    return messages


def _response_format(request: ResponsesRequest) -> dict[str, Any] | None:
    fmt = request.text.format if request.text is not None else None
    if isinstance(fmt, JSONObjectFormat):
        return {"type": "json_object"}
    if isinstance(fmt, TextFormatJSONSchema):
        spec: dict[str, Any] = {"name": fmt.name, "schema": fmt.schema_}
        if fmt.description is not None:
            spec["description"] = fmt.description
        if fmt.strict is not None:
            spec["strict"] = fmt.strict
        return {"type": "json_schema", "json_schema": spec}
    return None


def to_chat(request: ResponsesRequest, history: list[dict[str, Any]]) -> ChatCompletionRequest:
    """The chat completion this request amounts to: `instructions` (a system message), then `history`
    (a previous response's conversation, chat messages), then `input`.

    Everything goes through chat's own validation; its errors are renamed by `chat_param`.
    """
    messages: list[dict[str, Any]] = []
    if request.instructions is not None:
        messages.append({"role": "system", "content": request.instructions})
    messages += history
    messages += input_messages(request)
    body: dict[str, Any] = {"messages": messages, "stream": bool(request.stream)}
    if request.max_output_tokens is not None:
        body["max_completion_tokens"] = request.max_output_tokens
    for name in ("temperature", "top_p", "parallel_tool_calls", "metadata", "user"):
        value = getattr(request, name)
        if value is not None:
            body[name] = value
    effort = request.reasoning.effort if request.reasoning is not None else None
    if effort is not None:
        body["reasoning_effort"] = _EFFORT[effort]
    if request.tools is not None:
        body["tools"] = [
            {"type": "function", "function": tool.model_dump(exclude={"type"}, exclude_none=True)}
            for tool in request.tools
        ]
    choice = request.tool_choice
    if choice is not None:
        body["tool_choice"] = (
            {"type": "function", "function": {"name": choice.name}}
            if isinstance(choice, FunctionChoice)
            else choice
        )
    response_format = _response_format(request)
    if response_format is not None:
        body["response_format"] = response_format
    try:
        return parse_chat_request(body, check_unicode=False)
    except InvalidRequest as exc:
        renamed = chat_param(exc.param)
        if exc.param and renamed:
            exc.message = exc.message.replace(exc.param, renamed)
            exc.args = (exc.message,)
        exc.param = renamed
        raise


_RENAMES = (
    (re.compile(r"^messages(\[\d+\])?"), "input"),
    (re.compile(r"^response_format(\.json_schema)?"), "text.format"),
    (re.compile(r"^(tools\[\d+\])\.function"), r"\1"),
    (re.compile(r"^tool_choice\.function"), "tool_choice"),
    (re.compile(r"^max_completion_tokens"), "max_output_tokens"),
    (re.compile(r"^reasoning_effort"), "reasoning.effort"),
)


def chat_param(param: str | None) -> str | None:
    """A chat error's `param` as this request names it (`messages[3].content[0]` → `input`: message
    indices shift by the instructions and history, so only the field is named)."""
    if param is None:
        return None
    for pattern, name in _RENAMES:
        renamed, count = pattern.subn(name, param, count=1)
        if count:
            return renamed if not renamed.startswith("input") else "input"
    return param


def continued(
    history: list[dict[str, Any]], request: ResponsesRequest, text: str, tool_calls: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The conversation a response ends with: `history`, its `input`, then its answer (text and tool
    calls, as one assistant message). A later `previous_response_id` continues from here."""
    answer: dict[str, Any] = {"role": "assistant", "content": text or None}
    if tool_calls:
        answer["tool_calls"] = tool_calls
    elif not text:
        answer["content"] = ""
    return [*history, *input_messages(request), answer]
