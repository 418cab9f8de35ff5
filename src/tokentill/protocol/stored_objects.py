"""A stored Responses API object served again: as the stream it was (an Idempotency-Key's replay), and
the input items it was made from (`GET /v1/responses/{id}/input_items`), paged as OpenAI lists them.

Both are rebuilt from what is stored — the final `response` object and the conversation (chat messages)
it ended with — with ids derived from the response's, as `ResponseBuilder` makes them.
"""

from __future__ import annotations

from typing import Any

__all__ = ["input_items", "item_page", "replay_events"]


def replay_events(stored: dict[str, Any]) -> list[dict[str, Any]]:
    """A stored final `response` as the stream events that make it (each text in one delta)."""
    sequence = iter(range(1 << 30))

    def event(kind: str, **fields: Any) -> dict[str, Any]:
        return {"type": kind, "sequence_number": next(sequence), **fields}

    pending = {**stored, "status": "in_progress", "output": [], "usage": None, "incomplete_details": None}
    out = [event("response.created", response=pending), event("response.in_progress", response=pending)]
    for index, item in enumerate(stored["output"]):
        if item["type"] == "reasoning":
            out.append(event("response.output_item.added", output_index=index, item={**item, "summary": []}))
            for s_index, part in enumerate(item["summary"]):
                where = {"item_id": item["id"], "output_index": index, "summary_index": s_index}
                empty = {"type": "summary_text", "text": ""}
                out.append(event("response.reasoning_summary_part.added", **where, part=empty))
                out.append(event("response.reasoning_summary_text.delta", **where, delta=part["text"]))
                out.append(event("response.reasoning_summary_text.done", **where, text=part["text"]))
                out.append(event("response.reasoning_summary_part.done", **where, part=part))
        elif item["type"] == "message":
            added: dict[str, Any] = {**item, "status": "in_progress", "content": []}
            out.append(event("response.output_item.added", output_index=index, item=added))
            for c_index, part in enumerate(item["content"]):
                where = {"item_id": item["id"], "output_index": index, "content_index": c_index}
                out.append(event("response.content_part.added", **where, part={**part, "text": ""}))
                out.append(event("response.output_text.delta", **where, delta=part["text"], logprobs=[]))
                out.append(event("response.output_text.done", **where, text=part["text"], logprobs=[]))
                out.append(event("response.content_part.done", **where, part=part))
        else:
            added = {**item, "status": "in_progress", "arguments": ""}
            out.append(event("response.output_item.added", output_index=index, item=added))
            where = {"item_id": item["id"], "output_index": index}
            out.append(event("response.function_call_arguments.delta", **where, delta=item["arguments"]))
            out.append(
                event(
                    "response.function_call_arguments.done",
                    **where,
                    name=item["name"],
                    arguments=item["arguments"],
                )
            )
        out.append(event("response.output_item.done", output_index=index, item=item))
    kind = "response.incomplete" if stored["status"] == "incomplete" else "response.completed"
    out.append(event(kind, response=stored))
    return out


def _input_parts(content: Any, kind: str) -> list[dict[str, Any]]:
    if not isinstance(content, list):
        return [{"type": kind, "text": content or ""}]
    parts: list[dict[str, Any]] = []
    for part in content:
        if part["type"] == "image_url":
            image = part["image_url"]
            parts.append(
                {"type": "input_image", "image_url": image["url"], "detail": image.get("detail", "auto")}
            )
        else:
            parts.append({"type": kind, "text": part["text"]})
    return parts


def input_items(conversation: list[dict[str, Any]], response_id: str) -> list[dict[str, Any]]:
    """The input items a stored response was made from (earlier turns included, `instructions` not), in
    order: its conversation without the answer, as Responses items with ids derived from the response's."""
    hexed = response_id.removeprefix("resp_")
    items: list[dict[str, Any]] = []
    for n, message in enumerate(conversation[:-1]):
        role = message["role"]
        if role == "tool":
            items.append(
                {
                    "id": f"fco_{hexed}_{n}",
                    "type": "function_call_output",
                    "call_id": message["tool_call_id"],
                    "output": message["content"],
                    "status": "completed",
                }
            )
            continue
        if message.get("content") is not None or not message.get("tool_calls"):
            kind = "output_text" if role == "assistant" else "input_text"
            items.append(
                {
                    "id": f"msg_{hexed}_{n}",
                    "type": "message",
                    "role": role,
                    "status": "completed",
                    "content": _input_parts(message.get("content"), kind),
                }
            )
        for c, call in enumerate(message.get("tool_calls") or ()):
            items.append(
                {
                    "id": f"fc_{hexed}_{n}_{c}",
                    "type": "function_call",
                    "call_id": call["id"],
                    "name": call["function"]["name"],
                    "arguments": call["function"]["arguments"],
                    "status": "completed",
                }
            )
    return items


def item_page(items: list[dict[str, Any]], *, order: str, limit: int, after: str | None) -> dict[str, Any]:
    """OpenAI's list object of `items` (oldest first) in `order`, `limit` of them after the id `after`."""
    ordered = items if order == "asc" else items[::-1]
    if after is not None:
        ids = [item["id"] for item in ordered]
        ordered = ordered[ids.index(after) + 1 :] if after in ids else []
    page = ordered[:limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(ordered) > limit,
    }
