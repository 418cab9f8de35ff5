"""OpenAI `CreateChatCompletionRequest`, as it applies to a reasoning model with vision.

Strict: unknown top-level keys are refused by name, nested objects forbid extra keys, and OpenAI
parameters this service does not implement are refused as `unsupported_parameter` unless they carry their
neutral value (so clients that always send `presence_penalty: 0` keep working). `parse_chat_request`
turns every problem into `InvalidRequest` with `param` as a JSON path (`messages[1].content[0].type`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError
from pydantic_core import ErrorDetails

from tokentill.errors import InvalidRequest
from tokentill.types import ResponseFormat, ToolCall, ToolChoice, ToolDefinition

__all__ = [
    "ChatCompletionRequest",
    "ChatMessage",
    "ImagePart",
    "ImageURL",
    "StreamOptions",
    "TextPart",
    "ToolParam",
    "decode_chat_body",
    "deepest_error",
    "find_invalid_unicode",
    "invalid_request",
    "known_arguments",
    "load_json_body",
    "parse_chat_request",
]


MAX_TOKENS = 2**31 - 1  # a budget beyond any context; keeps worst-case prices far inside BIGINT
MAX_USER_CHARS = 256  # `user`: an end-user id for abuse monitoring, not free text
MAX_METADATA_PAIRS = 16  # OpenAI's metadata limits
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512
MAX_LOGIT_BIAS = 1024  # entries; the engine checks each id against its own vocabulary
MAX_TOKEN_ID_DIGITS = 9  # larger than any vocabulary; bounds int() on client text
# Bounds on the work one body can cost before it is refused. json.loads and pydantic hold the GIL, so a
# worker thread alone does not spare the event loop: a 32 MiB body of a million tiny parts took seconds.
MAX_MESSAGES = 2048
MAX_CONTENT_PARTS = 8192  # in all messages together
MAX_JSON_COMMAS = 1_000_000  # every JSON value past the first of its container needs one
MAX_TOOLS = 128  # OpenAI's limit
_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # function and json_schema names (OpenAI's rule)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: StrictStr


class ImageURL(_Strict):
    url: StrictStr
    detail: Literal["low", "high", "auto"] = "auto"


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class FunctionCallParam(_Strict):
    name: StrictStr
    arguments: StrictStr


class ToolCallParam(_Strict):
    id: StrictStr
    type: Literal["function"]
    function: FunctionCallParam


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[ContentPart] | None = None
    name: StrictStr | None = None
    refusal: StrictStr | None = None
    tool_calls: list[ToolCallParam] | None = None  # assistant turns
    tool_call_id: StrictStr | None = None  # tool turns

    def domain_tool_calls(self) -> tuple[ToolCall, ...]:
        return tuple(ToolCall(c.id, c.function.name, c.function.arguments) for c in self.tool_calls or ())


class FunctionDefinition(_Strict):
    name: StrictStr
    description: StrictStr | None = None
    parameters: dict[StrictStr, Any] | None = None
    strict: StrictBool | None = None


class ToolParam(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: StrictStr


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class TextFormat(_Strict):
    type: Literal["text"]


class JSONObjectFormat(_Strict):
    type: Literal["json_object"]


class JSONSchemaSpec(_Strict):
    name: StrictStr
    description: StrictStr | None = None
    schema_: dict[StrictStr, Any] | None = Field(default=None, alias="schema")
    strict: StrictBool | None = None


class JSONSchemaFormat(_Strict):
    type: Literal["json_schema"]
    json_schema: JSONSchemaSpec


ResponseFormatParam = Annotated[TextFormat | JSONObjectFormat | JSONSchemaFormat, Field(discriminator="type")]


class StreamOptions(_Strict):
    include_usage: StrictBool = False


class ChatCompletionRequest(_Strict):
    model: StrictStr | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1, le=MAX_TOKENS)
    max_tokens: StrictInt | None = Field(default=None, ge=1, le=MAX_TOKENS)
    reasoning_effort: StrictStr | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[StrictStr, float] | None = None
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    n: StrictInt | None = None
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    user: StrictStr | None = Field(default=None, max_length=MAX_USER_CHARS)
    metadata: dict[StrictStr, StrictStr] | None = None
    include_reasoning: StrictBool | None = None
    response_format: ResponseFormatParam | None = None
    tools: list[ToolParam] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None

    def response_format_spec(self) -> ResponseFormat | None:
        """`response_format` as the engines take it; None for text (or none given)."""
        fmt = self.response_format
        raw = fmt.model_dump(by_alias=True, exclude_unset=True) if fmt is not None else {}
        if isinstance(fmt, JSONObjectFormat):
            return ResponseFormat("json_object", raw=raw)
        if isinstance(fmt, JSONSchemaFormat):
            spec = fmt.json_schema
            return ResponseFormat(
                "json_schema", name=spec.name, schema=spec.schema_, strict=bool(spec.strict), raw=raw
            )
        return None

    def tool_definitions(self) -> tuple[ToolDefinition, ...]:
        return tuple(
            ToolDefinition(
                name=t.function.name,
                description=t.function.description or "",
                parameters=t.function.parameters,
                strict=bool(t.function.strict),
                raw=t.model_dump(by_alias=True, exclude_unset=True),
            )
            for t in self.tools or ()
        )

    def tool_choice_spec(self) -> ToolChoice:
        """`tool_choice` with OpenAI's default: auto when tools are given, else none."""
        choice = self.tool_choice
        raw = choice.model_dump(exclude_unset=True) if isinstance(choice, NamedToolChoice) else choice
        if isinstance(choice, NamedToolChoice):
            return ToolChoice("function", choice.function.name, raw=raw)
        if choice is None:
            return ToolChoice("auto" if self.tools else "none")
        return ToolChoice(choice, raw=raw)

    def completion_limit(self) -> int | None:
        """The client's explicit completion budget, from either spelling."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def token_biases(self) -> tuple[tuple[int, float], ...]:
        """`logit_bias` as (token id, bias) pairs, keys already checked by `parse_chat_request`."""
        return tuple(sorted((int(k), v) for k, v in (self.logit_bias or {}).items()))

    def stop_sequences(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


# OpenAI parameters we know but do not implement: accepted only with their neutral value.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "logprobs": (False, None),
    "top_logprobs": (None, 0),
    "store": (None, False),
    "service_tier": (None, "auto", "default"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "web_search_options": (None,),
}
_KNOWN = set(ChatCompletionRequest.model_fields)


# A JSON escape of a UTF-16 surrogate (\\ud800-\\udfff). Pairs of them are fine (emoji escaped by
# `json.dumps`); only a lone one decodes to a string that cannot be encoded as UTF-8.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def find_invalid_unicode(body: Any) -> str | None:
    """The JSON path of the first string (or object key) holding a lone UTF-16 surrogate, else None.

    JSON escapes such as `\\ud800` decode to Python strings that cannot be encoded as UTF-8 (not for the
    model, not for the database, not even for an error message quoting them), so they are refused up front.
    The path of a bad key is that of its object ("" for the top level). One C-speed pass first; the walk
    that names the path runs only when something is wrong. Iterative: nesting is as deep as JSON allowed.
    """
    if _encodable(json.dumps(body, ensure_ascii=False)):
        return None
    stack: list[tuple[str, Any]] = [("", body)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if not _encodable(value):
                return path
        elif isinstance(value, dict):
            children = []
            for key, item in value.items():
                if not _encodable(key):
                    return path
                children.append((f"{path}.{key}" if path else key, item))
            stack.extend(reversed(children))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", item) for i, item in reversed(list(enumerate(value))))
    return ""


def load_json_body(raw: bytes) -> Any:
    """Raw request bytes → decoded JSON, refusing bodies too costly to parse; failures are InvalidRequest."""
    if raw.count(b",") > MAX_JSON_COMMAS:  # far more values than any request could use; parsing is costly
        raise InvalidRequest(
            f"The request body holds too many JSON values (over {MAX_JSON_COMMAS} commas).",
            code="invalid_value",
        )
    try:
        payload = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        # ValueError covers malformed JSON, undecodable bytes and integers past Python's digit limit.
        raise InvalidRequest(
            "We could not parse the JSON body of your request. The OpenAI API expects a JSON payload.",
            code="invalid_json",
        ) from exc
    return payload


def decode_chat_body(raw: bytes) -> tuple[Any, ChatCompletionRequest]:
    """Raw request bytes → (decoded JSON, validated request); every failure is an `InvalidRequest`.

    Pure CPU work with no I/O, so the API runs it in a worker thread for large bodies.
    """
    payload = load_json_body(raw)
    # (UTF-16 and UTF-32 bodies, which json.loads also accepts, are always checked.)
    suspect = json.detect_encoding(raw) != "utf-8" or _SURROGATE_ESCAPE.search(raw) is not None
    return payload, parse_chat_request(payload, check_unicode=suspect)


def _json_path(loc: tuple[int | str, ...]) -> str:
    """pydantic's error location as the JSON path clients see (`messages[1].content[0].image_url.url`)."""
    path = ""
    skip_tag = False
    for i, part in enumerate(loc):
        if isinstance(part, int):
            path += f"[{part}]"
            continue
        if part in {"str", "function-after"} or part.startswith("list["):
            skip_tag = part.startswith("list[tagged-union")  # a tag follows this list's index
            continue  # union branch names pydantic adds to locations
        if skip_tag and i > 0 and isinstance(loc[i - 1], int):
            skip_tag = False
            continue  # the discriminator value pydantic inserts, not a real key
        path += f".{part}" if path else part
    return path


