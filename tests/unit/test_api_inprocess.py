"""In-process API tests (Starlette's TestClient) with the echo engine: the failure paths that a real model
cannot be made to take on demand — a bug (500), an engine failure (502), a stream that breaks midway."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from tokentill import errors
from tokentill.api.middleware import RequestIdFilter
from tokentill.app import create_app
from tokentill.engines.base import Capabilities, EngineRequest
from tokentill.protocol.chat import decode_chat_body
from tokentill.services import Services
from tokentill.settings import Settings
from tokentill.types import EngineEvent, TextDelta


@dataclass
class Harness:
    client: TestClient
    services: Services
    key: str

    def balance(self) -> int:
        async def read() -> int:
            account = await self.services.ledger.get_account("acct")
            assert account is not None
            return account.balance

        return self.client.portal.call(read)  # type: ignore[union-attr]


class FailingEngine:
    """Emits `before` deltas, then raises `error`."""

    def __init__(self, error: Exception, before: int = 0) -> None:
        self.capabilities = Capabilities(context_length=4096)
        self.error = error
        self.before = before

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    def count_prompt_tokens(self, request: EngineRequest) -> int:
        return 10

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineEvent]:
        for i in range(self.before):
            yield TextDelta(f"t{i} ")
        logging.getLogger("tests.failing_engine").info("failing now")
        raise self.error


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    catalogue = tmp_path / "models.toml"
    catalogue.write_text('[[models]]\nid = "echo"\nengine = "echo"\nprice_input = 15\nprice_output = 60\n')
    settings = Settings(data_dir=tmp_path / "data", config=catalogue)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        services: Services = client.app.state.services  # type: ignore[attr-defined]

        async def setup() -> str:
            await services.ledger.create_account("acct", 1_000_000)
            return (await services.keys.create_key("acct")).key

        key = client.portal.call(setup)  # type: ignore[union-attr]
        client.headers["Authorization"] = f"Bearer {key}"
        yield Harness(client, services, key)


BODY: dict[str, Any] = {
    "messages": [{"role": "user", "content": "one two three"}],
    "max_completion_tokens": 10,
}


def test_echo_completion_billed_exactly(harness: Harness) -> None:
    r = harness.client.post("/v1/echo", json=BODY)
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert r.json()["choices"][0]["message"]["content"] == "one two three"
    assert harness.balance() == 1_000_000 - usage["prompt_tokens"] * 15 - usage["completion_tokens"] * 60
    assert Decimal(r.headers["x-remaining-credits"]) == Decimal(harness.balance()) / 1_000_000


def test_bug_is_a_generic_500(harness: Harness, caplog: pytest.LogCaptureFixture) -> None:
    harness.services.engines["echo"] = FailingEngine(RuntimeError("secret internal detail"))
    caplog.handler.addFilter(RequestIdFilter())  # what the server's log handler does (app.log_config)
    with caplog.at_level(logging.INFO):
        r = harness.client.post("/v1/echo", json=BODY)
    assert r.status_code == 500
    error = r.json()["error"]
    request_id = r.headers["x-request-id"]
    assert error["code"] == "internal_error" and error["type"] == "server_error"
    assert "secret" not in r.text and request_id in error["message"]
    assert harness.balance() == 1_000_000
    # The details go to the log, under the request id, with the traceback.
    (bug,) = [rec for rec in caplog.records if rec.levelno == logging.ERROR]
    assert request_id in bug.getMessage() and bug.exc_info is not None
    assert bug.request_id == request_id  # type: ignore[attr-defined]
    assert "secret internal detail" in caplog.text
    # Any line logged while the request runs carries its id (here, one from the engine).
    (during,) = [rec for rec in caplog.records if rec.name == "tests.failing_engine"]
    assert during.request_id == request_id  # type: ignore[attr-defined]


def test_engine_failure_is_502_and_free(harness: Harness) -> None:
    harness.services.engines["echo"] = FailingEngine(errors.UpstreamError("The model failed."), before=3)
    r = harness.client.post("/v1/echo", json=BODY)
    assert r.status_code == 502
    assert r.json()["error"]["code"] == "upstream_error"
    assert harness.balance() == 1_000_000  # nothing reached the client, nothing is charged


def test_stream_that_breaks_midway(harness: Harness) -> None:
    harness.services.engines["echo"] = FailingEngine(errors.UpstreamError("The model failed."), before=3)
    with harness.client.stream("POST", "/v1/echo", json={**BODY, "stream": True}) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] != "data: [DONE]"
    last = json.loads(lines[-1][len("data: ") :])
    assert last["error"]["code"] == "upstream_error"
    contents = [json.loads(line[6:])["choices"][0]["delta"].get("content") for line in lines[1:-1]]
    assert contents == ["t0 ", "t1 ", "t2 "]
    # The three streamed tokens were delivered, so they are billed: 10 prompt + 3 completion tokens.
    assert harness.balance() == 1_000_000 - 10 * 15 - 3 * 60


def test_x_api_key_beside_another_authorization_scheme(harness: Harness) -> None:
    headers = {"Authorization": "Basic dXNlcjpwYXNz", "x-api-key": harness.key}
    assert harness.client.post("/v1/echo", json=BODY, headers=headers).status_code == 200
    r = harness.client.post("/v1/echo", json=BODY, headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"


def test_unknown_route_and_method(harness: Harness) -> None:
    assert harness.client.get("/nope").json()["error"]["code"] == "unknown_url"
    r = harness.client.put("/v1/models")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_admin_routes_closed_without_admin_key(harness: Harness) -> None:
    r = harness.client.get("/admin/accounts")  # the harness's client key is not the admin key
    assert r.status_code == 403 and r.json()["error"]["code"] == "admin_required"
    r = harness.client.get("/admin/accounts", headers={"Authorization": ""})
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"


def test_admin_routes_with_admin_key(tmp_path: Path) -> None:
    # No model is needed to manage accounts: an echo catalogue keeps this test fast.
    catalogue = tmp_path / "models.toml"
    catalogue.write_text('[[models]]\nid = "echo"\nengine = "echo"\n')
    app = create_app(Settings(data_dir=tmp_path / "data", config=catalogue, admin_key="adm-secret"))  # type: ignore[arg-type]
    with TestClient(app, headers={"Authorization": "Bearer adm-secret"}) as admin:
        assert admin.post("/admin/accounts", json={"name": "team", "credits": "1.5"}).status_code == 201
        assert admin.post("/admin/accounts", json={"name": "team"}).status_code == 409
        r = admin.post("/admin/accounts", json={"credits": "1"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "name"
        # Input the ledger or the database would refuse is a 400, never a 500.
        for bad in (
            {"name": " team"},
            {"name": "n" * 65},
            {"name": "te\ud800am"},
            {"name": "t", "credits": "1e999999"},
        ):
            r = admin.post(
                "/admin/accounts", content=json.dumps(bad), headers={"content-type": "application/json"}
            )
            assert r.status_code == 400, (bad, r.text)
        r = admin.post("/admin/keys", json={"account": "team", "rpm": 2**40})
        assert r.status_code == 400 and r.json()["error"]["param"] == "rpm", r.text
        assert (
            admin.post("/admin/accounts/team/credits", json={"credits": "0.25"}).json()["balance"] == "1.75"
        )
        key = admin.post("/admin/keys", json={"account": "team", "models": ["echo"]}).json()
        r = admin.post("/v1/echo", json=BODY, headers={"Authorization": f"Bearer {key['key']}"})
        assert r.status_code == 200, r.text
        assert admin.delete(f"/admin/keys/{key['id']}").json() == {"id": key["id"], "revoked": True}
        r = admin.post("/v1/echo", json=BODY, headers={"Authorization": f"Bearer {key['key']}"})
        assert r.status_code == 401
        names = [a["name"] for a in admin.get("/admin/accounts").json()["data"]]
        assert names == ["team"]


def test_stream_failing_before_output_is_an_http_error(harness: Harness) -> None:
    harness.services.engines["echo"] = FailingEngine(errors.Overloaded("busy", retry_after_s=2))
    r = harness.client.post("/v1/echo", json={**BODY, "stream": True})
    assert r.status_code == 503, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["error"]["code"] == "overloaded" and r.headers["retry-after"] == "2"
    assert harness.balance() == 1_000_000


def test_metrics_count_settled_requests(harness: Harness) -> None:
    assert harness.client.post("/v1/echo", json=BODY).status_code == 200
    text = harness.client.get("/metrics").text
    assert 'tokentill_requests_total{model="echo",status="200"}' in text
    assert 'tokentill_tokens_total{kind="completion",model="echo"}' in text
    assert "tokentill_charged_microcredits_total" in text


def test_large_bodies_are_bounded_and_parsed_off_the_loop(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tokentill.api import routes

    threads: list[str] = []

    def traced(raw: bytes) -> Any:
        threads.append(threading.current_thread().name)
        return decode_chat_body(raw)

    monkeypatch.setattr(routes, "decode_chat_body", traced)
    # A million tiny parts (31 MB) would hold the GIL for seconds in json.loads and pydantic: refused first.
    parts = [{"type": "text", "text": "a"}] * 1_000_000
    r = harness.client.post("/v1/echo", json={**BODY, "messages": [{"role": "user", "content": parts}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_value", r.text
    r = harness.client.post("/v1/echo", json={**BODY, "messages": [{"role": "user", "content": "x"}] * 3000})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
    parts = [{"type": "text", "text": "a"}] * 9000
    r = harness.client.post("/v1/echo", json={**BODY, "messages": [{"role": "user", "content": parts}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content", r.text
    # A large body within the bounds is decoded in a worker thread, a small one on the event loop.
    loop_thread = threads[-1]
    big = {**BODY, "messages": [{"role": "user", "content": "x" * (2 * 1024 * 1024)}]}
    r = harness.client.post("/v1/echo", json=big)
    assert r.status_code == 200, r.text
    assert threads[-1] != loop_thread and threads.count(loop_thread) == 2  # the 31 MB body went off it too
    assert harness.client.post("/v1/echo", json=BODY).status_code == 200
    assert threads[-1] == loop_thread
