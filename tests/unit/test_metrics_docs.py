"""`/metrics` counts every response (refusals included) by status and code, and can be locked with
TOKENTILL_METRICS_KEY; `/docs` serves Swagger UI from the package; both docs routes can be switched off.
In-process with the echo engine on SQLite."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from tokentill.app import create_app
from tokentill.services import Services
from tokentill.settings import Settings

ADMIN = "admin-key-for-tests-0123456789"
METRICS_KEY = "metrics-key-for-tests-0123456789"

Client = Callable[..., tuple[TestClient, str]]


def response_counts(text: str) -> dict[tuple[str, str], float]:
    return {
        (s.labels["status"], s.labels["code"]): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "tokentill_http_responses_total"
    }


@pytest.fixture
def make_client(tmp_path: Path) -> Iterator[Client]:
    catalogue = tmp_path / "models.toml"
    catalogue.write_text('[[models]]\nid = "echo"\nengine = "echo"\nprice_input = 15\nprice_output = 60\n')
    opened: list[TestClient] = []

    def make(**overrides: Any) -> tuple[TestClient, str]:
        settings = Settings(
            data_dir=tmp_path / f"data{len(opened)}",
            config=catalogue,
            admin_key=ADMIN,
            max_body_bytes=4096,
            **overrides,
        )
        client = TestClient(create_app(settings), raise_server_exceptions=False)
        client.__enter__()
        opened.append(client)
        services: Services = client.app.state.services  # type: ignore[attr-defined]

        async def setup() -> str:
            await services.ledger.create_account("poor", 0)
            return (await services.keys.create_key("poor", rpm=1)).key

        return client, client.portal.call(setup)  # type: ignore[union-attr]

    yield make
    for client in opened:
        client.__exit__(None, None, None)


def test_every_response_counts_by_status_and_code(make_client: Client) -> None:
    client, key = make_client()
    auth = {"Authorization": f"Bearer {key}"}
    before = response_counts(client.get("/metrics").text)
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 5}
    expected = [
        (client.get("/v1/models"), "401", "missing_api_key"),
        (client.get("/v1/models", headers={"Authorization": "Bearer tt-nope"}), "401", "invalid_api_key"),
        (client.post("/v1/echo", json=chat, headers=auth), "402", "insufficient_credits"),
        (client.post("/v1/echo", json=chat, headers=auth), "429", "rate_limit_exceeded"),
        (client.get("/admin/accounts", headers=auth), "403", "admin_required"),
        (client.get("/nowhere"), "404", "unknown_url"),
        (client.delete("/v1/models"), "405", "method_not_allowed"),
        (client.post("/v1/echo", content=b"x" * 5000, headers=auth), "413", "request_too_large"),
        (client.post("/v1/chat/completions", content=b"{", headers=auth), "400", "invalid_json"),
        (client.get("/healthz"), "200", ""),
    ]
    for response, status, code in expected:
        assert str(response.status_code) == status, (status, code, response.text)
        if code:
            assert response.json()["error"]["code"] == code
    after = response_counts(client.get("/metrics").text)
    for _response, status, code in expected:
        assert after[status, code] - before.get((status, code), 0) >= 1, (status, code, after)
    # The scrape before this one counted too (200), and nothing was counted twice.
    grown = sum(after.values()) - sum(before.values())
    assert grown == len(expected) + 1, (grown, after)


def test_refusals_written_below_the_app_count_too(make_client: Client) -> None:
    from tokentill.api.connections import _raw_response
    from tokentill.errors import Overloaded

    client, _ = make_client()
    before = response_counts(client.get("/metrics").text)
    raw = _raw_response(Overloaded("Too many open connections.", retry_after_s=1))
    assert raw.startswith(b"HTTP/1.1 503 ")
    after = response_counts(client.get("/metrics").text)
    assert after["503", "overloaded"] - before.get(("503", "overloaded"), 0) == 1


def test_metrics_key_locks_metrics(make_client: Client) -> None:
    open_client, _ = make_client()
    assert open_client.get("/metrics").status_code == 200  # unset = open
    client, key = make_client(metrics_key=METRICS_KEY)
    missing = client.get("/metrics")
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "missing_api_key"
    assert missing.headers["www-authenticate"].startswith("Bearer")
    for wrong in (key, METRICS_KEY + "x", ADMIN[:-1]):
        r = client.get("/metrics", headers={"Authorization": f"Bearer {wrong}"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", wrong
    for right in (METRICS_KEY, ADMIN):
        r = client.get("/metrics", headers={"Authorization": f"Bearer {right}"})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        assert "tokentill_http_responses_total" in r.text


def test_docs_load_swagger_from_the_package(make_client: Client) -> None:
    client, _ = make_client()
    page = client.get("/docs")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "https://" not in page.text and "http://" not in page.text  # nothing from a CDN
    assert '"validatorUrl": null' in page.text  # no badge fetched from swagger.io
    for asset, kind in (
        ("/static/swagger/swagger-ui-bundle.js", "javascript"),
        ("/static/swagger/swagger-ui.css", "text/css"),
        ("/static/swagger/LICENSE", ""),
        ("/static/console/favicon.svg", "image/svg+xml"),
    ):
        assert asset in page.text or asset.endswith("LICENSE")
        r = client.get(asset)
        assert r.status_code == 200 and kind in r.headers["content-type"], asset
    assert client.get("/openapi.json").json()["info"]["title"] == "tokentill"
    assert client.get("/redoc").status_code == 404
    missing = client.get("/static/swagger/nope.js")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "unknown_url"


def test_docs_can_be_switched_off(make_client: Client) -> None:
    client, _ = make_client(docs_enabled=False)
    for path in ("/docs", "/openapi.json"):
        r = client.get(path)
        assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_url", path
    assert client.get("/healthz").status_code == 200
