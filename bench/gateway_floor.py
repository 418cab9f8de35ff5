"""The framework's floor next to a chat request: tokentill's CPU time per `GET /healthz` (uvicorn, the
pure-ASGI middlewares, FastAPI routing, a JSON response; no key, no database) and per chat completion on
the built-in echo engine (all of that plus auth, limits, hold, settlement, usage row), from one server.

    .venv/bin/python bench/gateway_floor.py [--requests 1000]

CPU time is the `tokentill serve` process tree's user + system time (bench/gateway_overhead.py
`cpu_seconds`), which a loaded machine disturbs far less than wall-clock figures.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx2

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gateway_overhead import cpu_seconds, free_port, tokentill_cli, wait_ready

BODY = {
    "model": "e",
    "messages": [{"role": "user", "content": "What is 2 + 2?"}],
    "max_completion_tokens": 16,
}


async def hit(url: str, n: int, headers: dict[str, str] | None = None, body: Any = None) -> None:
    async with httpx2.AsyncClient(trust_env=False) as client:
        for _ in range(n):
            response = await (client.post(url, json=body, headers=headers) if body else client.get(url))
            if response.status_code != 200:
                raise SystemExit(f"{url}: HTTP {response.status_code}: {response.text[:300]}")


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--requests", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tokentill-floor-") as tmp:
        port = free_port()
        catalogue = Path(tmp) / "catalogue.toml"
        catalogue.write_text('[[models]]\nid = "e"\nengine = "echo"\nprice_input = 15\nprice_output = 60\n')
        env = {
            **os.environ,
            "TOKENTILL_DATA_DIR": str(Path(tmp) / "data"),
            "TOKENTILL_PORT": str(port),
            "TOKENTILL_CONFIG": str(catalogue),
        }
        tokentill_cli(env, "init")
        tokentill_cli(env, "accounts", "create", "floor", "--credits", "1000000")
        key = tokentill_cli(env, "keys", "create", "--account", "floor")["key"]
        log = Path(tmp) / "serve.log"
        with log.open("ab") as out:
            serve = [sys.executable, "-m", "tokentill", "serve"]
            proc = subprocess.Popen(serve, env=env, stdout=out, stderr=out)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_ready(url + "/readyz", proc, log)
            chat = {"headers": {"Authorization": f"Bearer {key}"}, "body": BODY}
            figures = {}
            for name, target, options in (
                ("GET /healthz", url + "/healthz", {}),
                ("chat, echo", url + "/v1/chat/completions", chat),
            ):
                asyncio.run(hit(target, 50, **options))  # warm-up
                before = cpu_seconds(proc.pid)
                asyncio.run(hit(target, args.requests, **options))
                figures[name] = (cpu_seconds(proc.pid) - before) * 1000 / args.requests
                print(f"{name:<14} {figures[name]:6.2f} ms CPU per request ({args.requests} requests)")
            print(f"floor / chat: {figures['GET /healthz'] / figures['chat, echo']:.2f}")
        finally:
            proc.terminate()
            proc.wait(timeout=20)


if __name__ == "__main__":
    main()
