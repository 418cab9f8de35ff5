"""Schemathesis against a real `tokentill serve`: does /openapi.json describe what the server does?

For each database (SQLite, and PostgreSQL on a fresh database at --pg-url, dropped afterwards) it starts
`tokentill serve` on a free loopback port with an `echo` catalogue (a deterministic engine: the contract is
what is fuzzed here, not a model), creates an account with a key, and runs `st run` on the server's own
`/openapi.json` twice: the public routes with that key, the admin routes with the admin key. Bounded by
`--max-examples` per operation (and schemathesis' own phases: examples, coverage, fuzzing, stateful).

Checks: all of schemathesis' checks (no 5xx, documented status codes and content types, response bodies
and headers valid against the schema, schema-invalid requests refused, auth not ignored, the Allow header,
...) except `positive_data_acceptance`: a request valid per JSON Schema may still be refused by rules a
schema cannot state (a date range over 366 days, a body `model` that differs from the URL's, a balance
too small: 400 / 402, as DESIGN §3 says). Case counts, responses by status class and failures by check are
printed per run; the exit status is 1 when any check failed or any response was a 5xx.

    .venv/bin/python bench/schemathesis_run.py [--databases sqlite,postgres] [--max-examples 25]
        [--seed 1] [--pg-url postgresql://postgres@127.0.0.1:5432/postgres] [--all-checks] [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
ADMIN_KEY = "admin-" + secrets.token_hex(16)
CHECKS_EXCLUDED = "positive_data_acceptance"
CATALOGUE = '[[models]]\nid = "echo"\nengine = "echo"\nprice_input = 15\nprice_output = 60\n'


@dataclass
class Outcome:
    label: str
    cases: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    @property
    def server_errors(self) -> int:
        return self.statuses["5xx"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tokentill(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "tokentill", *args], env=env, capture_output=True, text=True, check=True
    )
    return done.stdout


def read_report(path: Path, label: str) -> Outcome:
    """Cases, response statuses and failed checks from schemathesis' ndjson event stream."""
    outcome = Outcome(label)
    for line in path.read_text().splitlines():
        event = json.loads(line)
        finished = event.get("ScenarioFinished")
        if not finished:
            continue
        recorder = finished["recorder"]
        outcome.cases += len(recorder.get("cases", {}))
        for interaction in recorder.get("interactions", {}).values():
            response = interaction.get("response") or {}
            status = response.get("status_code")
            outcome.statuses[f"{status // 100}xx" if status else "no response"] += 1
        for case_id, checks in recorder.get("checks", {}).items():
            for check in checks:
                if check["status"] == "failure":
                    outcome.failures[check["name"]] += 1
                    if len(outcome.examples) < 5:
                        case = recorder["cases"].get(case_id, {}).get("value", {})
                        response = recorder["interactions"].get(case_id, {}).get("response") or {}
                        outcome.examples.append(
                            f"{check['name']}: {case.get('method')} {case.get('path')} "
                            f"path={case.get('path_parameters')} query={case.get('query')} "
                            f"body={json.dumps(case.get('body'))[:160]} -> {response.get('status_code')}"
                        )
    return outcome


def fuzz(url: str, key: str, admin: bool, args: argparse.Namespace, work: Path, label: str) -> Outcome:
    report = work / f"{label.replace(' ', '-')}.ndjson"
    command = [
        str(Path(sys.executable).with_name("st")),
        "run",
        f"{url}/openapi.json",
        "--header",
        f"Authorization: Bearer {key}",
        "--include-path-regex" if admin else "--exclude-path-regex",
        "^/admin/",
        "--checks",
        "all",
        *([] if args.all_checks else ["--exclude-checks", CHECKS_EXCLUDED]),
        "--max-examples",
        str(args.max_examples),
        "--seed",
        str(args.seed),
        "--workers",
        "2",
        "--request-timeout",
        "30",
        "--report",
        "ndjson",
        "--report-ndjson-path",
        str(report),
    ]
    # In the work folder: schemathesis keeps a cache (.schemathesis/) in its working directory.
    done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, cwd=work)
    (work / f"{label.replace(' ', '-')}.txt").write_text(done.stdout + done.stderr)
    return read_report(report, label)


