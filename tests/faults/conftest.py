"""Fixtures of the fault-injection suite: two `tokentill serve` replicas on one PostgreSQL (reached through
a proxy the test cuts) and one private Redis, serving an echo model and a gated upstream model.

Every case is bounded (at most a minute) and loopback only. Waits come from the settings under test
(lease, hold TTL, sweeper interval, retry backoff), never from the speed of the machine.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.conftest import _plain_pg
from tests.e2e.conftest import TokentillServer
from tests.faults.harness import GatedUpstream, PrivateRedis
from tests.faults.proxy import TcpProxy, through

ECHO_MODEL = "echo"
GATED_MODEL = "gated"
PRICE_IN, PRICE_OUT = 1000, 2000  # µcr per token: every token moves money
ECHO_CATALOG = "\n".join(
    [
        "[[models]]",
        f'id = "{ECHO_MODEL}"',
        'engine = "echo"',
        f"price_input = {PRICE_IN}",
        f"price_output = {PRICE_OUT}",
        "",
    ]
)
HOLD_TTL_S = 20
SETTINGS = {
    "TOKENTILL_HOLD_TTL_S": str(HOLD_TTL_S),
    "TOKENTILL_HOLD_SWEEP_INTERVAL_S": "1",
    "TOKENTILL_REQUEST_TIMEOUT_S": "15",
    "TOKENTILL_RATE_LIMIT_LEASE_TTL_S": "15",
    "TOKENTILL_IDEMPOTENCY_LEASE_S": "2",
    "TOKENTILL_DATABASE_CONNECT_TIMEOUT_S": "1",
    "TOKENTILL_DATABASE_POOL_TIMEOUT_S": "2",
    "TOKENTILL_SETTLEMENT_RETRY_S": "60",
    "TOKENTILL_LOG_LEVEL": "info",
}


@pytest.fixture
def echo_catalog(tmp_path: Path) -> Path:
    path = tmp_path / "catalog.toml"
    path.write_text(ECHO_CATALOG, encoding="utf-8")
    return path


def replica(workdir: Path, database_url: str, catalog: Path, **env: str) -> TokentillServer:
    """A `tokentill serve` subprocess on `catalog` with the suite's short settings (not started)."""
    return TokentillServer(workdir, database_url, TOKENTILL_CONFIG=str(catalog), **{**SETTINGS, **env})


def envelope_code(response: requests.Response) -> str:
    body = response.json()
    assert set(body) == {"error"}, body
    return str(body["error"]["code"])


@dataclass
class Cluster:
    a: TokentillServer
    b: TokentillServer
    proxy: TcpProxy
    redis: PrivateRedis
    upstream: GatedUpstream
    direct_url: str  # PostgreSQL without the proxy, for the books check (asyncpg URL)
    catalog: Path

    def restart(self, old: TokentillServer) -> TokentillServer:
        """A new process on `old`'s data folder (its spool), as a supervisor would start it."""
        return TokentillServer(old.workdir, old.env["TOKENTILL_DATABASE_URL"], **_extra(old.env)).start()


def _extra(env: dict[str, str]) -> dict[str, str]:
    keep = {k: v for k, v in env.items() if k.startswith("TOKENTILL_")}
    for name in ("TOKENTILL_DATA_DIR", "TOKENTILL_PORT", "TOKENTILL_HOST", "TOKENTILL_DATABASE_URL"):
        keep.pop(name, None)
    return keep


@pytest.fixture
def cluster(tmp_path: Path, pg_database_url: str, pg_proxy: TcpProxy) -> Iterator[Cluster]:
    upstream = GatedUpstream().start()
    private_redis = PrivateRedis(tmp_path / "redis").start()
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(
        ECHO_CATALOG
        + f'[[models]]\nid = "{GATED_MODEL}"\nengine = "upstream"\nbase_url = "{upstream.url}/v1"\n'
        f"price_input = {PRICE_IN}\nprice_output = {PRICE_OUT}\n",
        encoding="utf-8",
    )
    url = through(pg_database_url, pg_proxy)
    env = {"TOKENTILL_REDIS_URL": private_redis.url}
    a = replica(tmp_path / "a", url, catalog, **env).start()
    try:
        b = replica(tmp_path / "b", url, catalog, **env).start()
    except BaseException:
        a.stop()
        raise
    cluster = Cluster(a, b, pg_proxy, private_redis, upstream, _plain_pg(pg_database_url), catalog)
    try:
        yield cluster
    finally:
        for server in (cluster.a, cluster.b):  # a test may have replaced one with its restart
            server.stop()
        upstream.stop()
        private_redis.kill()
