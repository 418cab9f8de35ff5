"""`tokentill serve --workers 2`: /metrics sums every worker (prometheus-client multiprocess mode in a
folder of its own under the data folder, fresh at start, removed at exit), and so does the operator
console's table of responses."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import TokentillServer

pytestmark = [pytest.mark.e2e, pytest.mark.redis]


def responses(url: str, status: str, code: str) -> float:
    text = requests.get(url + "/metrics", timeout=10).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "tokentill_http_responses_total" and s.labels == {"status": status, "code": code}
    )


ADMIN = "metrics-e2e-admin-key-0123456789"


def console_count(url: str, status: str, code: str) -> int:
    """The operator console's count of (status, code) responses, signed in on a fresh connection."""
    with requests.Session() as browser:
        page = browser.get(url + "/console/", timeout=10).text
        token = re.search(r'name="csrf" value="([^"]+)"', page)
        assert token is not None
        signed_in = browser.post(
            url + "/console/signin", data={"key": ADMIN, "csrf": token.group(1)}, timeout=10
        )
        assert signed_in.status_code == 200 and 'data-testid="who">operator<' in signed_in.text
        row = re.search(rf'>{status}</span></td><td>{code}</td><td class="num">([\d,]+)</td>', signed_in.text)
        assert row is not None, signed_in.text[-3000:]
        return int(row.group(1).replace(",", ""))


def test_metrics_sum_every_worker(tmp_path: Path, redis_url: str) -> None:
    catalogue = tmp_path / "models.toml"
    catalogue.write_text('[[models]]\nid = "echo"\nengine = "echo"\n')
    server = TokentillServer(
        tmp_path / "w2",
        None,
        TOKENTILL_WORKERS="2",
        TOKENTILL_REDIS_URL=redis_url,
        TOKENTILL_CONFIG=str(catalogue),
        TOKENTILL_ADMIN_KEY=ADMIN,
    )
    stale = tmp_path / "w2" / "data" / "metrics" / "serve-999999999"
    stale.mkdir(parents=True)
    (stale / "counter_1.db").write_bytes(b"left by a dead serve")
    server.start()
    try:
        assert not stale.exists()  # a dead serve's folder is removed at start
        folders = list((tmp_path / "w2" / "data" / "metrics").glob("serve-*"))
        assert len(folders) == 1
        for _ in range(30):  # a new connection each: the kernel spreads them over both workers
            assert requests.get(server.url + "/v1/models", timeout=10).status_code == 401
        pids = {p.name.split("_")[-1] for p in folders[0].glob("counter_*.db")}
        # Every scrape, whichever worker answers it, shows all 30 refusals.
        for _ in range(6):
            assert responses(server.url, "401", "missing_api_key") == 30, pids
            assert console_count(server.url, "401", "missing_api_key") == 30
    finally:
        server.stop()
    assert not folders[0].exists()  # removed at exit