def _code_for(error_type: str) -> str:
    if error_type == "missing":
        return "missing_required_parameter"
    if error_type == "extra_forbidden":
        return "unknown_parameter"
    if error_type.endswith("_type") or error_type in {"model_type", "dict_type", "list_type"}:
        return "invalid_type"
    return "invalid_value"


def _message_for(error: ErrorDetails, param: str) -> str:
    kind = error["type"]
    if kind == "missing":
        return f"Missing required parameter: '{param}'."
    if kind == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param}"
    if kind == "union_tag_invalid":
        tag = (error.get("ctx") or {}).get("tag")
        expected = (error.get("ctx") or {}).get("expected_tags", "'text', 'image_url'")
        return f"Invalid value: '{tag}'. Supported values are: {expected}."
    if kind == "literal_error":
        expected = (error.get("ctx") or {}).get("expected", "")
        return f"Invalid value for '{param}': {error.get('input')!r}. Supported values are: {expected}."
    return f"Invalid value for '{param}': {error['msg']}."


def known_arguments(
    body: Any, known: Collection[str], neutral: Mapping[str, tuple[Any, ...]], *, check_unicode: bool = True
) -> dict[str, Any]:
    """The top-level arguments of a decoded JSON body that its model knows, once the body is an object,
    holds valid Unicode, and every other key is one of `neutral`'s with its neutral value (of the same
    JSON type: `logprobs: false` is neutral, `logprobs: 0` is not). Else an `InvalidRequest` naming it.

    `check_unicode=False` skips the lone-surrogate check, for callers that know the raw JSON has no
    surrogate escape (`decode_chat_body`).
    """
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_type")
    bad = find_invalid_unicode(body) if check_unicode else None
    if bad is not None:
        raise InvalidRequest(
            f"Invalid value for '{bad or 'body'}': the text contains a lone UTF-16 surrogate (such as "
            "\\ud800), which is not valid Unicode.",
            code="invalid_value",
            param=bad or None,
        )
    for name, value in body.items():
        if name in known:
            continue
        if name in neutral:
            # Types as well as values: in Python 0 == False and 1 == True, but `store: 0` is not a boolean.
            if any(type(value) is type(v) and value == v for v in neutral[name]):
                continue
            raise InvalidRequest(
                f"Unsupported parameter: '{name}' is not supported with this model.",
                code="unsupported_parameter",
                param=name,
            )
        raise InvalidRequest(
            f"Unrecognized request argument supplied: {name}", code="unknown_parameter", param=name
        )
    return {k: v for k, v in body.items() if k in known}


