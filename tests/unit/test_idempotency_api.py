"""Idempotency-Key and x-ratelimit-* headers through the real ASGI app (TestClient, echo engine, SQLite):
replay charges nothing, a different body is 409, errors release the key, a stream is replayed as a stream,
a replay needs the model permission, and the TPM reservation shows in the headers."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from sqlalchemy import func, select
from starlette.testclient import TestClient

from tokentill.app import create_app
from tokentill.services import Services
from tokentill.settings import Settings
from tokentill.storage.schema import holds

BODY: dict[str, Any] = {
    "messages": [{"role": "user", "content": "one two three"}],
    "max_completion_tokens": 10,
}
SIX = [
    f"x-ratelimit-{kind}-{family}"
    for kind in ("limit", "remaining", "reset")
    for family in ("requests", "tokens")
]


@dataclass
class App:
    client: TestClient
    services: Services

    def call(self, func: Any, *args: Any) -> Any:
        return self.client.portal.call(func, *args)  # type: ignore[union-attr]

    def key(self, account: str, models: list[str] | None = None, **limits: int) -> dict[str, str]:
        async def make() -> str:
            if await self.services.ledger.get_account(account) is None:
                await self.services.ledger.create_account(account, 1_000_000)
            created = await self.services.keys.create_key(account, models=models, **limits)  # type: ignore[arg-type]
            return created.key

        return {"Authorization": f"Bearer {self.call(make)}"}

    def balance(self, account: str) -> int:
        async def read() -> int:
            found = await self.services.ledger.get_account(account)
            assert found is not None
            return found.balance

        return int(self.call(read))

    def usage_rows(self, account: str) -> int:
        return len(self.call(self.services.ledger.usage, account))


@pytest.fixture
def app(tmp_path: Path) -> Iterator[App]:
    catalogue = tmp_path / "models.toml"
    catalogue.write_text(
        '[[models]]\nid = "echo"\nengine = "echo"\nprice_input = 15\nprice_output = 60\n'
        '[[models]]\nid = "echo2"\nengine = "echo"\nprice_input = 15\nprice_output = 60\n'
    )
    settings = Settings(data_dir=tmp_path / "data", config=catalogue)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield App(client, client.app.state.services)  # type: ignore[attr-defined]


def test_replay_returns_the_stored_answer_and_charges_nothing(app: App) -> None:
    headers = {**app.key("a"), "Idempotency-Key": "k-1"}
    first = app.client.post("/v1/echo", json=BODY, headers=headers)
    assert first.status_code == 200, first.text
    assert "idempotent-replayed" not in first.headers
    after_first = app.balance("a")
    assert after_first < 1_000_000
    # The same JSON written differently is the same request.
    same = json.dumps({"max_completion_tokens": 10, "messages": BODY["messages"]}, indent=2)
    again = app.client.post("/v1/echo", content=same, headers={**headers, "content-type": "application/json"})
    assert again.status_code == 200
    assert again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"
    assert again.headers["x-original-request-id"] == first.headers["x-request-id"]
    assert again.headers["x-request-id"] != first.headers["x-request-id"]
    assert app.balance("a") == after_first and app.usage_rows("a") == 1

    other = app.client.post("/v1/echo", json={**BODY, "max_completion_tokens": 9}, headers=headers)
    assert other.status_code == 409
    assert other.json()["error"]["code"] == "idempotency_key_reused"
    assert other.headers["x-should-retry"] == "false"
    # Another route with the same body is another request too.
    routed = app.client.post("/v1/chat/completions", json={**BODY, "model": "echo"}, headers=headers)
    assert routed.status_code == 409
    assert app.balance("a") == after_first


def test_errors_release_the_key(app: App) -> None:
    headers = {**app.key("b"), "Idempotency-Key": "retry-me"}
    too_long = app.client.post("/v1/echo", json={**BODY, "max_completion_tokens": 10**6}, headers=headers)
    assert too_long.status_code == 400
    bad = app.client.post("/v1/echo", content=b"{", headers={**headers, "content-type": "application/json"})
    assert bad.status_code == 400
    ok = app.client.post("/v1/echo", json=BODY, headers=headers)  # nothing was stored for the failures
    assert ok.status_code == 200 and "idempotent-replayed" not in ok.headers
    assert app.usage_rows("b") == 1


def _events(response: Any) -> list[Any]:
    lines = [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_streamed_request_is_stored_and_replayed_as_a_stream(app: App) -> None:
    headers = {**app.key("c"), "Idempotency-Key": "stream-1"}
    body = {**BODY, "stream": True, "stream_options": {"include_usage": True}}
    with app.client.stream("POST", "/v1/echo", json=body, headers=headers) as r:
        assert r.status_code == 200
        first = _events(r)
    charged = app.balance("c")
    with app.client.stream("POST", "/v1/echo", json=body, headers=headers) as again:
        assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
        assert again.headers["content-type"].startswith("text/event-stream")
        replayed = _events(again)

    def text(events: list[Any]) -> str:
        return "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])

    assert text(replayed) == text(first) and text(first)
    assert {e["id"] for e in replayed} == {first[0]["id"]}
    assert replayed[-1]["usage"] == first[-1]["usage"] and replayed[-1]["choices"] == []
    assert replayed[-2]["choices"][0]["finish_reason"] == first[-2]["choices"][0]["finish_reason"]
    assert app.balance("c") == charged and app.usage_rows("c") == 1
    # Same key, the same request without streaming: another body, so 409 (never a silent re-render).
    other = app.client.post("/v1/echo", json=BODY, headers=headers)
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_key_reused"


def test_replay_requires_the_model_permission(app: App) -> None:
    everything = {**app.key("g"), "Idempotency-Key": "perm"}
    assert app.client.post("/v1/echo", json=BODY, headers=everything).status_code == 200
    narrow = {**app.key("g", models=["echo2"]), "Idempotency-Key": "perm"}
    refused = app.client.post("/v1/echo", json=BODY, headers=narrow)
    assert refused.status_code == 403, refused.text
    assert refused.json()["error"]["code"] == "model_not_permitted"
    assert "idempotent-replayed" not in refused.headers
    assert app.usage_rows("g") == 1


def test_tpm_reservation_then_correction_in_the_headers(app: App) -> None:
    auth = app.key("h", tpm=1000)
    ok = app.client.post("/v1/echo", json=BODY, headers=auth)
    assert ok.status_code == 200
    usage = ok.json()["usage"]
    # Admitted with the worst case reserved: the prompt plus max_completion_tokens (10).
    assert ok.headers["x-ratelimit-remaining-tokens"] == str(1000 - (usage["prompt_tokens"] + 10))
    assert usage["completion_tokens"] < 10  # so that the correction below is visible
    # Settled: the reservation was corrected to what the request really used.
    peek = app.client.post("/v1/echo", json={**BODY, "n": 2}, headers=auth)
    assert peek.status_code == 400
    assert peek.headers["x-ratelimit-remaining-tokens"] == str(1000 - usage["total_tokens"])
    assert peek.headers["x-ratelimit-limit-tokens"] == "1000"


def test_invalid_key_header(app: App) -> None:
    r = app.client.post("/v1/echo", json=BODY, headers={**app.key("d"), "Idempotency-Key": "x" * 256})
    assert r.status_code == 400 and "Idempotency-Key" in r.json()["error"]["message"]


def test_limited_key_gets_six_headers_on_every_response(app: App) -> None:
    auth = app.key("e", rpm=3, tpm=10_000)
    ok = app.client.post("/v1/echo", json=BODY, headers={**auth, "Idempotency-Key": "lim"})
    assert ok.status_code == 200 and all(h in ok.headers for h in SIX)
    assert ok.headers["x-ratelimit-remaining-requests"] == "2"
    # A replay takes nothing from the limits, and says where they stand.
    replay = app.client.post("/v1/echo", json=BODY, headers={**auth, "Idempotency-Key": "lim"})
    assert replay.headers["idempotent-replayed"] == "true"
    assert all(h in replay.headers for h in SIX)
    assert replay.headers["x-ratelimit-remaining-requests"] == "2"
    # 4xx after authentication, never admitted: headers, and nothing taken.
    bad = app.client.post("/v1/echo", json={**BODY, "n": 2}, headers=auth)
    assert bad.status_code == 400 and all(h in bad.headers for h in SIX)
    missing = app.client.post("/v1/nope", json=BODY, headers=auth)
    assert missing.status_code == 404 and missing.headers["x-ratelimit-remaining-requests"] == "2"
    assert app.client.post("/v1/echo", json=BODY, headers=auth).status_code == 200
    assert app.client.post("/v1/echo", json=BODY, headers=auth).status_code == 200
    limited = app.client.post("/v1/echo", json=BODY, headers=auth)
    assert limited.status_code == 429 and all(h in limited.headers for h in SIX)
    assert limited.headers["x-ratelimit-remaining-requests"] == "0"
    assert int(limited.headers["retry-after"]) >= 1


def test_stream_that_is_never_sent_settles_and_frees_the_key(app: App) -> None:
    """The client is gone before the first byte: Starlette never iterates the body, yet the hold is
    settled and the Idempotency-Key released (not left 'in progress' until it is abandoned)."""
    auth = {**app.key("s"), "Idempotency-Key": "never-sent"}
    raw = json.dumps({**BODY, "stream": True}).encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/echo",
        "raw_path": b"/v1/echo",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(raw)).encode()),
            *((name.lower().encode(), value.encode()) for name, value in auth.items()),
        ],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 80),
    }

    async def call() -> None:
        delivered = False

        async def receive() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": raw, "more_body": False}
            await anyio.sleep_forever()
            raise AssertionError("unreachable")

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                raise OSError("the client went away")

        with contextlib.suppress(Exception):
            await app.client.app(scope, receive, send)  # type: ignore[arg-type]

    app.call(call)

    async def open_holds() -> int:
        async with app.services.db.read() as conn:
            query = select(func.count()).select_from(holds).where(holds.c.status == "open")
            return int((await conn.execute(query)).scalar_one())

    assert app.call(open_holds) == 0
    again = app.client.post("/v1/echo", json={**BODY, "stream": True}, headers=auth)
    assert again.status_code == 200 and "idempotent-replayed" not in again.headers  # the key was free
