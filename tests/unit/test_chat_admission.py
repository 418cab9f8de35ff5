"""ChatService admission and settlement edge cases, in process (Starlette's TestClient, echo engine, SQLite,
in-process limiter): the default budget under a TPM limit, images refused before any fetch when the account
cannot pay, a ledger failure that must not keep the key's concurrency slot, an abandoned request."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import anyio
import pytest
from starlette.testclient import TestClient

from tokentill.app import create_app
from tokentill.billing.group_commit import GroupCommit
from tokentill.billing.ledger import Ledger
from tokentill.lifecycle import Run
from tokentill.protocol.chat import ChatCompletionRequest
from tokentill.services import Services
from tokentill.settings import Settings


@dataclass
class Harness:
    client: TestClient
    services: Services

    def call(self, fn: Any, *args: Any) -> Any:
        return self.client.portal.call(fn, *args)  # type: ignore[union-attr]

    def key(self, account: str, credits: int, **limits: int) -> str:
        async def setup() -> str:
            await self.services.ledger.create_account(account, credits)
            return (await self.services.keys.create_key(account, **limits)).key

        return str(self.call(setup))

    def balance(self, account: str) -> int:
        async def read() -> int:
            row = await self.services.ledger.get_account(account)
            assert row is not None
            return row.balance

        return int(self.call(read))

    def open_holds(self) -> int:
        from sqlalchemy import func, select

        from tokentill.storage.schema import holds

        async def count() -> int:
            async with self.services.db.read() as conn:
                query = select(func.count()).select_from(holds).where(holds.c.status == "open")
                return int((await conn.execute(query)).scalar_one())

        return int(self.call(count))


@pytest.fixture
def harness(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Harness]:
    """The app in process on SQLite; `indirect` parametrization may pass `group_commit` (default: on)."""
    catalogue = tmp_path / "models.toml"
    catalogue.write_text(
        '[[models]]\nid = "echo"\nengine = "echo"\ncontext = 4096\nmax_output = 2048\n'
        "price_input = 15\nprice_output = 60\n"
    )
    group_commit = getattr(request, "param", True)
    settings = Settings(data_dir=tmp_path / "data", config=catalogue, group_commit=group_commit)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield Harness(client, client.app.state.services)  # type: ignore[attr-defined]


class _Listening:
    """A client that never hangs up."""

    async def gone(self) -> None:
        await anyio.sleep_forever()

    def show_balance(self, ucr: int) -> None:
        pass


def post(h: Harness, key: str, model: str, body: dict[str, Any]) -> Any:
    return h.client.post(f"/v1/{model}", json=body, headers={"Authorization": f"Bearer {key}"})


def test_default_budget_shrinks_to_fit_the_tpm_limit(harness: Harness) -> None:
    """Without max_completion_tokens the budget would be max_output (2048): above a 200-token TPM limit
    it would make every default request 'too large'. The budget it did not ask for shrinks instead."""
    key = harness.key("tpm", 1_000_000, tpm=200)
    r = post(harness, key, "echo", {"messages": [{"role": "user", "content": "one two three"}]})
    assert r.status_code == 200, r.text
    assert int(r.headers["x-ratelimit-limit-tokens"]) == 200
    # An explicit budget above the limit is still refused as too large (the client asked for it).
    r = post(harness, key, "echo", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 500})
    assert r.status_code == 429, r.text
    assert "too large" in r.json()["error"]["message"].lower()


def test_images_are_not_fetched_for_an_account_that_cannot_pay(harness: Harness) -> None:
    """402 before any image work: the URL names a private address the fetcher would refuse with 400, so
    a 402 proves the fetch was never attempted."""
    image = {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/cat.png"}}
    text_only = harness.services.engines["echo"].capabilities
    key = harness.key("broke", 0)
    # A text-only model answers its own 400 first, whatever the balance.
    r = post(harness, key, "echo", {"messages": [{"role": "user", "content": [image]}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "image_input_unsupported"
    harness.services.engines["echo"].capabilities = replace(text_only, vision=True)
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, image]}]}
    r = post(harness, key, "echo", body)
    assert r.status_code == 402, r.text
    assert r.json()["error"]["code"] == "insufficient_credits"
    # With credits the same request reaches the fetcher, which refuses the address.
    rich = harness.key("rich", 1_000_000)
    r = post(harness, rich, "echo", body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_image_url"


@pytest.mark.parametrize("harness", [True, False], ids=["group_commit", "one_by_one"], indirect=True)
def test_a_ledger_failure_at_settlement_still_returns_the_concurrency_slot(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = harness.key("slot", 1_000_000, max_concurrent=1)
    failures = []

    async def broken_settle(*args: Any, **kwargs: Any) -> Any:
        failures.append(1)
        raise RuntimeError("database went away")

    # Whichever book the server settles through: the group-commit writer, or the ledger itself.
    with monkeypatch.context() as patched:
        patched.setattr(GroupCommit, "settle", broken_settle)
        patched.setattr(Ledger, "settle", broken_settle)
        body = {"messages": [{"role": "user", "content": "one two"}], "max_completion_tokens": 5}
        r = post(harness, key, "echo", body)
        assert failures, "settlement was not attempted"
        # The answer was produced; the failed settlement is logged and its hold left to the sweeper.
        assert r.status_code == 200, r.text
    r = post(harness, key, "echo", body)
    assert r.status_code == 200, f"the concurrency slot leaked: {r.text}"


def test_an_abandoned_request_releases_its_hold_and_lease(harness: Harness) -> None:
    """A request prepared but never run (the client left between admission and the first token) must not
    strand its hold until the sweeper or keep its concurrency slot."""
    key = harness.key("gone", 1_000_000, max_concurrent=1)
    services = harness.services

    async def prepare_and_abandon() -> None:
        principal = await services.keys.authenticate(key)
        body = ChatCompletionRequest.model_validate(
            {"messages": [{"role": "user", "content": "hello"}], "max_completion_tokens": 5}
        )
        run = await services.lifecycle.admit(
            principal, "echo", body, request_id="req_abandoned", client=_Listening(), render=repr
        )
        assert isinstance(run, Run)
        await run.aclose()
        await run.aclose()  # idempotent

    harness.call(prepare_and_abandon)
    assert harness.open_holds() == 0
    assert harness.balance("gone") == 1_000_000
    body = {"messages": [{"role": "user", "content": "again"}], "max_completion_tokens": 5}
    r = post(harness, key, "echo", body)
    assert r.status_code == 200, r.text