def deepest_error(exc: ValidationError) -> ErrorDetails:
    """With unions (content: string | parts) pydantic reports every branch; the deepest error is the one
    about what the client actually sent."""
    return max(exc.errors(), key=lambda e: len(e["loc"]))


def invalid_request(
    error: ErrorDetails, loc: tuple[int | str, ...] | None = None, message: str | None = None
) -> InvalidRequest:
    """A pydantic error as the `InvalidRequest` clients see, `param` the JSON path of `loc` (default: the
    error's own)."""
    param = _json_path(error["loc"] if loc is None else loc)
    text = message or _message_for(error, param)
    if error["type"] == "union_tag_invalid":
        param += ".type"
    return InvalidRequest(text, code=_code_for(error["type"]), param=param)


def parse_chat_request(body: Any, *, check_unicode: bool = True) -> ChatCompletionRequest:
    """Validate a decoded JSON body; every failure is an `InvalidRequest` naming the parameter."""
    known = known_arguments(body, _KNOWN, _NEUTRAL, check_unicode=check_unicode)
    _check_sizes(known)
    try:
        request = ChatCompletionRequest.model_validate(known)
    except ValidationError as exc:
        raise invalid_request(deepest_error(exc)) from exc
    _check_semantics(request)
    return request


def _too_long(param: str, limit: int, got: int) -> InvalidRequest:
    return InvalidRequest(
        f"Invalid '{param}': array too long. Expected an array with maximum length {limit}, but got an "
        f"array with length {got} instead.",
        code="invalid_value",
        param=param,
    )


