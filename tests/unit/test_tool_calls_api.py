"""Tool calls through the real ASGI app (TestClient, SQLite) in front of the scripted upstream: collected
into `message.tool_calls`, streamed as deltas, stored under an Idempotency-Key and replayed (as JSON and as
a stream) with the same ids, names and arguments; a malformed tool-call delta is a 502."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from tests.engines.upstream_servers import TOOL_CALL_DELTAS, ScriptedUpstream, sse_chunk
from tokentill.app import create_app
from tokentill.engines.upstream_wire import BadAnswer, StreamState
from tokentill.settings import Settings

TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
BODY: dict[str, Any] = {
    "model": "relay",
    "messages": [{"role": "user", "content": "Weather in Paris?"}],
    "tools": [TOOL],
    "max_completion_tokens": 20,
}
CALLS = [
    {
        "id": "call_up1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    },
    {"id": "call_up2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
]


@pytest.fixture(scope="module")
def scripted() -> Iterator[ScriptedUpstream]:
    server = ScriptedUpstream().start()
    yield server
    server.stop()


@pytest.fixture
def client(tmp_path: Path, scripted: ScriptedUpstream) -> Iterator[TestClient]:
    catalogue = tmp_path / "models.toml"
    catalogue.write_text(
        f'[[models]]\nid = "relay"\nengine = "upstream"\nbase_url = "{scripted.url}/tools/v1"\n'
    )
    with TestClient(create_app(Settings(data_dir=tmp_path / "data", config=catalogue))) as client:
        services: Any = client.app.state.services  # type: ignore[attr-defined]

        async def key() -> str:
            await services.ledger.create_account("t", 1_000_000)
            return str((await services.keys.create_key("t")).key)

        client.headers["Authorization"] = f"Bearer {client.portal.call(key)}"  # type: ignore[union-attr]
        yield client


def _tool_deltas(response: Any) -> tuple[list[dict[str, Any]], list[str]]:
    lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line) for line in lines[:-1]]
    deltas = [d for c in chunks for ch in c["choices"] for d in ch["delta"].get("tool_calls", [])]
    finishes = [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch["finish_reason"]]
    return deltas, finishes


def _calls(deltas: list[dict[str, Any]]) -> list[tuple[int, str, str, str]]:
    """The calls streamed tool-call deltas add up to: index, id, name and arguments, in order."""
    calls: dict[int, list[str]] = {}
    for delta in deltas:
        function = delta.get("function", {})
        if "id" in delta:  # a call's first delta names it
            assert delta["index"] not in calls and delta["type"] == "function"
            calls[delta["index"]] = [delta["id"], function["name"], ""]
        calls[delta["index"]][2] += function.get("arguments", "")
    return [(index, *call) for index, call in calls.items()]  # type: ignore[misc]


def test_collected_and_replayed(client: TestClient) -> None:
    headers = {"Idempotency-Key": "tools-1"}
    first = client.post("/v1/chat/completions", json=BODY, headers=headers)
    assert first.status_code == 200, first.text
    choice = first.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None and choice["message"]["tool_calls"] == CALLS
    again = client.post("/v1/chat/completions", json=BODY, headers=headers)
    assert again.headers["idempotent-replayed"] == "true" and again.json() == first.json()


def test_streamed_and_replayed_as_a_stream(client: TestClient) -> None:
    headers = {"Idempotency-Key": "tools-2"}
    body = {**BODY, "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as live:
        deltas, finishes = _tool_deltas(live)
    # Relayed as they came; fragments that arrived in one read may come joined (`coalesce`).
    assert _calls(deltas) == _calls(TOOL_CALL_DELTAS) and finishes == ["tool_calls"]
    with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as replay:
        assert replay.headers["idempotent-replayed"] == "true"
        deltas, finishes = _tool_deltas(replay)
    assert finishes == ["tool_calls"]
    # Replayed whole: one delta per call, with its id, name and all of its arguments.
    assert [(d["index"], d["id"], d["function"]["name"], d["function"]["arguments"]) for d in deltas] == [
        (i, c["id"], c["function"]["name"], c["function"]["arguments"]) for i, c in enumerate(CALLS)
    ]


@pytest.mark.parametrize(
    "delta",
    [
        {"tool_calls": "x"},
        {"tool_calls": [7]},
        {"tool_calls": [{"index": -1}]},
        {"tool_calls": [{"function": {"arguments": 1}}]},
    ],
)
def test_malformed_tool_call_deltas_are_bad_answers(delta: dict[str, Any]) -> None:
    state = StreamState(prompt_estimate=1, max_tokens=10)
    with pytest.raises(BadAnswer):
        state.chunk(json.loads(sse_chunk(delta)[6:]))
