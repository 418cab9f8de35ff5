"""Clients that hang up at random moments, against `tokentill serve` on PostgreSQL + Redis in front of
bench/gateway_overhead.py's trivial upstream; then the books and the server's slots are checked.

    .venv/bin/python bench/hang_ups.py [--requests 3000] [--concurrency 16]

Each request (JSON, then streamed: `--requests` of each) is sent on its own connection; five in six
clients close the connection (RST) 0, 0.5, 1, 2 or 4 ms after sending it, which lands them in every
phase: before the body is read, during admission (where an upstream engine is asked while the credit
hold commits), mid-answer and after it. Then `3 × TOKENTILL_QUEUE_SIZE` plain requests go in
`TOKENTILL_QUEUE_SIZE` at a time, each wanting an upstream slot at once: any slot a hung-up request left
taken shows as a 503. Printed: the clients' statuses (None: hung up), those after, the usage rows by
status, and the ledger invariant (every balance the sum of its ledger rows, none negative, no hold open)
and the server log's tracebacks, all of which should be nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gateway_overhead as bench

HANG_UPS = [None, 0.0, 0.0005, 0.001, 0.002, 0.004]  # seconds after sending; None: read the answer
QUEUE_SIZE = 64  # bench.start_tokentill's TOKENTILL_QUEUE_SIZE


async def one(port: int, body: bytes, authorization: str, hang_up_after: float | None) -> int | None:
    """One request on a fresh connection: its status, or None when this client hung up."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
        f"authorization: {authorization}\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    writer.write(head.encode() + body)
    await writer.drain()
    if hang_up_after is not None:
        await asyncio.sleep(hang_up_after)
        writer.transport.abort()
        return None
    answer = await reader.read()
    writer.close()
    return int(answer.split(b" ", 2)[1])


async def run(args: argparse.Namespace) -> None:
    folder = Path(tempfile.mkdtemp(prefix="tokentill-hang-ups-"))
    port = bench.free_port()
    responder_url = f"http://127.0.0.1:{port}"
    responder = bench.start(
        [sys.executable, str(Path(bench.__file__)), "--serve-responder", str(port)],
        dict(os.environ),
        folder / "responder.log",
        f"{responder_url}/v1/models",
    )
    database = f"tokentill_hang_ups_{os.getpid()}"
    await bench._pg_admin(args.postgres, f'CREATE DATABASE "{database}"')
    options = argparse.Namespace(workers=1, redis_url=args.redis_url, instructions=False, profile=None)
    target, env = bench.start_tokentill("pg", folder, responder_url, options, f"{args.postgres}/{database}")
    authorization = target.headers["authorization"]
    try:
        hung: Counter[int | None] = Counter()
        gate = asyncio.Semaphore(args.concurrency)
        for mode in ({}, {"stream": True, "stream_options": {"include_usage": True}}):
            body = json.dumps({"model": target.model, **bench.BODY, **mode}).encode()

            async def client(body: bytes = body) -> None:
                async with gate:
                    hung[await one(target.port, body, authorization, random.choice(HANG_UPS))] += 1

            await asyncio.gather(*(client() for _ in range(args.requests)))
        print("clients (None: hung up):", dict(hung))
        await asyncio.sleep(2)  # what the hung-up requests still had to do (settle, release)
        after: Counter[int | None] = Counter()
        body = json.dumps({"model": target.model, **bench.BODY}).encode()
        for _ in range(3):
            statuses = await asyncio.gather(
                *(one(target.port, body, authorization, None) for _ in range(QUEUE_SIZE))
            )
            after.update(statuses)
        print(f"then {QUEUE_SIZE} at a time:", dict(after))
        rows = await bench._pg_rows(
            env["TOKENTILL_DATABASE_URL"],
            {
                **bench.LEDGER_QUERIES,
                "negative": "SELECT COUNT(*) FROM accounts WHERE balance < 0",
                "usage": "SELECT status, COUNT(*) FROM usage GROUP BY status ORDER BY status",
            },
        )
        print("usage rows by status:", dict(rows["usage"]))
        drift = [f"account {a}: {b} != {s}" for a, b, s in rows["drift"] if b != s]
        print(
            f"ledger: drift {drift or 'none'}, negative balances {rows['negative'][0][0]}, "
            f"open holds {rows['open'][0][0]}"
        )
        log = (folder / "pg.log").read_text(errors="replace")
        print(
            f"server log: {log.count('Traceback')} tracebacks, "
            f"{log.count('unhandled error')} unhandled errors"
        )
    finally:
        target.proc.terminate()
        target.proc.wait()
        responder.terminate()
        await bench._pg_admin(args.postgres, f'DROP DATABASE "{database}"')


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=3000, help="requests of each mode (JSON, stream)")
    parser.add_argument("--concurrency", type=int, default=16, help="clients at a time")
    parser.add_argument("--postgres", default="postgresql+asyncpg://postgres@127.0.0.1:5432")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
