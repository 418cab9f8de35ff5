"""The Responses routes through the real ASGI app (TestClient, echo engine, SQLite): a streamed answer under
an Idempotency-Key is replayed as the same events and charged once; hidden notes become a summary only
when asked; an error after the stream began ends it with `error` and `response.failed`."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from starlette.testclient import TestClient

from tokentill import errors
from tokentill.api.responses import _frames
from tokentill.api.sse import Item
from tokentill.app import create_app
from tokentill.protocol.response_objects import ResponseBuilder
from tokentill.protocol.responses_api import parse_responses_request
from tokentill.services import Services
from tokentill.settings import Settings
from tokentill.types import TextDelta


@pytest.fixture
def app(tmp_path: Path) -> Iterator[tuple[TestClient, Services]]:
    catalogue = tmp_path / "models.toml"
    catalogue.write_text(
        '[[models]]\nid = "echo"\nengine = "echo"\nprice_input = 15\nprice_output = 60\n'
        '[[models]]\nid = "thinker"\nengine = "echo"\nreasoning = "native"\n'
    )
    settings = Settings(data_dir=tmp_path / "data", config=catalogue)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client, client.app.state.services  # type: ignore[attr-defined]


def _key(client: TestClient, services: Services, account: str = "a") -> dict[str, str]:
    async def make() -> str:
        await services.ledger.create_account(account, 1_000_000)
        return (await services.keys.create_key(account)).key

    return {"Authorization": f"Bearer {client.portal.call(make)}"}  # type: ignore[union-attr]


def _balance(client: TestClient, services: Services, account: str = "a") -> int:
    async def read() -> int:
        found = await services.ledger.get_account(account)
        assert found is not None
        return found.balance

    return int(client.portal.call(read))  # type: ignore[union-attr]


def _events(text: str) -> list[dict[str, Any]]:
    """The `data:` objects of an SSE body, checking each frame's `event:` names its type."""
    out = []
    for frame in text.strip().split("\n\n"):
        kind, data = frame.split("\n")
        event = json.loads(data.removeprefix("data: "))
        assert kind == f"event: {event['type']}"
        out.append(event)
    return out


def test_a_streamed_answer_is_replayed_as_the_same_events_and_charged_once(
    app: tuple[TestClient, Services],
) -> None:
    client, services = app
    headers = {**_key(client, services), "Idempotency-Key": "stream-1"}
    body = {"model": "echo", "input": "one two three", "stream": True, "max_output_tokens": 10}
    first = client.post("/v1/responses", json=body, headers=headers)
    assert first.status_code == 200 and first.headers["content-type"].startswith("text/event-stream")
    after_first = _balance(client, services)
    again = client.post("/v1/responses", json=body, headers=headers)
    assert again.headers["idempotent-replayed"] == "true"
    streamed, replayed = _events(first.text), _events(again.text)
    assert streamed[-1]["type"] == replayed[-1]["type"] == "response.completed"
    assert replayed[-1]["response"] == streamed[-1]["response"]
    assert [e["sequence_number"] for e in replayed] == list(range(len(replayed)))
    deltas = [e["delta"] for e in streamed if e["type"] == "response.output_text.delta"]
    assert deltas == ["one", " two", " three"]
    assert [e["delta"] for e in replayed if e["type"] == "response.output_text.delta"] == ["one two three"]
    assert _balance(client, services) == after_first  # the replay cost nothing
    stored = client.get(f"/v1/responses/{streamed[-1]['response']['id']}", headers=headers)
    assert stored.json() == streamed[-1]["response"]