def _check_sizes(body: dict[str, Any]) -> None:
    """Refuse oversized containers before validation, whose cost grows with them (pydantic holds the GIL)."""
    messages = body.get("messages")
    if isinstance(messages, list):
        if len(messages) > MAX_MESSAGES:
            raise _too_long("messages", MAX_MESSAGES, len(messages))
        parts = 0
        for i, message in enumerate(messages):
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, list):
                parts += len(content)
                if parts > MAX_CONTENT_PARTS:
                    raise InvalidRequest(
                        f"Invalid 'messages[{i}].content': a request takes at most {MAX_CONTENT_PARTS} "
                        "content parts in all.",
                        code="invalid_value",
                        param=f"messages[{i}].content",
                    )
    for name, limit in (("stop", 4), ("logit_bias", MAX_LOGIT_BIAS), ("metadata", MAX_METADATA_PAIRS)):
        value = body.get(name)
        if isinstance(value, list | dict) and len(value) > limit:
            raise InvalidRequest(
                f"'{name}' takes at most {limit} entries; {len(value)} were given.",
                code="invalid_value",
                param=name,
            )


def _check_semantics(request: ChatCompletionRequest) -> None:
    if (
        request.max_tokens is not None
        and request.max_completion_tokens is not None
        and request.max_tokens != request.max_completion_tokens
    ):
        raise InvalidRequest(
            "max_tokens and max_completion_tokens were both given with different values; send only "
            "max_completion_tokens.",
            code="invalid_value",
            param="max_tokens",
        )
    if request.n is not None and request.n != 1:
        raise InvalidRequest(
            f"Invalid value for 'n': {request.n}. This model supports only n=1.",
            code="unsupported_value",
            param="n",
        )
    if request.reasoning_effort is not None and request.reasoning_effort not in {"low", "medium", "high"}:
        raise InvalidRequest(
            f"Invalid value for 'reasoning_effort': {request.reasoning_effort!r}. "
            "Supported values are: 'low', 'medium', and 'high'.",
            code="unsupported_value",
            param="reasoning_effort",
        )
    if request.stream_options is not None and not request.stream:
        raise InvalidRequest(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            code="invalid_value",
            param="stream_options",
        )
    _check_logit_bias(request.logit_bias)
    stops = request.stop_sequences()
    if len(stops) > 4 or any(s == "" for s in stops):
        raise InvalidRequest("'stop' takes up to 4 non-empty sequences.", code="invalid_value", param="stop")
    _check_metadata(request.metadata)
    _check_tools(request)
    for i, message in enumerate(request.messages):
        _check_tool_message(i, message)
        if message.content is None and message.role != "assistant":
            raise InvalidRequest(
                f"Missing required parameter: 'messages[{i}].content'.",
                code="missing_required_parameter",
                param=f"messages[{i}].content",
            )
        if isinstance(message.content, list):
            for j, part in enumerate(message.content):
                if isinstance(part, ImagePart) and message.role != "user":
                    raise InvalidRequest(
                        f"Image content is only allowed in user messages, not '{message.role}'.",
                        code="invalid_value",
                        param=f"messages[{i}].content[{j}]",
                    )


