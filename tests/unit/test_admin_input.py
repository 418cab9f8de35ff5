"""Issue 15.5: every admin input error is a 400 envelope, on SQLite and on PostgreSQL (which cannot store
NUL in text and used to answer 500). One rule for names, labels, model ids and looked-up ids:
`tokentill.names`, the same the CLI uses (tests/e2e/test_cli_e2e.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from starlette.testclient import TestClient

from tests.unit._admin_client import admin_client
from tokentill.api.console.forms import name_field
from tokentill.errors import InvalidRequest
from tokentill.names import check_models, check_name, name_problem

NOT_NAMES = [
    "",
    " team",
    "team\t",
    "te\x00am",
    *(f"te{chr(c)}am" for c in range(0x1C, 0x20)),  # Python's strip() calls these whitespace
    "te\x7fam",
    "te\x85am",
    "line\u2028break",
    "bidi\u202eoverride",
]


@pytest.fixture
def admin(tmp_path: Path, database_url: str) -> Iterator[TestClient]:
    with admin_client(tmp_path, database_url) as client:
        assert client.post("/admin/accounts", json={"name": "team", "credits": "1"}).status_code == 201
        yield client


def post_json(client: TestClient, path: str, body: Any) -> Any:
    # json.dumps escapes NUL and the controls as \u00XX: the server receives valid JSON holding them.
    return client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})


def assert_400(response: Any, param: str) -> None:
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("invalid_request_error", "invalid_value", param)


@pytest.mark.parametrize("name", NOT_NAMES, ids=ascii)
def test_bad_names_and_labels_are_400(admin: TestClient, name: str) -> None:
    assert_400(post_json(admin, "/admin/accounts", {"name": name}), "name")
    assert_400(post_json(admin, "/admin/keys", {"account": "team", "name": name}), "name")
    assert_400(post_json(admin, "/admin/keys", {"account": "team", "models": ["echo", name]}), "models[1]")
    assert [a["name"] for a in admin.get("/admin/accounts").json()["data"]] == ["team"]


def test_empty_model_list_and_long_names_are_400(admin: TestClient) -> None:
    assert_400(post_json(admin, "/admin/keys", {"account": "team", "models": []}), "models")
    assert_400(post_json(admin, "/admin/accounts", {"name": "n" * 65}), "name")
    assert_400(post_json(admin, "/admin/keys", {"account": "team", "name": "n" * 129}), "name")
    assert_400(post_json(admin, "/admin/keys", {"account": "team", "models": ["m" * 129]}), "models[0]")


@pytest.mark.parametrize("bad", ["te\x00am", "a\x1fb", "x" * 257], ids=ascii)
def test_bad_ids_in_paths_are_400(admin: TestClient, bad: str) -> None:
    segment = quote(bad, safe="")
    assert_400(admin.post(f"/admin/accounts/{segment}/credits", json={"credits": "1"}), "name")
    assert_400(admin.delete(f"/admin/keys/{segment}"), "key_id")
    assert_400(post_json(admin, "/admin/keys", {"account": bad}), "account")


def test_good_input_still_works(admin: TestClient) -> None:
    r = post_json(admin, "/admin/accounts", {"name": "Café ☕ team 2"})
    assert r.status_code == 201, r.text
    r = post_json(
        admin, "/admin/keys", {"account": "Café ☕ team 2", "name": "ci", "models": ["echo", "echo"]}
    )
    assert r.status_code == 201 and r.json()["models"] == ["echo"], r.text
    # Well-formed but unknown: 404, as for any unknown id.
    assert admin.delete("/admin/keys/abcdefgh").json()["error"]["code"] == "key_not_found"
    r = admin.post("/admin/accounts/nobody/credits", json={"credits": "1"})
    assert r.json()["error"]["code"] == "account_not_found"
    assert post_json(admin, "/admin/keys", {"account": "nobody"}).status_code == 404


def test_one_rule_for_every_caller() -> None:
    for bad in [*NOT_NAMES, "n" * 65]:
        assert name_problem(bad) is not None, ascii(bad)
        if bad:  # the console's forms ("" there means "not given")
            with pytest.raises(InvalidRequest):
                name_field(bad, "name", required=True)
    assert name_problem("a b") is None and check_name("ok") == "ok"
    assert check_models(["a", "b", "a"]) == ["a", "b"] and check_models(None) is None
