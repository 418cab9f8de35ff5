"""The self-serve JSON API (`/v1/account`, `/v1/usage`, `/v1/usage/requests`, `/v1/account/redeem`) and the
admin code / usage routes, in-process with the echo engine, on SQLite and on PostgreSQL.

Each key must only ever see its own account: every test that reads data also reads it with a key of
another account and checks that nothing leaks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update
from starlette.testclient import TestClient

from tokentill.app import create_app
from tokentill.billing.money import format_credits
from tokentill.services import Services
from tokentill.settings import Settings
from tokentill.storage.schema import ledger, redemption_codes

ADMIN = "admin-key-for-tests-0123456789"
ATTEMPTS = 8  # redeem attempts per key per minute
PRICES = {"echo": (15, 60), "echo-b": (7, 11)}


@dataclass
class Harness:
    client: TestClient
    services: Services
    keys: dict[str, str]  # label → full key: a1, a2 (account a), b1 (account b)

    def call(self, coro: Any) -> Any:
        return self.client.portal.call(lambda: coro)  # type: ignore[union-attr]

    def get(self, path: str, key: str = "a1", **params: Any) -> Any:
        return self.client.get(path, params=params, headers={"Authorization": f"Bearer {self.keys[key]}"})

    def post(self, path: str, body: Any, key: str = "a1") -> Any:
        return self.client.post(path, json=body, headers={"Authorization": f"Bearer {self.keys[key]}"})

    def chat(self, key: str, model: str, words: int) -> dict[str, Any]:
        body = {
            "messages": [{"role": "user", "content": " ".join(["w"] * words)}],
            "max_completion_tokens": 20,
        }
        r = self.post(f"/v1/{model}", body, key)
        assert r.status_code == 200, r.text
        return {**r.json(), "request_id": r.headers["x-request-id"]}


@pytest.fixture
def harness(tmp_path: Path, database_url: str) -> Iterator[Harness]:
    catalogue = tmp_path / "models.toml"
    catalogue.write_text(
        "".join(
            f'[[models]]\nid = "{m}"\nengine = "echo"\nprice_input = {i}\nprice_output = {o}\n'
            for m, (i, o) in PRICES.items()
        )
    )
    settings = Settings(
        data_dir=tmp_path / "data",
        config=catalogue,
        database_url=database_url,
        admin_key=ADMIN,
        redeem_attempts_per_minute=ATTEMPTS,
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        services: Services = client.app.state.services  # type: ignore[attr-defined]

        async def setup() -> dict[str, str]:
            await services.ledger.create_account("a", 5_000_000)
            await services.ledger.create_account("b", 1_000_000)
            return {
                "a1": (await services.keys.create_key("a", name="first", rpm=100)).key,
                "a2": (await services.keys.create_key("a", models=["echo-b"])).key,
                "b1": (await services.keys.create_key("b")).key,
            }

        keys = client.portal.call(setup)  # type: ignore[union-attr]
        yield Harness(client, services, keys)


def key_id(full_key: str) -> str:
    return full_key.split("-")[1]


def expected_cost(model: str, usage: dict[str, Any]) -> int:
    price_in, price_out = PRICES[model]
    return int(usage["prompt_tokens"] * price_in + usage["completion_tokens"] * price_out)


def test_account_summary_and_auth(harness: Harness) -> None:
    r = harness.get("/v1/account")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["account"] == "a" and body["balance"] == "5" == r.headers["x-remaining-credits"]
    key = body["key"]
    assert key["id"] == key_id(harness.keys["a1"]) and key["name"] == "first" and key["rpm"] == 100
    assert key["models"] is None and key["tpm"] is None and key["max_concurrent"] is None
    assert isinstance(key["created_at"], int)
    assert harness.get("/v1/account", "a2").json()["key"]["models"] == ["echo-b"]
    assert harness.get("/v1/account", "b1").json()["account"] == "b"
    # No key, a wrong key, a revoked key: 401 on every account route.
    assert harness.client.get("/v1/account").json()["error"]["code"] == "missing_api_key"
    harness.call(harness.services.keys.revoke(key_id(harness.keys["a2"])))
    wrong = harness.keys["b1"][:-4] + "AAAA"
    for path in ("/v1/account", "/v1/usage", "/v1/usage/requests"):
        for bad in (harness.keys["a2"], wrong):
            r = harness.client.get(path, headers={"Authorization": f"Bearer {bad}"})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (path, r.text)
    r = harness.post("/v1/account/redeem", {"code": "ttc-x"}, "a2")
    assert r.status_code == 401


def test_usage_sums_match_the_requests_and_stay_in_the_account(harness: Harness) -> None:
    made = [
        ("a1", "echo", harness.chat("a1", "echo", 3)),
        ("a1", "echo", harness.chat("a1", "echo", 5)),
        ("a1", "echo-b", harness.chat("a1", "echo-b", 2)),
        ("a2", "echo-b", harness.chat("a2", "echo-b", 4)),
        ("b1", "echo", harness.chat("b1", "echo", 7)),
    ]
    ours = [(k, m, r["usage"]) for k, m, r in made if k != "b1"]
    today = datetime.now(UTC).date().isoformat()

    r = harness.get("/v1/usage")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["group_by"] == ["day"] and body["end"] == today
    total = body["total"]
    assert total["requests"] == 4
    assert total["prompt_tokens"] == sum(u["prompt_tokens"] for _, _, u in ours)
    assert total["completion_tokens"] == sum(u["completion_tokens"] for _, _, u in ours)
    assert total["reasoning_tokens"] == total["cached_tokens"] == total["image_tokens"] == 0
    assert total["cost"] == format_credits(sum(expected_cost(m, u) for _, m, u in ours))
    assert [row["bucket"] for row in body["data"]] == [today] and body["data"][0]["day"] == today
    assert {k: v for k, v in body["data"][0].items() if k not in {"bucket", "day"}} == total

    by_model = harness.get("/v1/usage", group_by="model").json()["data"]
    assert [(row["bucket"], row["model"], row["requests"]) for row in by_model] == [
        ("echo", "echo", 2),
        ("echo-b", "echo-b", 2),
    ]
    assert by_model[1]["cost"] == format_credits(
        sum(expected_cost(m, u) for _, m, u in ours if m == "echo-b")
    )
    pairs = harness.get("/v1/usage", group_by="day,model").json()["data"]
    assert [(row["bucket"], row["day"], row["model"], row["requests"]) for row in pairs] == [
        (today, today, "echo", 2),
        (today, today, "echo-b", 2),
    ]
    by_key = harness.get("/v1/usage", group_by="key").json()["data"]
    assert {row["key"]: row["requests"] for row in by_key} == {
        key_id(harness.keys["a1"]): 3,
        key_id(harness.keys["a2"]): 1,
    }
    hours = harness.get("/v1/usage", group_by="hour", start=today, end=today).json()["data"]
    assert sum(row["requests"] for row in hours) == 4
    assert all(row["hour"].startswith(today + "T") and row["hour"].endswith(":00:00Z") for row in hours)

    # The other account sees only its own request; an empty range is empty.
    b = harness.get("/v1/usage", "b1", group_by="key").json()
    assert b["total"]["requests"] == 1 and [row["key"] for row in b["data"]] == [key_id(harness.keys["b1"])]
    empty = harness.get("/v1/usage", start="2020-01-01", end="2020-01-31").json()
    assert empty["data"] == [] and empty["total"]["requests"] == 0 and empty["total"]["cost"] == "0"


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"start": "2026-13-01"}, "start"),
        ({"start": "20261201"}, "start"),
        ({"end": "yesterday"}, "end"),
        ({"end": "2026-02-30"}, "end"),
        ({"start": "2026-12-02", "end": "2026-12-01"}, "end"),
        ({"start": "2020-01-01", "end": "2026-01-01"}, "start"),
        ({"start": "2026-01-01", "end": "2026-02-15", "group_by": "hour"}, "start"),
        ({"group_by": "week"}, "group_by"),
        ({"group_by": "account"}, "group_by"),
        ({"group_by": "day,hour"}, "group_by"),
        ({"group_by": "model,model"}, "group_by"),
        ({"group_by": ""}, "group_by"),
    ],
)
def test_usage_refuses_bad_queries(harness: Harness, params: dict[str, str], param: str) -> None:
    r = harness.get("/v1/usage", **params)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_value"
    assert error["param"] == param


def test_usage_hour_range_at_the_cap(harness: Harness) -> None:
    r = harness.get("/v1/usage", start="2026-01-01", end="2026-01-31", group_by="hour,model")
    assert r.status_code == 200 and r.json()["data"] == []


def test_request_log_pages_newest_first(harness: Harness) -> None:
    harness.chat("b1", "echo", 2)  # older than every row of account a
    made = [harness.chat("a1" if i % 2 else "a2", "echo-b", i + 1) for i in range(5)]
    seen: list[dict[str, Any]] = []
    cursor = None
    while True:
        params = {"limit": 2, **({"before": cursor} if cursor else {})}
        r = harness.get("/v1/usage/requests", **params)
        assert r.status_code == 200, r.text
        page = r.json()
        assert len(page["data"]) <= 2
        seen.extend(page["data"])
        cursor = page["next"]
        if cursor is None:
            break
    assert [row["id"] for row in seen] == [r["request_id"] for r in reversed(made)]
    newest, response = seen[0], made[-1]
    assert newest["model"] == "echo-b" and newest["status"] == 200
    assert newest["key_id"] == key_id(harness.keys["a2"])
    assert newest["prompt_tokens"] == response["usage"]["prompt_tokens"]
    assert newest["completion_tokens"] == response["usage"]["completion_tokens"]
    assert newest["cost"] == format_credits(expected_cost("echo-b", response["usage"]))
    assert isinstance(newest["latency_ms"], int) and abs(newest["created"] - response["created"]) <= 2
    assert len(harness.get("/v1/usage/requests").json()["data"]) == 5  # default limit 50
    # Another account's key with this account's cursor still sees only its own rows.
    first_page = harness.get("/v1/usage/requests", limit=1).json()
    other = harness.get("/v1/usage/requests", "b1", before=first_page["next"]).json()
    assert [row["model"] for row in other["data"]] == ["echo"] and other["next"] is None


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "501"}, "limit"),
        ({"limit": "-1"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"before": "not-a-cursor"}, "before"),
        ({"before": "dTE6YWJj"}, "before"),  # base64 of "u1:abc"
        ({"before": "%%%"}, "before"),
    ],
)
def test_request_log_refuses_bad_parameters(harness: Harness, params: dict[str, str], param: str) -> None:
    r = harness.get("/v1/usage/requests", **params)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def admin(harness: Harness, method: str, path: str, **kwargs: Any) -> Any:
    return harness.client.request(method, path, headers={"Authorization": f"Bearer {ADMIN}"}, **kwargs)


def test_redeem_once_then_409_and_404s(harness: Harness) -> None:
    r = admin(harness, "POST", "/admin/codes", json={"credits": "2.5", "count": 3, "expires_days": 7})
    assert r.status_code == 201, r.text
    codes = r.json()["data"]
    assert len(codes) == 3 and all(c["credits"] == "2.5" and c["expires_at"] for c in codes)
    first, second, third = (c["code"] for c in codes)

    r = harness.post("/v1/account/redeem", {"code": first})
    assert r.status_code == 200, r.text
    assert r.json() == {"object": "redemption", "code_id": codes[0]["id"], "credits": "2.5", "balance": "7.5"}
    assert r.headers["x-remaining-credits"] == "7.5"
    again = harness.post("/v1/account/redeem", {"code": first}, "b1")
    assert again.status_code == 409
    assert again.json()["error"] == {
        "message": "This redemption code has already been redeemed.",
        "type": "invalid_request_error",
        "param": "code",
        "code": "code_already_redeemed",
    }
    # Case and blanks do not matter; the other account gets the second code.
    r = harness.post("/v1/account/redeem", {"code": f"  {second.upper()} "}, "b1")
    assert r.status_code == 200 and r.json()["balance"] == "3.5"
    # Unknown, malformed, a wrong secret for a real id, and an expired code: all the same 404.
    wrong_secret = third[:-4] + ("aaaa" if not third.endswith("aaaa") else "bbbb")
    harness.call(_expire(harness, codes[2]["id"]))
    for bad in ("ttc-abcdefgh-" + "a" * 32, "nonsense", wrong_secret, third):
        r = harness.post("/v1/account/redeem", {"code": bad}, "b1")
        assert r.status_code == 404, (bad, r.text)
        assert r.json()["error"]["code"] == "code_not_found" and r.json()["error"]["param"] == "code"
    for body in ({}, {"code": ""}, {"code": 5}, {"code": first, "extra": 1}, [first]):
        assert harness.post("/v1/account/redeem", body).status_code == 400, body
    auth = {"Authorization": f"Bearer {harness.keys['a1']}"}
    r = harness.client.post("/v1/account/redeem", content=b"{not json", headers=auth)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert harness.client.get("/v1/account/redeem", headers=auth).status_code == 405
    # One 'credit' ledger row per redemption, naming the code id and never the code.
    rows = harness.call(_ledger_rows(harness))
    redeemed = [row for row in rows if (row.ref or "").startswith("code:")]
    assert [(row.ref, row.amount, row.kind) for row in redeemed] == [
        (f"code:{codes[0]['id']}", 2_500_000, "credit"),
        (f"code:{codes[1]['id']}", 2_500_000, "credit"),
    ]
    secret = first.split("-", 2)[2]
    assert not any(secret in row.note or secret in (row.ref or "") for row in rows)
    for name in ("a", "b"):
        account = harness.call(harness.services.ledger.get_account(name))
        assert harness.call(harness.services.ledger.audit(account.id)).consistent
    listed = {c["id"]: c for c in admin(harness, "GET", "/admin/codes").json()["data"]}
    assert listed[codes[0]["id"]]["status"] == "redeemed" and listed[codes[0]["id"]]["redeemed_by"] == "a"
    assert listed[codes[1]["id"]]["redeemed_key_id"] == key_id(harness.keys["b1"])
    assert listed[codes[2]["id"]]["status"] == "expired"
    assert first not in admin(harness, "GET", "/admin/codes").text


async def _expire(harness: Harness, code_id: str) -> None:
    async with harness.services.db.begin() as conn:
        await conn.execute(
            update(redemption_codes)
            .where(redemption_codes.c.id == code_id)
            .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )


async def _ledger_rows(harness: Harness) -> list[Any]:
    async with harness.services.db.read() as conn:
        return list((await conn.execute(select(ledger).order_by(ledger.c.id))).all())


def test_redeem_attempts_are_rate_limited_per_key(harness: Harness) -> None:
    statuses = [
        harness.post("/v1/account/redeem", {"code": f"guess-{i}"}).status_code for i in range(ATTEMPTS)
    ]
    assert statuses == [404] * ATTEMPTS
    r = harness.post("/v1/account/redeem", {"code": "guess"})
    assert r.status_code == 429 and "Retry-After" in r.headers
    assert r.json()["error"]["code"] == "rate_limit_exceeded" and "redemption" in r.json()["error"]["message"]
    assert harness.post("/v1/account/redeem", {"code": "guess"}, "a2").status_code == 404  # another key


def test_admin_codes_and_operator_usage(harness: Harness) -> None:
    harness.chat("a1", "echo", 3)
    harness.chat("b1", "echo-b", 2)
    for bad_key in ("a1", "b1"):
        r = harness.client.get("/admin/codes", headers={"Authorization": f"Bearer {harness.keys[bad_key]}"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin_required"
    for body in (
        {"credits": "0"},
        {"credits": "x"},
        {"credits": "1", "count": 0},
        {"credits": "1", "count": 1001},
        {"credits": "1", "expires_days": 0},
        {"credits": "1", "bogus": 1},
    ):
        r = admin(harness, "POST", "/admin/codes", json=body)
        assert r.status_code == 400, (body, r.text)
    made = admin(harness, "POST", "/admin/codes", json={"credits": "1"}).json()["data"]
    assert made[0]["expires_at"] is None and made[0]["code"].startswith("ttc-")
    r = admin(harness, "GET", "/admin/usage", params={"group_by": "account,model"})
    assert r.status_code == 200, r.text
    rows = [(row["bucket"], row["account"], row["model"], row["requests"]) for row in r.json()["data"]]
    assert rows == [("a", "a", "echo", 1), ("b", "b", "echo-b", 1)]
    assert r.json()["total"]["requests"] == 2
    assert admin(harness, "GET", "/admin/usage", params={"start": "x"}).json()["error"]["param"] == "start"
    log = admin(harness, "GET", "/admin/usage/requests", params={"limit": 1}).json()
    assert [(row["account"], row["model"]) for row in log["data"]] == [("b", "echo-b")] and log["next"]
    older = admin(harness, "GET", "/admin/usage/requests", params={"before": log["next"]}).json()
    assert [row["account"] for row in older["data"]] == ["a"] and older["next"] is None
    assert admin(harness, "GET", "/admin/usage/requests", params={"failed": "true"}).json()["data"] == []
    assert admin(harness, "GET", "/admin/usage/requests", params={"limit": "x"}).status_code == 400


def test_admin_refunds_and_debits(harness: Harness) -> None:
    """Operator refunds and debits: ledger rows with the note, a debit never below zero, clean refusals."""
    r = admin(harness, "POST", "/admin/accounts/a/debits", json={"credits": "2", "note": "chargeback #9"})
    assert r.status_code == 200, r.text
    assert r.json() == {"name": "a", "debited": "2", "balance": "3", "note": "chargeback #9"}
    r = admin(harness, "POST", "/admin/accounts/a/debits", json={"credits": "3.000001", "note": "too much"})
    assert r.status_code == 409, r.text
    error = r.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "insufficient_balance")
    assert "its balance is 3 credits" in error["message"] and "never" in error["message"]
    r = admin(harness, "POST", "/admin/accounts/a/refunds", json={"credits": "0.5", "note": "bad answer"})
    assert r.json() == {"name": "a", "refunded": "0.5", "balance": "3.5", "note": "bad answer"}
    for body, param in [
        ({"credits": "1"}, "note"),
        ({"credits": "1", "note": "  "}, "note"),
        ({"credits": "1", "note": "n" * 501}, "note"),
        ({"credits": "1", "note": "nul \u0000 byte"}, "note"),  # PostgreSQL cannot store it: a 400, not a 500
        ({"credits": "-1", "note": "x"}, "credits"),
        ({"credits": "0", "note": "x"}, "credits"),
        ({"credits": "1", "note": "x", "extra": 1}, "extra"),
    ]:
        r = admin(harness, "POST", "/admin/accounts/a/refunds", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
    r = admin(harness, "POST", "/admin/accounts/nobody/debits", json={"credits": "1", "note": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "account_not_found"
    r = harness.post("/admin/accounts/a/refunds", {"credits": "100", "note": "mine"})  # a customer key
    assert r.status_code == 403 and r.json()["error"]["code"] == "admin_required"
    assert harness.get("/v1/account").headers["x-remaining-credits"] == "3.5"

    async def adjustments() -> list[tuple[int, str | None, str]]:
        async with harness.services.db.read() as conn:
            query = select(ledger.c.amount, ledger.c.ref, ledger.c.note).where(ledger.c.kind == "adjust")
            return [(int(a), ref, note) for a, ref, note in (await conn.execute(query.order_by(ledger.c.id)))]

    assert harness.call(adjustments()) == [
        (-2_000_000, "debit", "chargeback #9"),
        (500_000, "refund", "bad answer"),
    ]
    account = harness.call(harness.services.ledger.get_account("a"))
    assert harness.call(harness.services.ledger.audit(account.id)).consistent