async def _pg(server_url: str, sql: str) -> None:
    conn = await asyncpg.connect(server_url, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def run_database(database: str, args: argparse.Namespace, work: Path) -> list[Outcome]:
    data = work / database
    data.mkdir()
    (data / "models.toml").write_text(CATALOGUE)
    port = free_port()
    env = {
        **os.environ,
        "TOKENTILL_DATA_DIR": str(data),
        "TOKENTILL_CONFIG": str(data / "models.toml"),
        "TOKENTILL_ADMIN_KEY": ADMIN_KEY,
        "TOKENTILL_HOST": "127.0.0.1",
        "TOKENTILL_PORT": str(port),
        "TOKENTILL_LOG_LEVEL": "warning",
    }
    pg_name = None
    if database == "postgres":
        pg_name = f"tokentill_st_{secrets.token_hex(6)}"
        asyncio.run(_pg(args.pg_url, f'CREATE DATABASE "{pg_name}"'))
        env["TOKENTILL_DATABASE_URL"] = args.pg_url.rsplit("/", 1)[0] + f"/{pg_name}"
    server = None
    try:
        tokentill(env, "init")
        tokentill(env, "accounts", "create", "fuzz", "--credits", "1000000")
        key = json.loads(tokentill(env, "keys", "create", "--account", "fuzz", "--json").splitlines()[-1])[
            "key"
        ]
        log = (data / "server.log").open("wb")
        server = subprocess.Popen(
            [sys.executable, "-m", "tokentill", "serve"], env=env, stdout=log, stderr=log
        )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(url + "/readyz", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError(f"server did not start; see {data / 'server.log'}") from None
                time.sleep(0.2)
        return [
            fuzz(url, key, False, args, work, f"{database} public"),
            fuzz(url, ADMIN_KEY, True, args, work, f"{database} admin"),
        ]
    finally:
        if server is not None:
            server.terminate()
            server.wait(20)
        if pg_name is not None:
            asyncio.run(_pg(args.pg_url, f'DROP DATABASE IF EXISTS "{pg_name}" WITH (FORCE)'))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--databases", default="sqlite,postgres")
    parser.add_argument("--max-examples", type=int, default=25, help="per operation and phase")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=int, default=1200, help="seconds for one schemathesis run")
    parser.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument(
        "--all-checks", action="store_true", help=f"also {CHECKS_EXCLUDED} (expected to list 400s and 402s)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder (reports, server logs)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tokentill-schemathesis-"))
    outcomes: list[Outcome] = []
    started = time.monotonic()
    for database in args.databases.split(","):
        outcomes += run_database(database.strip(), args, work)
    print(
        f"schemathesis: --max-examples {args.max_examples} --seed {args.seed}, "
        f"checks: all{'' if args.all_checks else f' but {CHECKS_EXCLUDED}'}"
    )
    print(f"{'run':<18} {'cases':>6} {'2xx':>6} {'4xx':>6} {'5xx':>5}  failures")
    for o in outcomes:
        failed = ", ".join(f"{name} {count}" for name, count in o.failures.most_common()) or "none"
        print(
            f"{o.label:<18} {o.cases:>6} {o.statuses['2xx']:>6} {o.statuses['4xx']:>6} "
            f"{o.server_errors:>5}  {failed}"
        )
        for example in o.examples:
            print(f"    {example}")
    print(f"total {sum(o.cases for o in outcomes)} cases in {time.monotonic() - started:.0f} s")
    if args.keep:
        print(f"reports and server logs: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if any(o.failures or o.server_errors for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
