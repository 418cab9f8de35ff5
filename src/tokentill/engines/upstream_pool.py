"""Replicas of one upstream model: which one takes the next request, and which are up.

Choice: among the replicas not yet tried for this request, the healthy ones with the fewest outstanding
requests first (ties go to the one listed first); unhealthy replicas are tried only when no healthy,
untried one is left, so a request is never refused just because the health check is behind.

Health: a replica turns unhealthy when a request cannot connect to it or waits `timeout_s` on it, when it
answers 5xx (or drops the connection) before the first byte to a request that another replica then
answers (a request every replica fails may be the request's fault), and when the background check
(`GET {base}/models` every `interval_s`, sent only to replicas with no request of ours in flight) fails;
it turns healthy again when a check or a request succeeds. The log line says which: "is down: ConnectError"
for a request, "is down: health check: ConnectError" for the check. All state lives on one event loop: no
locks are needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp

__all__ = ["Replica", "ReplicaPool"]

log = logging.getLogger(__name__)


@dataclass
class Replica:
    base_url: str  # ends without "/", e.g. http://10.0.0.5:8000/v1
    healthy: bool = True
    outstanding: int = 0

    def mark(self, healthy: bool, why: str, model: str) -> None:
        if healthy != self.healthy:
            if healthy:
                log.warning("upstream replica %s for model %s is back", self.base_url, model)
            else:
                log.warning("upstream replica %s for model %s is down: %s", self.base_url, model, why)
        self.healthy = healthy


class ReplicaPool:
    """The replicas of one catalogue entry plus the task that checks their health."""

    def __init__(self, urls: list[str], *, model: str, interval_s: float) -> None:
        if not urls:
            raise ValueError("an upstream needs at least one base_url")
        self.replicas = [Replica(url.rstrip("/")) for url in urls]
        self.model = model
        self.interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    def pick(self, tried: set[int]) -> int | None:
        """Index of the replica to try next, or None when every replica has been tried."""
        untried = [i for i in range(len(self.replicas)) if i not in tried]
        if not untried:
            return None
        healthy = [i for i in untried if self.replicas[i].healthy]
        candidates = healthy or untried
        return min(candidates, key=lambda i: (self.replicas[i].outstanding, i))

    def any_healthy(self) -> bool:
        return any(r.healthy for r in self.replicas)

    async def check(
        self, client: aiohttp.ClientSession, headers: Mapping[str, str], timeout_s: float
    ) -> None:
        """One health round, concurrently, each bounded by `timeout_s`, over the idle replicas only.

        A replica with requests of ours in flight is judged by those requests. Checking it anyway is
        harmful: llama-cpp-python's server (interrupt_requests, on by default) cuts a running generation
        short, reporting a normal "stop", whenever any other request arrives, /models included.
        """
        idle = [r for r in self.replicas if r.outstanding == 0]
        await asyncio.gather(*(self._check_one(r, client, headers, timeout_s) for r in idle))

    async def _check_one(
        self, replica: Replica, client: aiohttp.ClientSession, headers: Mapping[str, str], timeout_s: float
    ) -> None:
        try:
            async with client.get(
                replica.base_url + "/models",
                headers=dict(headers),
                timeout=aiohttp.ClientTimeout(total=timeout_s),
                allow_redirects=False,
            ) as response:
                status = response.status
                await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            replica.mark(False, f"health check: {type(exc).__name__}", self.model)
            return
        if status >= 500:
            replica.mark(False, f"health check answered HTTP {status}", self.model)
            return
        if status in (401, 403):
            # Up, but our key is refused: requests will fail with 502 and log this too. Not "down".
            log.error(
                "upstream replica %s for model %s refuses our credentials (HTTP %d)",
                replica.base_url,
                self.model,
                status,
            )
        replica.mark(True, "", self.model)

    def start(self, client: aiohttp.ClientSession, headers: Mapping[str, str]) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(client, headers), name=f"health:{self.model}")

    async def _loop(self, client: aiohttp.ClientSession, headers: Mapping[str, str]) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.check(client, headers, timeout_s=min(self.interval_s, 5.0))
            except Exception:  # a bug here must not kill the loop: the next round retries
                log.exception("health check of upstream model %s failed", self.model)

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