def _check_tool_message(i: int, message: ChatMessage) -> None:
    if message.tool_calls is not None and message.role != "assistant":
        raise InvalidRequest(
            f"Invalid parameter: 'tool_calls' is only allowed in assistant messages, not '{message.role}'.",
            code="invalid_value",
            param=f"messages[{i}].tool_calls",
        )
    if message.role == "tool" and message.tool_call_id is None:
        raise InvalidRequest(
            f"Missing required parameter: 'messages[{i}].tool_call_id'.",
            code="missing_required_parameter",
            param=f"messages[{i}].tool_call_id",
        )
    if message.tool_call_id is not None and message.role != "tool":
        raise InvalidRequest(
            f"Invalid parameter: 'tool_call_id' is only allowed in tool messages, not '{message.role}'.",
            code="invalid_value",
            param=f"messages[{i}].tool_call_id",
        )


def _check_tools(request: ChatCompletionRequest) -> None:
    """Function names as OpenAI allows them, unique; a named `tool_choice` among them; schemas objects."""
    tools = request.tools or []
    if len(tools) > MAX_TOOLS:
        raise _too_long("tools", MAX_TOOLS, len(tools))
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        name = tool.function.name
        if not _NAME.fullmatch(name):
            raise InvalidRequest(
                f"Invalid 'tools[{i}].function.name': string does not match pattern. Expected a string "
                "that matches the pattern '^[a-zA-Z0-9_-]{1,64}$'.",
                code="invalid_value",
                param=f"tools[{i}].function.name",
            )
        if name in seen:
            raise InvalidRequest(
                f"Invalid 'tools': the function name '{name}' is given twice.",
                code="invalid_value",
                param=f"tools[{i}].function.name",
            )
        seen.add(name)
    choice = request.tool_choice
    if choice is not None and choice != "none" and not tools:
        raise InvalidRequest(
            "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are specified.",
            code="invalid_value",
            param="tool_choice",
        )
    if isinstance(choice, NamedToolChoice) and choice.function.name not in seen:
        raise InvalidRequest(
            f"Invalid value for 'tool_choice': no function named '{choice.function.name}' in 'tools'.",
            code="invalid_value",
            param="tool_choice.function.name",
        )
    fmt = request.response_format
    if isinstance(fmt, JSONSchemaFormat) and not _NAME.fullmatch(fmt.json_schema.name):
        raise InvalidRequest(
            "Invalid 'response_format.json_schema.name': string does not match pattern. Expected a "
            "string that matches the pattern '^[a-zA-Z0-9_-]{1,64}$'.",
            code="invalid_value",
            param="response_format.json_schema.name",
        )


def _check_metadata(metadata: dict[str, str] | None) -> None:
    """OpenAI's limits: keys up to 64 characters, values up to 512 (and up to 16 pairs, `_check_sizes`)."""
    for key, value in (metadata or {}).items():  # the number of pairs is checked before validation
        if len(key) > MAX_METADATA_KEY_CHARS:
            raise InvalidRequest(
                f"Invalid key in 'metadata': keys are at most {MAX_METADATA_KEY_CHARS} characters; one has "
                f"{len(key)}.",
                code="invalid_value",
                param="metadata",
            )
        if len(value) > MAX_METADATA_VALUE_CHARS:
            raise InvalidRequest(
                f"Invalid value for 'metadata.{key}': values are at most {MAX_METADATA_VALUE_CHARS} "
                f"characters; this one has {len(value)}.",
                code="invalid_value",
                param=f"metadata.{key}",
            )


def _check_logit_bias(bias: dict[str, float] | None) -> None:
    """Keys are token ids written as decimal strings, values in [-100, 100] (OpenAI's rules)."""
    for key, value in (bias or {}).items():  # the number of entries is checked before validation
        if not (key.isascii() and key.isdigit() and len(key) <= MAX_TOKEN_ID_DIGITS):
            raise InvalidRequest(
                f"Invalid key in 'logit_bias': {key[:16]!r}. Keys are token ids, such as \"50256\".",
                code="invalid_value",
                param="logit_bias",
            )
        if not -100 <= value <= 100:
            raise InvalidRequest(
                f"Invalid value for 'logit_bias' token {key}: {value}. Biases range from -100 to 100.",
                code="invalid_value",
                param=f"logit_bias.{key}",
            )
