"""The limiter's failure through the real ASGI app (TestClient, echo engine, SQLite): a Redis that accepts
connections but never answers costs a request one timeout (two tries), not a second one for headers."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from tokentill.app import create_app
from tokentill.settings import Settings

BODY = {"messages": [{"role": "user", "content": "one two"}], "max_completion_tokens": 4}


@pytest.fixture
def blackhole() -> Iterator[str]:
    """A loopback Redis URL whose port completes TCP handshakes (the kernel's backlog) and never replies."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield f"redis://127.0.0.1:{sock.getsockname()[1]}/0"


def test_silent_redis_is_one_503_without_a_second_wait(tmp_path: Path, blackhole: str) -> None:
    catalogue = tmp_path / "models.toml"
    catalogue.write_text('[[models]]\nid = "echo"\nengine = "echo"\nprice_input = 1\nprice_output = 1\n')
    settings = Settings(data_dir=tmp_path / "data", config=catalogue, redis_url=blackhole)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        services = client.app.state.services  # type: ignore[attr-defined]

        async def make_key() -> str:
            await services.ledger.create_account("silent", 1_000_000)
            return str((await services.keys.create_key("silent", rpm=5)).key)

        key = client.portal.call(make_key)  # type: ignore[union-attr]
        started = time.monotonic()
        refused = client.post("/v1/echo", json=BODY, headers={"Authorization": f"Bearer {key}"})
        elapsed = time.monotonic() - started
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "overloaded"
        assert refused.headers["retry-after"] == "1"
        assert not any(name.startswith("x-ratelimit-") for name in refused.headers)
        # The acquire's 1 s timeout, once (a timeout is not retried); asking the same silent Redis for
        # headers, or retrying, would add a second one.
        assert 0.9 < elapsed < 1.95, elapsed

        async def balance() -> int:
            found = await services.ledger.get_account("silent")
            return int(found.balance)

        held = client.portal.call(balance)  # type: ignore[union-attr]
        assert held == 1_000_000  # no hold was taken
