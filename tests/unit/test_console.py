"""The console's routes in-process (echo engine), on SQLite and PostgreSQL: sign-in and sessions (signed,
HttpOnly, SameSite=Strict cookies; CSRF on every form; revoked keys end sessions; rate-limited sign-in),
what a customer sees (only its own account, charts whose totals are the usage), key creation and
revocation (never another account's, never more than the creating key has), redeeming, the operator's
pages and forms, and escaping (names of `<script>` render as text)."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import pytest
from starlette.testclient import TestClient

from tokentill.app import create_app
from tokentill.billing.money import format_credits
from tokentill.services import Services
from tokentill.settings import Settings

ADMIN = "admin-key-for-console-tests-0123"
PRICES = {"echo": (15, 60), "echo-b": (7, 11)}
XSS = "<script>alert(1)</script>"
SIGNINS = 6  # sign-in attempts allowed per minute per address in these tests


@dataclass
class Harness:
    app: Any
    services: Services
    keys: dict[str, str]  # a1, a2 (account a; a2 only echo-b), b1 (account b)
    portal: Any

    def call(self, coro: Any) -> Any:
        return self.portal.call(lambda: coro)

    def browser(self) -> TestClient:
        """A fresh client with its own cookie jar (a browser), sharing the app and its services."""
        client = TestClient(self.app, raise_server_exceptions=False, follow_redirects=False)
        client.portal = self.portal  # type: ignore[attr-defined]
        return client

    def chat(self, key: str, model: str, words: int) -> dict[str, Any]:
        body = {
            "messages": [{"role": "user", "content": " ".join(["w"] * words)}],
            "max_completion_tokens": 20,
        }
        r = self.browser().post(
            f"/v1/{model}", json=body, headers={"Authorization": f"Bearer {self.keys[key]}"}
        )
        assert r.status_code == 200, r.text
        return {**r.json(), "request_id": r.headers["x-request-id"]}


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, html[:500]
    return found.group(1)


def sign_in(client: TestClient, key: str) -> httpx2.Response:
    page = client.get("/console/")
    return client.post("/console/signin", data={"key": key, "csrf": csrf_of(page.text)})


def post_form(
    client: TestClient, path: str, data: dict[str, Any], page: str = "/console/"
) -> httpx2.Response:
    token = csrf_of(client.get(page).text)
    return client.post(path, data={**data, "csrf": token})


def key_id(full_key: str) -> str:
    return full_key.split("-")[1]


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
        console_login_attempts_per_minute=SIGNINS,
    )
    app = create_app(settings)
    with TestClient(app, raise_server_exceptions=False) as client:
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
        yield Harness(app, services, keys, client.portal)


def test_sign_in_sets_a_strict_session_and_sign_out_ends_it(harness: Harness) -> None:
    client = harness.browser()
    page = client.get("/console/")
    assert page.status_code == 200 and 'name="key"' in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY" and page.headers["cache-control"] == "no-store"
    done = client.post("/console/signin", data={"key": harness.keys["a1"], "csrf": csrf_of(page.text)})
    assert done.status_code == 303 and done.headers["location"] == "/console/"
    cookie = done.headers["set-cookie"]
    assert cookie.startswith("tokentill_session=") and "HttpOnly" in cookie and "SameSite=strict" in cookie
    assert "Path=/console" in cookie and harness.keys["a1"].split("-", 2)[2] not in cookie  # never the secret
    overview = client.get("/console/")
    assert overview.status_code == 200 and 'data-testid="balance">5<' in overview.text
    assert 'data-testid="who">a<' in overview.text
    out = post_form(client, "/console/signout", {})
    assert out.status_code == 303 and "tokentill_session=" in out.headers["set-cookie"]
    assert 'name="key"' in client.get("/console/").text  # signed out: the sign-in form again
    # A page behind the session sends a signed-out browser to the sign-in page.
    assert client.get("/console/keys").headers["location"] == "/console/"


def test_bad_keys_forms_and_cookies_are_refused(harness: Harness) -> None:
    client = harness.browser()
    token = csrf_of(client.get("/console/").text)
    wrong = client.post("/console/signin", data={"key": harness.keys["b1"][:-3] + "AAA", "csrf": token})
    assert wrong.status_code == 401 and "not valid" in wrong.text and "set-cookie" not in wrong.headers
    # No CSRF token, a token of another browser, a foreign Origin: 403 and no session.
    other = csrf_of(harness.browser().get("/console/").text)
    for data, headers in (
        ({"key": harness.keys["a1"]}, {}),
        ({"key": harness.keys["a1"], "csrf": other}, {}),
        ({"key": harness.keys["a1"], "csrf": token}, {"origin": "http://evil.example"}),
    ):
        r = client.post("/console/signin", data=data, headers=headers)
        assert r.status_code == 403 and "did not come from this console" in r.text, data
    assert sign_in(client, harness.keys["a1"]).status_code == 303
    # A tampered session cookie is no session at all.
    [stored] = [c for c in client.cookies.jar if c.name == "tokentill_session"]
    assert stored.value is not None
    stored.value = stored.value[:-2] + ("A" if stored.value[-2] != "A" else "B") + stored.value[-1]
    assert client.get("/console/keys").headers["location"] == "/console/?notice=ended"
    # The admin key opens the operator view.
    admin = harness.browser()
    assert sign_in(admin, ADMIN).status_code == 303
    assert 'data-testid="who">operator<' in admin.get("/console/").text


def test_revoking_the_key_ends_its_session(harness: Harness) -> None:
    client = harness.browser()
    assert sign_in(client, harness.keys["a2"]).status_code == 303
    assert client.get("/console/keys").status_code == 200
    assert harness.call(harness.services.keys.revoke(key_id(harness.keys["a2"])))
    gone = client.get("/console/keys")
    assert gone.status_code == 303 and gone.headers["location"] == "/console/?notice=ended"
    assert "session has ended" in client.get("/console/?notice=ended").text
    assert sign_in(harness.browser(), harness.keys["a2"]).status_code == 401


def test_customer_sees_its_own_usage_with_right_chart_totals(harness: Harness) -> None:
    mine = [harness.chat("a1", "echo", 5), harness.chat("a1", "echo", 9), harness.chat("a2", "echo-b", 3)]
    theirs = harness.chat("b1", "echo", 7)
    cost = sum(
        r["usage"]["prompt_tokens"] * PRICES[r["model"]][0]
        + r["usage"]["completion_tokens"] * PRICES[r["model"]][1]
        for r in mine
    )
    tokens = sum(r["usage"]["total_tokens"] for r in mine)
    client = harness.browser()
    sign_in(client, harness.keys["a1"])
    page = client.get("/console/").text
    assert f'data-testid="chart-credits" data-total="{cost}"' in page
    assert f'data-testid="chart-tokens" data-total="{tokens}"' in page
    assert f'data-testid="chart-kinds" data-total="{tokens}"' in page
    assert f'data-testid="cost-total">{format_credits(cost)}<' in page
    assert f'data-testid="requests-total">{len(mine)}<' in page
    assert "<title>" in page and "<svg" in page and "echo-b" in page  # tooltips, and both models stacked
    log = client.get("/console/requests").text
    for r in mine:
        assert r["request_id"] in log
    assert theirs["request_id"] not in log
    exported = client.get("/console/requests.csv")
    assert exported.headers["content-type"].startswith("text/csv")
    assert "attachment" in exported.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(exported.text)))
    assert sorted(r["id"] for r in rows) == sorted(r["request_id"] for r in mine)
    assert sum(int(r["prompt_tokens"]) + int(r["completion_tokens"]) for r in rows) == tokens
    # Account b's view holds b's request only.
    other = harness.browser()
    sign_in(other, harness.keys["b1"])
    assert 'data-testid="requests-total">1<' in other.get("/console/").text
    assert mine[0]["request_id"] not in other.get("/console/requests").text
    bad = client.get("/console/requests", params={"before": "not-a-cursor"})
    assert bad.status_code == 400 and "cursor" in bad.text


def test_keys_created_and_revoked_only_within_the_account(harness: Harness) -> None:
    client = harness.browser()
    sign_in(client, harness.keys["a1"])
    made = post_form(
        client, "/console/keys", {"name": "ci", "models": "echo", "tpm": "5000"}, "/console/keys"
    )
    assert made.status_code == 200, made.text
    new_key = re.search(r'data-testid="new-key">(tt-[^<]+)<', made.text)
    assert new_key is not None
    info = harness.call(harness.services.keys.get_key(key_id(new_key.group(1))))
    assert info.account_name == "a" and info.models == ["echo"] and info.tpm == 5000
    assert info.rpm == 100  # a key limited to 100 rpm makes keys limited to 100 rpm
    listed = client.get("/console/keys").text
    assert new_key.group(1) not in listed and key_id(new_key.group(1)) in listed  # shown once
    r = client.get("/v1/models", headers={"Authorization": f"Bearer {new_key.group(1)}"})
    assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == ["echo"]
    # More than the session's key has: refused.
    over = post_form(client, "/console/keys", {"rpm": "101"}, "/console/keys")
    assert over.status_code == 400 and "rpm" in over.text
    # Another account's key: 404, and it keeps working.
    b1 = key_id(harness.keys["b1"])
    cross = post_form(client, f"/console/keys/{b1}/revoke", {}, "/console/keys")
    assert cross.status_code == 404
    assert (
        harness.browser()
        .get("/v1/models", headers={"Authorization": f"Bearer {harness.keys['b1']}"})
        .status_code
        == 200
    )
    # Its own new key: revoked, and the SDK's next call with it is a 401.
    done = post_form(client, f"/console/keys/{key_id(new_key.group(1))}/revoke", {}, "/console/keys")
    assert done.status_code == 303 and done.headers["location"] == "/console/keys?notice=revoked"
    r = client.get("/v1/models", headers={"Authorization": f"Bearer {new_key.group(1)}"})
    assert r.status_code == 401
    # A key limited to echo-b cannot make a key for echo; without models its key gets echo-b only.
    narrow = harness.browser()
    sign_in(narrow, harness.keys["a2"])
    assert post_form(narrow, "/console/keys", {"models": "echo"}, "/console/keys").status_code == 403
    inherited = post_form(narrow, "/console/keys", {}, "/console/keys")
    found = re.search(r'data-testid="new-key">(tt-[^<]+)<', inherited.text)
    assert found is not None
    assert harness.call(harness.services.keys.get_key(key_id(found.group(1)))).models == ["echo-b"]


def test_redeem_in_the_console(harness: Harness) -> None:
    [code] = harness.call(harness.services.codes.create_codes(2_500_000))
    client = harness.browser()
    sign_in(client, harness.keys["a1"])
    done = post_form(client, "/console/redeem", {"code": code.code})
    assert done.status_code == 303 and done.headers["location"] == "/console/?notice=redeemed"
    page = client.get(done.headers["location"]).text
    assert 'data-testid="balance">7.5<' in page and "Code redeemed" in page
    again = post_form(client, "/console/redeem", {"code": code.code})
    assert again.status_code == 409 and "already been redeemed" in again.text
    assert post_form(client, "/console/redeem", {"code": "ttc-nope"}).status_code == 404


def test_operator_pages_and_forms(harness: Harness) -> None:
    harness.chat("a1", "echo", 4)
    client = harness.browser()
    assert sign_in(client, ADMIN).status_code == 303
    overview = client.get("/console/")
    assert overview.status_code == 200
    for chart_id in ("revenue-model", "revenue-account", "usage-model", "usage-account"):
        assert f'data-testid="chart-{chart_id}"' in overview.text
    assert 'data-testid="engines"' in overview.text and "1 / 1 up" in overview.text
    assert 'data-testid="responses"' in overview.text
    made = post_form(client, "/console/accounts", {"name": "newco", "credits": "3"}, "/console/accounts")
    assert made.status_code == 303 and made.headers["location"] == "/console/accounts?notice=account"
    dup = post_form(client, "/console/accounts", {"name": "newco"}, "/console/accounts")
    assert dup.status_code == 409
    bad = post_form(client, "/console/accounts", {"name": "a\x00b"}, "/console/accounts")
    assert bad.status_code == 400
    granted = post_form(
        client, "/console/credits", {"account": "newco", "credits": "1.5"}, "/console/accounts"
    )
    assert granted.status_code == 303
    assert '<td class="num">4.5</td>' in client.get("/console/accounts").text
    assert (
        post_form(
            client, "/console/credits", {"account": "nobody", "credits": "1"}, "/console/accounts"
        ).status_code
        == 404
    )
    assert (
        post_form(
            client, "/console/credits", {"account": "newco", "credits": "-1"}, "/console/accounts"
        ).status_code
        == 400
    )
    codes = post_form(client, "/console/codes", {"credits": "2", "count": "3"}, "/console/codes")
    assert codes.status_code == 200
    shown = re.findall(r"ttc-[a-z0-9]{8}-[a-z2-7]{32}", codes.text)
    assert len(shown) == 3
    listing = client.get("/console/codes").text
    assert all(c not in listing and c.split("-")[1] in listing for c in shown)
    assert post_form(client, "/console/codes", {"credits": "0"}, "/console/codes").status_code == 400
    assert client.get("/console/models").status_code == 200
    # The operator is not a customer, and a customer is not the operator.
    assert client.get("/console/keys").status_code == 403
    customer = harness.browser()
    sign_in(customer, harness.keys["a1"])
    for path in ("/console/accounts", "/console/codes", "/console/models"):
        assert customer.get(path).status_code == 403, path
    assert post_form(customer, "/console/accounts", {"name": "sneaky"}).status_code == 403


def test_names_render_as_text(harness: Harness) -> None:
    harness.call(harness.services.ledger.create_account(XSS, 1_000_000))
    key = harness.call(harness.services.keys.create_key(XSS, name=XSS)).key
    harness.keys["x"] = key
    harness.chat("x", "echo", 3)
    customer = harness.browser()
    sign_in(customer, key)
    admin = harness.browser()
    sign_in(admin, ADMIN)
    escaped = "&lt;script&gt;alert(1)&lt;/script&gt;"
    for client, path in (
        (customer, "/console/"),
        (customer, "/console/keys"),
        (admin, "/console/"),
        (admin, "/console/accounts"),
    ):
        page = client.get(path)
        assert page.status_code == 200, path
        assert XSS not in page.text and escaped in page.text, path
    made = post_form(customer, "/console/keys", {"name": "<img src=x onerror=alert(1)>"}, "/console/keys")
    assert "<img src=x" not in made.text and "&lt;img src=x onerror=alert(1)&gt;" in made.text


def test_sign_in_attempts_are_rate_limited(harness: Harness) -> None:
    client = harness.browser()
    token = csrf_of(client.get("/console/").text)
    statuses = [
        client.post("/console/signin", data={"key": "tt-wrong", "csrf": token}).status_code
        for _ in range(SIGNINS)
    ]
    assert statuses == [401] * SIGNINS
    limited = client.post("/console/signin", data={"key": harness.keys["a1"], "csrf": token})
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
    assert "Too many sign-in attempts" in limited.text and "set-cookie" not in limited.headers


def test_operator_view_counts_refusals_like_metrics(harness: Harness) -> None:
    client = harness.browser()
    for _ in range(3):
        assert client.get("/v1/models", headers={"Authorization": "Bearer tt-nope"}).status_code == 401
    sign_in(client, ADMIN)
    page = client.get("/console/").text
    assert re.search(r"401</span></td><td>invalid_api_key</td><td class=\"num\">\d+</td>", page)


def test_request_log_pages_and_exports_everything(harness: Harness) -> None:
    from datetime import UTC, datetime, timedelta

    from tokentill.billing.records import UsageRecord
    from tokentill.billing.statements import record_usage

    async def seed() -> None:
        db = harness.services.db
        account = await harness.services.ledger.get_account("a")
        assert account is not None
        start = datetime.now(UTC) - timedelta(hours=2)
        for i in range(60):
            record = UsageRecord(f"req_page{i:03d}", key_id(harness.keys["a1"]), "echo", 10, 5)
            async with db.begin() as conn:
                await record_usage(
                    conn, db.dialect, account.id, record, 150 + 300, start + timedelta(seconds=i)
                )

    harness.call(seed())
    client = harness.browser()
    sign_in(client, harness.keys["a1"])
    first = client.get("/console/requests").text
    ids = re.findall(r"req_page\d{3}", first)
    assert len(ids) == 50 and ids[0] == "req_page059" and ids[-1] == "req_page010"
    older = re.search(r'href="/console/requests\?before=([^"]+)" data-testid="older"', first)
    assert older is not None
    second = client.get("/console/requests", params={"before": older.group(1)}).text
    assert re.findall(r"req_page\d{3}", second) == [f"req_page{i:03d}" for i in range(9, -1, -1)]
    assert 'data-testid="older"' not in second
    rows = list(csv.DictReader(io.StringIO(client.get("/console/requests.csv").text)))
    assert [r["id"] for r in rows] == [f"req_page{i:03d}" for i in range(59, -1, -1)]
    assert {r["cost"] for r in rows} == {"0.00045"}
