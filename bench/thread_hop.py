"""What one hand-off to a worker thread and back costs the event loop: an executor against a plain queue.

    .venv/bin/python bench/thread_hop.py [--hops 20000]

The SQLite writer (`storage/db.py` `_SqliteWriter`) runs every transaction on its own thread, two per lone
request (its hold and its settlement). Two ways to get there and back, each timed in CPU (this process)
and wall time per hop with a trivial function, on asyncio's loop and on uvloop (what `tokentill serve`
runs), alternating:
  - `executor`: `loop.run_in_executor` on a one-thread `ThreadPoolExecutor` (a concurrent future, a work
    item, the idle-thread bookkeeping, then asyncio chaining the two futures);
  - `queue`: a `queue.SimpleQueue` read by one thread, which answers with one `call_soon_threadsafe`
    (what the writer does).
"""

from __future__ import annotations

import argparse
import asyncio
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import uvloop


def _work() -> int:
    return 1


_Job = tuple[Callable[[], Any], asyncio.AbstractEventLoop, "asyncio.Future[Any]"]


class _QueueThread:
    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[
            tuple[Callable[[], Any], asyncio.AbstractEventLoop, asyncio.Future[Any]]
        ]
        self._jobs = queue.SimpleQueue()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            fn, loop, future = self._jobs.get()
            loop.call_soon_threadsafe(future.set_result, fn())

    async def run(self, fn: Callable[[], Any]) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._jobs.put((fn, loop, future))
        return await future


async def _measure(hops: int) -> None:
    executor = ThreadPoolExecutor(max_workers=1)
    thread = _QueueThread()
    loop = asyncio.get_running_loop()
    for kind in ("executor", "queue", "executor", "queue"):
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(hops):
            if kind == "executor":
                await loop.run_in_executor(executor, _work)
            else:
                await thread.run(_work)
        cpu_us = 1e6 * (time.process_time() - cpu) / hops
        wall_us = 1e6 * (time.perf_counter() - wall) / hops
        print(f"  {kind:<8} cpu {cpu_us:6.1f} µs/hop   wall {wall_us:6.1f} µs/hop", flush=True)
    executor.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hops", type=int, default=20000)
    args = parser.parse_args()
    print("asyncio")
    asyncio.run(_measure(args.hops))
    print("uvloop")
    uvloop.run(_measure(args.hops))


if __name__ == "__main__":
    main()