def test_notes_become_a_summary_only_when_asked(app: tuple[TestClient, Services]) -> None:
    client, services = app
    headers = _key(client, services)
    body = {"model": "thinker", "input": "<think> First. Second. Third. Fourth. </think> answer"}
    hidden = client.post("/v1/responses", json=body, headers=headers).json()
    assert hidden["output"][0] == {
        "id": hidden["id"].replace("resp_", "rs_"),
        "type": "reasoning",
        "summary": [],
    }
    assert "First" not in json.dumps(hidden)
    assert hidden["usage"]["output_tokens_details"]["reasoning_tokens"] > 0
    shown = client.post(
        "/v1/responses", json={**body, "reasoning": {"summary": "concise"}}, headers=headers
    ).json()
    assert shown["output"][0]["summary"] == [{"type": "summary_text", "text": "First. Second."}]
    assert shown["output"][1]["content"][0]["text"].strip() == "answer"
    assert shown["usage"] == hidden["usage"]  # the summary comes from notes already billed as output


def test_an_error_after_the_start_ends_the_stream_with_response_failed() -> None:
    request = parse_responses_request({"model": "m", "input": "hi"})
    builder = ResponseBuilder(response_id="resp_x", created_at=1, model="m", request=request)
    kept: list[ResponseBuilder] = []

    async def keep(made: ResponseBuilder) -> None:
        kept.append(made)

    async def main() -> list[bytes]:
        send, receive = anyio.create_memory_object_stream[Item](math.inf)
        send.send_nowait(TextDelta("Hel"))
        send.send_nowait(errors.DeadlineExceeded("The request took too long."))
        send.close()
        return [frame async for frame in _frames(receive, builder, keep)]

    events = _events(b"".join(anyio.run(main)).decode())
    assert [e["type"] for e in events][-3:] == ["response.output_text.delta", "error", "response.failed"]
    assert events[-2]["code"] == "timeout" and events[-2]["message"] == "The request took too long."
    assert events[-1]["response"]["status"] == "failed"
    assert events[-1]["response"]["error"] == {"code": "timeout", "message": "The request took too long."}
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert kept == []  # a failed response is not stored


def test_input_items_list_the_context_a_response_was_made_from(app: tuple[TestClient, Services]) -> None:
    client, services = app
    headers = _key(client, services)
    first = client.post("/v1/responses", json={"model": "echo", "input": "one two"}, headers=headers).json()
    items_in = [
        {"type": "function_call", "call_id": "call_1", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "42"},
        {"role": "user", "content": [{"type": "input_text", "text": "three four"}]},
    ]
    body = {
        "model": "echo",
        "input": items_in,
        "previous_response_id": first["id"],
        "instructions": "Be brief.",
    }
    second = client.post("/v1/responses", json=body, headers=headers).json()
    url = f"/v1/responses/{second['id']}/input_items"
    page = client.get(url, params={"order": "asc"}, headers=headers).json()
    assert page["object"] == "list" and page["has_more"] is False
    assert [(i["type"], i.get("role")) for i in page["data"]] == [
        ("message", "user"),  # the first turn's input and answer; the instructions are not an item
        ("message", "assistant"),
        ("function_call", None),
        ("function_call_output", None),
        ("message", "user"),
    ]
    assert page["data"][1]["content"] == [{"type": "output_text", "text": "one two"}]
    assert page["data"][3]["output"] == "42"
    assert (page["first_id"], page["last_id"]) == (page["data"][0]["id"], page["data"][-1]["id"])
    newest = client.get(url, params={"limit": 2}, headers=headers).json()  # desc by default, as OpenAI
    assert [i["id"] for i in newest["data"]] == [i["id"] for i in page["data"][::-1][:2]]
    assert newest["has_more"] is True
    rest = client.get(url, params={"limit": 10, "after": newest["last_id"]}, headers=headers).json()
    assert [i["id"] for i in rest["data"]] == [i["id"] for i in page["data"][::-1][2:]]
    refused = client.get(url, params={"limit": 0}, headers=headers)
    assert (refused.status_code, refused.json()["error"]["param"]) == (400, "limit")
    stranger = _key(client, services, "b")
    assert client.get(url, headers=stranger).status_code == 404
