"""OpenAI Responses API objects: the `response` object and the `response.*` events of its stream.

`ResponseBuilder` turns a chat's engine events into both renderings, so that they cannot disagree: fed
event by event it returns the stream events for each (with `sequence_number`), and `response()` is the
object as it stands (the final one once `Finished` was fed). Output items, in the order the model made
them:

    reasoning       when the model reasoned; the notes stay hidden, `summary` holds a short visible
                    summary of them only when `reasoning.summary` asked for one
    message         the answer, one `output_text` part
    function_call   one per tool call (`call_id`, `name`, `arguments`)

Item ids derive from the response id (`rs_<hex>`, `msg_<hex>`, `fc_<hex>_<n>`), so two builders of one
response (the stream's, and the one that renders the same answer for an Idempotency-Key) agree.
"""

from __future__ import annotations

import re
from typing import Any

from tokentill.protocol.responses import Answer
from tokentill.protocol.responses_api import FunctionChoice, ResponsesRequest
from tokentill.types import EngineEvent, Finished, TextDelta, ToolCallDelta, Usage

__all__ = ["ResponseBuilder", "answer_events", "summarize", "usage_object"]

SUMMARY_SENTENCES = {"concise": 2, "auto": 3}
SUMMARY_MAX_CHARS = {"concise": 300, "auto": 600, "detailed": 2000}
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def summarize(notes: str, mode: str) -> str:
    """A short visible summary of hidden notes: their first sentences (`concise` 2, `auto` 3, `detailed`
    all), whitespace collapsed, cut at a word under the mode's character cap."""
    text = " ".join(notes.split())
    if mode in SUMMARY_SENTENCES:
        text = " ".join(_SENTENCE_END.split(text)[: SUMMARY_SENTENCES[mode]])
    limit = SUMMARY_MAX_CHARS.get(mode, SUMMARY_MAX_CHARS["auto"])
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0] + "…"
    return text


def usage_object(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        "total_tokens": usage.total_tokens,
    }


def answer_events(answer: Answer) -> list[EngineEvent]:
    """A collected answer as the events that make it (hidden notes, text, calls, the end)."""
    events: list[EngineEvent] = []
    if answer.reasoning:
        events.append(TextDelta("".join(answer.reasoning), reasoning=True))
    if answer.content:
        events.append(TextDelta("".join(answer.content)))
    for index, call in sorted(answer.calls.items()):
        function = call["function"]
        events.append(ToolCallDelta(index, call["id"], function["name"], function["arguments"]))
    if answer.finished is not None:
        events.append(answer.finished)
    return events


