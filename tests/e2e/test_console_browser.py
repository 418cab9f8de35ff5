"""The console in a real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright; no browser is
ever downloaded) against real `tokentill serve` processes on SQLite and PostgreSQL with the packaged model.

A customer signs in with a key, sees charts whose totals are exactly the requests just made through the
openai SDK, creates a key and uses it, revokes it (the SDK then gets 401), redeems a code (the balance
moves by its credits) and downloads the request log; revoking the session's own key signs it out. The
operator signs in, creates an account (named like a script tag: it shows as text, nothing runs) and a code,
and sees the new account's usage. `/docs` renders with every request outside the server blocked, and pages
fit a phone's width.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest
import requests

from tests._services import require
from tests.e2e.conftest import DEFAULT_MODEL, TokentillServer, llama_available

pytestmark = [pytest.mark.e2e, pytest.mark.llama]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ADMIN = "console-browser-admin-key-0123456789"
PRICE_IN, PRICE_OUT = 15, 60  # the built-in o1-preview entry, µcr per token
XSS = '<script>alert("xss")</script>'


def ucr_text(ucr: int) -> str:
    whole, frac = divmod(ucr, 1_000_000)
    digits = f"{frac:06d}".rstrip("0")
    return f"{whole}.{digits}" if digits else str(whole)


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def console_server(request: pytest.FixtureRequest, module_dir: Path) -> Iterator[TokentillServer]:
    """A server with an admin key and room for the sign-ins of these tests."""
    llama_available()
    database_url = request.getfixturevalue("pg_module_database_url") if request.param == "postgres" else None
    server = TokentillServer(
        module_dir / f"console-{request.param}",
        database_url,
        TOKENTILL_ADMIN_KEY=ADMIN,
        TOKENTILL_CONSOLE_LOGIN_ATTEMPTS_PER_MINUTE="1000",
    ).start()
    yield server
    server.stop()


@pytest.fixture
def browser(console_server: TokentillServer) -> Iterator[Any]:
    """Chromium, started after the server (Playwright's sync API runs an event loop of its own)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        require("Playwright", f"the playwright package cannot be imported: {exc}")
    if not CHROMIUM.exists():
        require("Chromium", f"{CHROMIUM} is missing (apt-get install chromium)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def new_page(browser: Any, **options: Any) -> Any:
    page = browser.new_page(**options)
    page.set_default_timeout(60_000)
    page.dialogs = []  # every dialog's message; revoking asks for confirmation, a script tag must not alert

    def on_dialog(dialog: Any) -> None:
        page.dialogs.append(dialog.message)
        dialog.accept()

    page.on("dialog", on_dialog)
    return page


def sign_in(page: Any, server: TokentillServer, key: str) -> None:
    page.goto(server.url + "/console/")
    page.fill("[data-testid=key]", key)
    page.click("[data-testid=signin]")
    page.wait_for_selector("[data-testid=who]")


def chat(server: TokentillServer, key: str, text: str) -> tuple[str, Any]:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=300)
    raw = client.chat.completions.with_raw_response.create(
        model=DEFAULT_MODEL,
        messages=[{"role": "user", "content": text}],
        max_completion_tokens=12,
        reasoning_effort="low",
    )
    return raw.headers["x-request-id"], raw.parse().usage


def test_customer_console(console_server: TokentillServer, browser: Any, tmp_path: Path) -> None:
    server = console_server
    key = server.new_key("shopper", credits="10")
    made = [chat(server, key, "Say hi."), chat(server, key, "Name a colour.")]
    cost = sum(u.prompt_tokens * PRICE_IN + u.completion_tokens * PRICE_OUT for _, u in made)
    tokens = sum(u.total_tokens for _, u in made)
    reasoning = sum(u.completion_tokens_details.reasoning_tokens for _, u in made)

    page = new_page(browser, viewport={"width": 1280, "height": 900})
    sign_in(page, server, key)
    assert page.text_content("[data-testid=who]") == "shopper"
    assert page.text_content("[data-testid=balance]") == server.balance("shopper")
    # The charts hold exactly what the SDK was billed for: credits, tokens, and tokens by kind.
    assert page.get_attribute("[data-testid=chart-credits]", "data-total") == str(cost)
    assert page.text_content("[data-testid=total-credits]") == f"{ucr_text(cost)} credits"
    assert page.get_attribute("[data-testid=chart-tokens]", "data-total") == str(tokens)
    assert page.get_attribute("[data-testid=chart-kinds]", "data-total") == str(tokens)
    assert page.text_content("[data-testid=requests-total]") == "2"
    assert f"{reasoning:,} reasoning" in page.text_content("main")
    bars = page.locator("[data-testid=chart-tokens] svg .bars rect")
    assert bars.count() >= 1 and "o1-preview" in bars.first.locator("title").text_content()
    assert "o1-preview" in page.text_content("[data-testid=chart-credits] .legend")

    # The request log lists both requests; its CSV holds them too.
    page.click("nav >> text=Requests")
    log = page.text_content("[data-testid=requests]")
    assert all(request_id in log for request_id, _ in made)
    with page.expect_download() as download:
        page.click("[data-testid=csv]")
    saved = tmp_path / "requests.csv"
    download.value.save_as(saved)
    rows = list(csv.DictReader(saved.open()))
    assert sorted(r["id"] for r in rows) == sorted(request_id for request_id, _ in made)
    assert sum(int(r["prompt_tokens"]) + int(r["completion_tokens"]) for r in rows) == tokens

    # Create a key, use it, revoke it: the SDK's next call is a 401.
    page.click("nav >> text=Keys")
    page.fill("[data-testid=key-name]", "from the browser")
    page.fill("[data-testid=key-rpm]", "30")
    page.click("[data-testid=create-key] [data-testid=create]")
    new_key = page.text_content("[data-testid=new-key]").strip()
    assert new_key.startswith("tt-")
    request_id, usage = chat(server, new_key, "Hello from a new key.")
    assert usage.total_tokens > 0
    new_id = new_key.split("-")[1]
    page.goto(server.url + "/console/keys")
    assert new_key not in page.content()  # shown once
    row = page.locator(f'tr[data-key="{new_id}"]')
    assert "from the browser" in row.text_content() and "30" in row.text_content()
    page.click(f"[data-testid=revoke-{new_id}]")
    page.wait_for_selector("[data-testid=notice]")
    assert any(new_id in message for message in page.dialogs)
    assert "revoked" in page.locator(f'tr[data-key="{new_id}"]').get_attribute("class")
    with pytest.raises(openai.AuthenticationError):
        chat(server, new_key, "Still there?")

    # Redeem a code: the balance moves by exactly its credits.
    code = server.cli_json("codes", "create", "--credits", "5")["codes"][0]["code"]
    page.click("nav >> text=Overview")
    before = Decimal(page.text_content("[data-testid=balance]"))
    page.fill("[data-testid=code]", code)
    page.click("[data-testid=redeem]")
    page.wait_for_selector("[data-testid=notice]")
    assert Decimal(page.text_content("[data-testid=balance]")) == before + 5
    page.fill("[data-testid=code]", code)
    page.click("[data-testid=redeem]")
    assert "already been redeemed" in page.text_content("[data-testid=error]")

    # On a phone the page is as wide as the screen (charts and tables scroll inside their boxes).
    phone = new_page(browser, viewport={"width": 390, "height": 844})
    sign_in(phone, server, key)
    for path in ("/console/", "/console/keys", "/console/requests"):
        phone.goto(server.url + path)
        assert phone.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1"), path

    # Revoking the session's own key ends the session.
    second = server.new_key("shopper")
    own = new_page(browser)
    sign_in(own, server, second)
    own.goto(server.url + "/console/keys")
    own.click(f"[data-testid=revoke-{second.split('-')[1]}]")
    own.wait_for_selector("[data-testid=signin]")
    assert "session has ended" in own.text_content("[data-testid=notice]")


def test_operator_console(console_server: TokentillServer, browser: Any) -> None:
    server = console_server
    page = new_page(browser, viewport={"width": 1280, "height": 900})
    sign_in(page, server, ADMIN)
    assert page.text_content("[data-testid=who]") == "operator"
    assert page.locator("[data-testid=engines]").text_content().count("1 / 1 up") == 1

    page.click("nav >> text=Accounts")
    for name in ("newco", XSS):
        page.fill("[data-testid=account-name]", name)
        page.fill("[data-testid=account-credits]", "2")
        page.click("[data-testid=create-account] [data-testid=create]")
        page.wait_for_selector("[data-testid=notice]")
    assert page.locator("tr[data-account=newco]").text_content().count("2") >= 1
    assert XSS in page.text_content("[data-testid=accounts]")  # shown as text...
    assert page.dialogs == []  # ...and nothing ran

    page.click("nav >> text=Codes")
    page.fill("[data-testid=code-credits]", "3")
    page.click("[data-testid=create-codes] [data-testid=create]")
    codes = re.findall(r"ttc-[a-z0-9]{8}-[a-z2-7]{32}", page.text_content("[data-testid=new-codes]"))
    assert len(codes) == 1

    # The new account's customer redeems the code and makes a request; the operator sees both.
    key = server.cli_json("keys", "create", "--account", "newco")["key"]
    redeemed = requests.post(
        server.url + "/v1/account/redeem",
        json={"code": codes[0]},
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )
    assert redeemed.status_code == 200 and redeemed.json()["balance"] == "5"
    _, usage = chat(server, key, "Hello from newco.")
    cost = usage.prompt_tokens * PRICE_IN + usage.completion_tokens * PRICE_OUT
    page.click("nav >> text=Accounts")
    row = page.locator("tr[data-account=newco]").text_content()
    assert server.balance("newco") in row and f"{usage.total_tokens:,}" in row and ucr_text(cost) in row
    page.click("nav >> text=Overview")
    legend = page.text_content("[data-testid=chart-usage-account] .legend")
    assert "newco" in legend and f"{usage.total_tokens:,}" in legend
    assert "newco" in page.text_content("[data-testid=chart-revenue-account] .legend")
    page.click("nav >> text=Codes")
    assert "redeemed" in page.locator(f'tr[data-code="{codes[0].split("-")[1]}"]').text_content()
    assert page.dialogs == []


def test_docs_work_offline(console_server: TokentillServer, browser: Any) -> None:
    page = new_page(browser)
    outside: list[str] = []

    def only_the_server(route: Any) -> None:
        if route.request.url.startswith(console_server.url):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    page.route("**/*", only_the_server)
    page.goto(console_server.url + "/docs")
    page.wait_for_selector(".swagger-ui .info .title")
    assert "tokentill" in page.text_content(".swagger-ui .info .title")
    page.wait_for_selector('.opblock-summary-path[data-path="/v1/chat/completions"]')
    assert outside == []
