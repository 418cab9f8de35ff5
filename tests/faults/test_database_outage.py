"""PostgreSQL cut under a running `tokentill serve`: 503 `service_unavailable` with Retry-After (not 500),
one log line, the client's keep-alive connection still usable, and back to 200 by itself (issue 15, item 3).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

from tests.faults.conftest import ECHO_MODEL, envelope_code, replica
from tests.faults.proxy import TcpProxy, through

pytestmark = [pytest.mark.faults, pytest.mark.e2e, pytest.mark.postgres]


def test_outage_answers_503_on_the_same_connection_and_recovers(
    tmp_path: Path, pg_database_url: str, pg_proxy: TcpProxy, echo_catalog: Path
) -> None:
    server = replica(tmp_path / "r", through(pg_database_url, pg_proxy), echo_catalog).start()
    try:
        key = server.new_key("outage")
        session = requests.Session()  # one pooled keep-alive connection for every request below
        url = f"{server.url}/v1/{ECHO_MODEL}"
        body = {"messages": [{"role": "user", "content": "one two three"}]}
        headers = {"Authorization": f"Bearer {key}"}
        assert session.post(url, json=body, headers=headers, timeout=30).status_code == 200

        pg_proxy.cut()
        for _ in range(3):
            refused = session.post(url, json=body, headers=headers, timeout=30)
            assert refused.status_code == 503, refused.text
            assert envelope_code(refused) == "service_unavailable"
            assert refused.headers["Retry-After"] == "2"
            assert refused.headers["content-type"] == "application/json"
            assert refused.headers["x-request-id"]
        assert session.get(f"{server.url}/v1/models", headers=headers, timeout=30).status_code in {200, 503}
        assert session.get(f"{server.url}/readyz", timeout=30).status_code == 503

        pg_proxy.restore()
        answer = session.post(url, json=body, headers=headers, timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"] == "one two three"
    finally:
        server.stop()
    log = server.log_path.read_text(errors="replace")
    assert "Traceback" not in log, log[-4000:]
    assert log.count("database unavailable") == 1, log[-4000:]  # once per outage, not per request
    assert "database reachable again" in log
