"""Screenshots of the console for the README: docs/console-customer.png, docs/console-operator.png and
docs/console-phone.png.

Starts a real `tokentill serve` (the packaged SmolLM2 as `o1-preview` and, cheaper and without the hidden
reasoning pass, `o1-mini`) on a fresh SQLite database in a temporary folder, gives it four accounts with 29
days of made-up history (written with the same statement that settles a real request, backdated), makes a
few real requests with the openai SDK, then signs in with Playwright driving Debian's /usr/bin/chromium.

    .venv/bin/python scripts/console_screenshots.py [--out docs]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import requests
from openai import OpenAI
from playwright.sync_api import Page, sync_playwright

from tokentill.billing.ledger import Ledger
from tokentill.billing.records import UsageRecord
from tokentill.billing.statements import record_usage
from tokentill.storage.db import open_database

ADMIN = "demo-admin-key-0123456789abcdef"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
CATALOGUE = """
[[models]]
id = "o1-preview"
reasoning = "scratchpad"
max_output = 256
price_input = 15
price_output = 60

[[models]]
id = "o1-mini"
max_output = 256
price_input = 3
price_output = 12
"""
ACCOUNTS = {"acme": 1.0, "globex": 0.6, "initech": 0.35, "umbrella": 0.15}
PRICES = {"o1-preview": (15, 60), "o1-mini": (3, 12)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cli(env: dict[str, str], *args: str) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-m", "tokentill", *args, "--json"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


async def seed_history(url: str) -> None:
    """29 days before today of plausible traffic per account and model, through `record_usage`."""
    rng = random.Random(11)
    db = await open_database(url)
    try:
        ledger = Ledger(db)
        account_ids = {}
        for name in ACCOUNTS:
            account = await ledger.get_account(name)
            assert account is not None
            account_ids[name] = account.id
        today = datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0)
        for days_ago in range(29, 0, -1):
            day = today - timedelta(days=days_ago)
            trend = 0.6 + 0.4 * (29 - days_ago) / 29
            for account, weight in ACCOUNTS.items():
                for model, (price_in, price_out) in PRICES.items():
                    for n in range(
                        int(rng.randint(2, 9) * weight * trend * (1.6 if model == "o1-mini" else 1))
                    ):
                        prompt = rng.randint(200, 2400)
                        completion = rng.randint(80, 900)
                        reasoning = int(completion * 0.6) if model == "o1-preview" else 0
                        cached = rng.choice([0, 0, prompt // 2])
                        image = rng.choice([0, 0, 0, 85, 255])
                        status = rng.choice([200] * 30 + [499, 502])
                        record = UsageRecord(
                            request_id=f"req_demo{days_ago:02d}{account[:3]}{model[-4:]}{n}",
                            key_id=None,
                            model=model,
                            prompt_tokens=prompt + image,
                            completion_tokens=completion,
                            reasoning_tokens=reasoning,
                            cached_tokens=cached,
                            image_tokens=image,
                            status=status,
                            latency_ms=rng.randint(300, 4000),
                        )
                        cost = (prompt + image) * price_in + completion * price_out if status == 200 else 0
                        at = day + timedelta(minutes=rng.randint(-600, 600))
                        async with db.begin() as conn:
                            await record_usage(conn, db.dialect, account_ids[account], record, cost, at)
    finally:
        await db.aclose()


def sign_in(page: Page, url: str, key: str) -> None:
    page.goto(url + "/console/")
    page.fill("[data-testid=key]", key)
    page.click("[data-testid=signin]")
    page.wait_for_selector("[data-testid=who]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs"))
    out = parser.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tokentill-shots-") as tmp:
        folder = Path(tmp)
        (folder / "models.toml").write_text(CATALOGUE)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        env = {
            **os.environ,
            "TOKENTILL_DATA_DIR": str(folder / "data"),
            "TOKENTILL_CONFIG": str(folder / "models.toml"),
            "TOKENTILL_PORT": str(port),
            "TOKENTILL_ADMIN_KEY": ADMIN,
            "TOKENTILL_LOG_LEVEL": "warning",
        }
        with (folder / "server.log").open("wb") as log:
            server = subprocess.Popen(
                [sys.executable, "-m", "tokentill", "serve"], env=env, stdout=log, stderr=log
            )
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if requests.get(url + "/readyz", timeout=1).status_code == 200:
                        break
                except requests.ConnectionError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit((folder / "server.log").read_text()[-3000:])
                time.sleep(0.3)
            keys = {}
            for name in ACCOUNTS:
                cli(env, "accounts", "create", name, "--credits", "25")
                keys[name] = str(cli(env, "keys", "create", "--account", name, "--name", "production")["key"])
            cli(
                env,
                "keys",
                "create",
                "--account",
                "acme",
                "--name",
                "ci",
                "--models",
                "o1-mini",
                "--rpm",
                "30",
            )
            asyncio.run(seed_history(f"sqlite+aiosqlite:///{folder / 'data' / 'tokentill.db'}"))
            for name, key in keys.items():
                client = OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)
                for model in ("o1-preview", "o1-mini"):
                    client.chat.completions.create(
                        model=model,
                        messages=[{"role": "user", "content": f"Say hello to {name}."}],
                        max_completion_tokens=48,
                    )
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                sign_in(page, url, keys["acme"])
                page.screenshot(path=str(out / "console-customer.png"), full_page=True)
                phone = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=2)
                sign_in(phone, url, keys["acme"])
                phone.screenshot(path=str(out / "console-phone.png"))
                operator = browser.new_page(viewport={"width": 1280, "height": 900})
                sign_in(operator, url, ADMIN)
                operator.screenshot(path=str(out / "console-operator.png"), full_page=True)
                browser.close()
        finally:
            server.terminate()
            server.wait(timeout=30)
    for name in ("console-customer.png", "console-operator.png", "console-phone.png"):
        print(out / name)


if __name__ == "__main__":
    main()
