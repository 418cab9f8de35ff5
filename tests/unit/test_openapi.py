"""Issue 15.9: /openapi.json describes what the server does. The full check against a running server on
both databases is bench/schemathesis_run.py; these are its findings, kept as regression tests."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
from starlette.testclient import TestClient

from tests.unit._admin_client import admin_client


@pytest.fixture
def client(tmp_path: Path, database_url: str) -> Iterator[TestClient]:
    with admin_client(tmp_path, database_url) as c:
        yield c


def validator(spec: dict[str, Any], schema: dict[str, Any]) -> jsonschema_rs.Draft202012Validator:
    """A validator for `schema` whose `#/components/...` references resolve in `spec`."""
    return jsonschema_rs.Draft202012Validator({**schema, "components": spec["components"]})


def test_every_error_is_a_documented_400_envelope_not_422(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert (
        "422" not in json.dumps(spec["paths"]) and "HTTPValidationError" not in spec["components"]["schemas"]
    )
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            errors = {s: r for s, r in operation["responses"].items() if s >= "400"}
            assert "500" in errors, (method, path)
            for status, response in errors.items():
                if path != "/readyz":
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Error"}, (method, path, status)
            if path.startswith(("/v1/", "/admin/")):
                assert operation["security"] and "401" in errors, (method, path)
            if "requestBody" in operation:
                assert {"400", "408", "413"} <= set(errors), (method, path)


def test_chat_routes_metrics_and_readyz_are_described(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    for path in ("/v1/chat/completions", "/v1/{model}"):
        operation = spec["paths"][path]["post"]
        body = operation["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": "#/components/schemas/ChatCompletionRequest"}
        assert set(operation["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
        assert {"402", "429", "502", "504"} <= set(operation["responses"])
    assert "messages" in spec["components"]["schemas"]["ChatCompletionRequest"]["required"]
    assert set(spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    assert "503" in spec["paths"]["/readyz"]["get"]["responses"]
    for path in ("/admin/accounts", "/admin/keys", "/admin/codes"):
        assert spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]


def test_real_answers_validate_against_the_document(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert client.post("/admin/accounts", json={"name": "default", "credits": "1"}).status_code == 201
    key = client.post("/admin/keys", json={"account": "default"}).json()["key"]
    ok = client.post(
        "/v1/echo",
        json={"messages": [{"role": "user", "content": "one two"}], "max_completion_tokens": 5},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert ok.status_code == 200, ok.text
    validator(spec, {"$ref": "#/components/schemas/ChatCompletion"}).validate(ok.json())
    models = client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).json()
    validator(
        spec, spec["paths"]["/v1/models"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    ).validate(models)
    refused = client.post("/v1/echo", json={"messages": []}, headers={"Authorization": f"Bearer {key}"})
    assert refused.status_code == 400
    validator(spec, {"$ref": "#/components/schemas/Error"}).validate(refused.json())


def test_allow_lists_every_method_of_the_path(client: TestClient) -> None:
    assert client.options("/admin/accounts").headers["allow"] == "GET, POST"
    assert client.options("/admin/codes").headers["allow"] == "GET, POST"
    # POST /v1/{model} also matches /v1/models, but /v1/models is its own path: GET only.
    assert client.options("/v1/models").headers["allow"] == "GET"


def test_admin_body_that_is_not_json_is_400(client: TestClient) -> None:
    """Found by schemathesis: a body FastAPI hands over as bytes (no JSON content type) was a 500."""
    for path in ("/admin/keys", "/admin/accounts", "/admin/accounts/default/credits"):
        r = client.post(path, content=b'{"account": "default"}', headers={"content-type": "text/plain"})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", (path, r.text)


def test_a_cursor_past_bigint_is_400(client: TestClient) -> None:
    """Found by schemathesis on PostgreSQL: a `before` cursor of 19 digits above 2**63 - 1 was a 500."""
    cursor = base64.urlsafe_b64encode(b"u1:9999999999999999999").decode().rstrip("=")
    r = client.get("/admin/usage/requests", params={"before": cursor})
    assert r.status_code == 400 and r.json()["error"]["param"] == "before", r.text
    biggest = base64.urlsafe_b64encode(f"u1:{2**63 - 1}".encode()).decode().rstrip("=")
    assert client.get("/admin/usage/requests", params={"before": biggest}).status_code == 200


def test_a_limit_of_unicode_digits_is_400(client: TestClient) -> None:
    """Found by schemathesis: `limit=²` passed str.isdigit() and then failed int(): a 500."""
    r = client.get("/admin/usage/requests", params={"limit": "²"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "limit", r.text
