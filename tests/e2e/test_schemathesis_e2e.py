"""Issue 15.9, in CI: `bench/schemathesis_run.py`, bounded, against real `tokentill serve` processes on
SQLite and PostgreSQL. It exits 1 on any 5xx or failed check (all of schemathesis' checks but
`positive_data_acceptance`, see the script); a few examples per operation keep this under a minute."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.postgres]

BENCH = Path(__file__).resolve().parents[2] / "bench" / "schemathesis_run.py"


def test_openapi_document_holds_against_the_server(pg_server_url: str) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH), "--max-examples", "5", "--seed", "3", "--pg-url", pg_server_url],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    rows = [line.split() for line in done.stdout.splitlines() if line.startswith(("sqlite ", "postgres "))]
    assert len(rows) == 4, done.stdout
    for database, routes, cases, _ok, _refused, server_errors, *failures in rows:
        assert int(cases) > 50 and server_errors == "0" and failures == ["none"], (database, routes, failures)
