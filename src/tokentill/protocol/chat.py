"""OpenAI `CreateChatCompletionRequest`, as it applies to a reasoning model with vision.

Strict: unknown top-level keys are refused by name, nested objects forbid extra keys, and OpenAI
parameters this service does not implement are refused as `unsupported_parameter` unless they carry their
neutral value (so clients that always send `presence_penalty: 0` keep working). `parse_chat_request`
turns every problem into `InvalidRequest` with `param` as a JSON path (`messages[1].content[0].type`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError
from pydantic_core import ErrorDetails

from tokentill.errors import InvalidRequest

__all__ = [
    "ChatCompletionRequest",
    "ChatMessage",
    "ImagePart",
    "ImageURL",
    "StreamOptions",
    "TextPart",
    "parse_chat_request",
]


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


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[ContentPart] | None = None
    name: StrictStr | None = None
    refusal: StrictStr | None = None


class StreamOptions(_Strict):
    include_usage: StrictBool = False


class ChatCompletionRequest(_Strict):
    model: StrictStr | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    reasoning_effort: StrictStr | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[StrictStr, float] | None = None
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    n: StrictInt | None = None
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    user: StrictStr | None = Field(default=None, max_length=256)
    metadata: dict[StrictStr, StrictStr] | None = None
    include_reasoning: StrictBool | None = None

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
    "parallel_tool_calls": (None, True, False),
    "store": (None, False),
    "service_tier": (None, "auto", "default"),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "web_search_options": (None,),
}
_KNOWN = set(ChatCompletionRequest.model_fields)


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
        return f"Invalid value: '{tag}'. Supported values are: 'text' and 'image_url'."
    if kind == "literal_error":
        expected = (error.get("ctx") or {}).get("expected", "")
        return f"Invalid value for '{param}': {error.get('input')!r}. Supported values are: {expected}."
    return f"Invalid value for '{param}': {error['msg']}."


def parse_chat_request(body: Any) -> ChatCompletionRequest:
    """Validate a decoded JSON body; every failure is an `InvalidRequest` naming the parameter."""
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_type")
    for name, value in body.items():
        if name in _KNOWN:
            continue
        if name in _NEUTRAL:
            if value in _NEUTRAL[name]:
                continue
            raise InvalidRequest(
                f"Unsupported parameter: '{name}' is not supported with this model.",
                code="unsupported_parameter",
                param=name,
            )
        raise InvalidRequest(
            f"Unrecognized request argument supplied: {name}", code="unknown_parameter", param=name
        )
    known = {k: v for k, v in body.items() if k in _KNOWN}
    try:
        request = ChatCompletionRequest.model_validate(known)
    except ValidationError as exc:
        # With unions (content: string | parts) pydantic reports every branch; the deepest error is the
        # one about what the client actually sent.
        error = max(exc.errors(), key=lambda e: len(e["loc"]))
        param = _json_path(error["loc"])
        if error["type"] == "union_tag_invalid":
            param += ".type"
        raise InvalidRequest(_message_for(error, param), code=_code_for(error["type"]), param=param) from exc
    _check_semantics(request)
    return request


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
    if request.metadata is not None and len(request.metadata) > 16:
        raise InvalidRequest("'metadata' takes up to 16 pairs.", code="invalid_value", param="metadata")
    for i, message in enumerate(request.messages):
        if message.role == "tool":
            raise InvalidRequest(
                "Messages with role 'tool' are not supported: this service does not offer tools.",
                code="unsupported_value",
                param=f"messages[{i}].role",
            )
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


MAX_LOGIT_BIAS = 1024  # entries; the engine checks each id against its own vocabulary


def _check_logit_bias(bias: dict[str, float] | None) -> None:
    """Keys are token ids written as decimal strings, values in [-100, 100] (OpenAI's rules)."""
    if not bias:
        return
    if len(bias) > MAX_LOGIT_BIAS:
        raise InvalidRequest(
            f"'logit_bias' takes up to {MAX_LOGIT_BIAS} tokens; {len(bias)} were given.",
            code="invalid_value",
            param="logit_bias",
        )
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit()):
            raise InvalidRequest(
                f"Invalid key in 'logit_bias': {key!r}. Keys are token ids, such as \"50256\".",
                code="invalid_value",
                param="logit_bias",
            )
        if not -100 <= value <= 100:
            raise InvalidRequest(
                f"Invalid value for 'logit_bias' token {key}: {value}. Biases range from -100 to 100.",
                code="invalid_value",
                param=f"logit_bias.{key}",
            )