class ResponseBuilder:
    """One response's output items and stream events, built from engine events (see the module doc)."""

    def __init__(self, *, response_id: str, created_at: int, model: str, request: ResponsesRequest) -> None:
        self.response_id = response_id
        self._hex = response_id.removeprefix("resp_")
        self._created_at = created_at
        self._model = model
        self._request = request
        self._sequence = 0
        self._items: list[dict[str, Any]] = []
        self._open: dict[str, Any] | None = None  # the item still being made
        self._notes: list[str] = []
        self._text: list[str] = []
        self._call_index: int | None = None
        self._finished: Finished | None = None

    # -- the response object ------------------------------------------------------------------------

    @property
    def finished(self) -> Finished | None:
        return self._finished

    def response(self, *, status: str | None = None, error: dict[str, Any] | None = None) -> dict[str, Any]:
        """The `response` object as it stands: in progress, or final once `Finished` was fed."""
        req = self._request
        finished = self._finished
        if status is None:
            status = "in_progress"
            if finished is not None:
                status = "incomplete" if finished.finish_reason == "length" else "completed"
        fmt = req.text.format if req.text is not None else None
        effort = req.reasoning.effort if req.reasoning is not None else None
        tools = [tool.model_dump() for tool in req.tools or ()]
        choice = req.tool_choice
        return {
            "id": self.response_id,
            "object": "response",
            "created_at": self._created_at,
            "status": status,
            "background": False,
            "error": error,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "max_tool_calls": None,
            "model": self._model,
            "output": [dict(item) for item in self._items] if finished is not None else [],
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": req.previous_response_id,
            "reasoning": {"effort": effort, "summary": req.summary_mode},
            "service_tier": "default",
            "store": req.stored,
            "temperature": 1.0 if req.temperature is None else req.temperature,
            "text": {
                "format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"},
                "verbosity": "medium",
            },
            "tool_choice": choice.model_dump() if isinstance(choice, FunctionChoice) else choice or "auto",
            "tools": tools,
            "top_logprobs": 0,
            "top_p": 1.0 if req.top_p is None else req.top_p,
            "truncation": "disabled",
            "usage": usage_object(finished.usage) if finished is not None else None,
            "user": req.user,
            "metadata": req.metadata or {},
        }

    def from_answer(self, answer: Answer) -> dict[str, Any]:
        """The final object of a collected answer (no stream events kept)."""
        for event in answer_events(answer):
            self.feed(event)
        return self.response()

    @property
    def output_text(self) -> str:
        return "".join(self._text)

    def tool_calls(self) -> list[dict[str, Any]]:
        """The answer's calls as chat `tool_calls` (for the conversation a later turn resumes)."""
        return [
            {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]},
            }
            for item in self._items
            if item["type"] == "function_call"
        ]

    # -- stream events ------------------------------------------------------------------------------

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return event

    def start(self) -> list[dict[str, Any]]:
        """`response.created` and `response.in_progress`: the stream's first two events."""
        return [
            self._event("response.created", response=self.response()),
            self._event("response.in_progress", response=self.response()),
        ]

    def failed(self, error: dict[str, Any]) -> list[dict[str, Any]]:
        """An `error` event ({code, message, param}) and `response.failed`: the stream's last events."""
        return [
            self._event("error", code=error["code"], message=error["message"], param=error["param"]),
            self._event(
                "response.failed",
                response=self.response(
                    status="failed", error={"code": error["code"], "message": error["message"]}
                ),
            ),
        ]

    def feed(self, event: EngineEvent) -> list[dict[str, Any]]:
        """The stream events `event` makes (possibly none)."""
        out: list[dict[str, Any]] = []
        if isinstance(event, TextDelta) and event.reasoning:
            if self._kind() != "reasoning":
                out += self._close()
                out += self._add({"id": f"rs_{self._hex}", "type": "reasoning", "summary": []})
            self._notes.append(event.text)
        elif isinstance(event, TextDelta):
            if not event.text:
                return out
            if self._kind() != "message":
                out += self._close()
                out += self._open_message()
            self._text.append(event.text)
            out.append(
                self._event("response.output_text.delta", **self._where(), delta=event.text, logprobs=[])
            )
        elif isinstance(event, ToolCallDelta):
            if self._kind() != "function_call" or event.index != self._call_index:
                out += self._close()
                self._call_index = event.index
                item = {
                    "id": f"fc_{self._hex}_{event.index}",
                    "type": "function_call",
                    "status": "in_progress",
                    "arguments": "",
                    "call_id": event.id or "",
                    "name": event.name or "",
                }
                out += self._add(item)
            assert self._open is not None
            self._open["call_id"] = event.id or self._open["call_id"]
            self._open["name"] = event.name or self._open["name"]
            if event.arguments:
                self._open["arguments"] += event.arguments
                out.append(
                    self._event(
                        "response.function_call_arguments.delta",
                        item_id=self._open["id"],
                        output_index=len(self._items) - 1,
                        delta=event.arguments,
                    )
                )
        else:
            self._finished = event
            out += self._close()
            kind = "response.incomplete" if event.finish_reason == "length" else "response.completed"
            out.append(self._event(kind, response=self.response()))
        return out

    def _kind(self) -> str | None:
        return self._open["type"] if self._open is not None else None

    def _where(self) -> dict[str, Any]:
        assert self._open is not None
        return {"item_id": self._open["id"], "output_index": len(self._items) - 1, "content_index": 0}

    def _add(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        self._open = item
        self._items.append(item)
        return [self._event("response.output_item.added", output_index=len(self._items) - 1, item=dict(item))]

    def _open_message(self) -> list[dict[str, Any]]:
        item = {
            "id": f"msg_{self._hex}",
            "type": "message",
            "status": "in_progress",
            "content": [],
            "role": "assistant",
        }
        out = self._add(item)
        part = {"type": "output_text", "annotations": [], "logprobs": [], "text": ""}
        out.append(self._event("response.content_part.added", **self._where(), part=part))
        return out

    def _close(self) -> list[dict[str, Any]]:
        """Finish the open item: its closing events; the item in `_items` takes its final form."""
        item, self._open = self._open, None
        if item is None:
            return []
        index = len(self._items) - 1
        status = "incomplete" if self._finished and self._finished.finish_reason == "length" else "completed"
        out: list[dict[str, Any]] = []
        if item["type"] == "reasoning":
            mode = self._request.summary_mode
            summary = summarize("".join(self._notes), mode) if mode else ""
            where = {"item_id": item["id"], "output_index": index, "summary_index": 0}
            if summary:
                empty = {"type": "summary_text", "text": ""}
                part = {"type": "summary_text", "text": summary}
                out.append(self._event("response.reasoning_summary_part.added", **where, part=empty))
                out.append(self._event("response.reasoning_summary_text.delta", **where, delta=summary))
                out.append(self._event("response.reasoning_summary_text.done", **where, text=summary))
                out.append(self._event("response.reasoning_summary_part.done", **where, part=part))
                item["summary"] = [part]
        elif item["type"] == "message":
            text = "".join(self._text)
            where = {"item_id": item["id"], "output_index": index, "content_index": 0}
            done: dict[str, Any] = {"type": "output_text", "annotations": [], "logprobs": [], "text": text}
            out.append(self._event("response.output_text.done", **where, text=text, logprobs=[]))
            out.append(self._event("response.content_part.done", **where, part=done))
            item["content"] = [done]
            item["status"] = status
        else:
            out.append(
                self._event(
                    "response.function_call_arguments.done",
                    item_id=item["id"],
                    output_index=index,
                    name=item["name"],
                    arguments=item["arguments"],
                )
            )
            item["status"] = "completed"
        out.append(self._event("response.output_item.done", output_index=index, item=dict(item)))
        return out
