"""Fixtures of the fault-injection suite: PostgreSQL behind a proxy that can be cut, echo catalogues.

Every case is bounded (at most a minute) and loopback only. Waits come from the settings under test
(lease, hold TTL, sweeper interval, retry backoff), never from the speed of the machine.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

from tests.e2e.conftest import TokentillServer

ECHO_MODEL = "echo"
# Prices high enough that every token moves money: 1 token = 1000 / 2000 µcr.
ECHO_CATALOG = f'[[models]]\nid = "{ECHO_MODEL}"\nengine = "echo"\nprice_input = 1000\nprice_output = 2000\n'


@pytest.fixture
def echo_catalog(tmp_path: Path) -> Path:
    path = tmp_path / "catalog.toml"
    path.write_text(ECHO_CATALOG, encoding="utf-8")
    return path


def replica(workdir: Path, database_url: str, catalog: Path, **env: str) -> TokentillServer:
    """A `tokentill serve` subprocess on the echo catalogue (not started)."""
    return TokentillServer(
        workdir,
        database_url,
        TOKENTILL_CONFIG=str(catalog),
        TOKENTILL_LOG_LEVEL="info",
        **env,
    )


def envelope_code(response: requests.Response) -> str:
    body = response.json()
    assert set(body) == {"error"}, body
    return str(body["error"]["code"])
