"""A TCP proxy on 127.0.0.1 that can be cut and restored: PostgreSQL (or anything) going away and back.

`TcpProxy(host, port).start()` listens on a free loopback port in a thread of its own and forwards every
connection to `host:port`. `cut()` resets every live connection and refuses new ones (connection refused,
as when the server is down); `restore()` accepts again on the same port. `hang()` instead accepts new
connections and forwards nothing, and stalls the live ones (a network partition: only timeouts notice).
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from sqlalchemy.engine import make_url

__all__ = ["TcpProxy", "through"]

T = TypeVar("T")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = _free_port()
        self.connections = 0  # accepted since start, for tests that want to see traffic went through
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._hanging = False

    # ------------------------------------------------------------------ control (any thread)

    def start(self) -> TcpProxy:
        self._thread.start()
        self._call(self._listen())
        return self

    def cut(self) -> None:
        """Refuse new connections and reset every live one."""
        self._call(self._cut())

    def hang(self) -> None:
        """Accept new connections but forward nothing; live connections stall."""
        self._call(self._hang())

    def restore(self) -> None:
        """Forward again (new connections only: the cut ones are gone)."""
        self._call(self._restore())

    def stop(self) -> None:
        self._call(self._cut())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    # ------------------------------------------------------------------ the proxy's own loop

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port, reuse_address=True)

    async def _cut(self) -> None:
        self._hanging = False
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()  # RST, as a server that went away
        self._writers.clear()

    async def _hang(self) -> None:
        self._hanging = True
        if self._server is None:
            await self._listen()

    async def _restore(self) -> None:
        if self._hanging:
            self._hanging = False
            for writer in list(self._writers):
                writer.transport.abort()
            self._writers.clear()
        if self._server is None:
            await self._listen()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        if self._hanging:
            return  # held open, never answered, until restore() or cut() resets it
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            self._writers.discard(writer)
            return
        self._writers.add(up_writer)
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while not self._hanging:
                data = await reader.read(65536)
                if not data:
                    break
                if self._hanging:
                    return
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            if not self._hanging:
                self._writers.discard(writer)
                writer.close()


def through(database_url: str, proxy: TcpProxy) -> str:
    """`database_url` with its host and port replaced by the proxy's."""
    return make_url(database_url).set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
