"""`CoalescedWrites`: the writes of one event-loop pass leave as one, and nothing is lost or reordered
when the connection ends (api/connections.py). A recording transport stands in for the socket; the
end-to-end tests (tests/e2e) run every response through the real one."""

from __future__ import annotations

import asyncio
from typing import Any

from tokentill.api.connections import CoalescedWrites


class Recorder:
    """The calls a transport received, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.calls.append(("write", data))

    def close(self) -> None:
        self.closing = True
        self.calls.append(("close", None))

    def write_eof(self) -> None:
        self.calls.append(("write_eof", None))

    def abort(self) -> None:
        self.closing = True
        self.calls.append(("abort", None))

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str) -> Any:
        return ("127.0.0.1", 1234) if name == "peername" else None


async def _next_pass() -> None:
    await asyncio.sleep(0)


def test_a_head_and_body_written_in_one_pass_leave_in_one_write() -> None:
    async def body() -> None:
        real = Recorder()
        transport = CoalescedWrites(real, asyncio.get_running_loop())  # type: ignore[arg-type]
        transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
        transport.write(memoryview(b"{}"))
        transport.write(b"")
        assert real.calls == []
        assert transport.get_write_buffer_size() == len(b"HTTP/1.1 200 OK\r\n\r\n{}")
        await _next_pass()
        assert real.calls == [("write", b"HTTP/1.1 200 OK\r\n\r\n{}")]
        transport.writelines([b"a", b"b"])
        await _next_pass()
        transport.write(b"c")
        await _next_pass()
        assert real.calls[1:] == [("write", b"ab"), ("write", b"c")]
        assert transport.get_extra_info("peername") == ("127.0.0.1", 1234)  # the rest is the transport's

    asyncio.run(body())


def test_close_and_write_eof_send_what_is_pending_first_and_abort_drops_it() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        real = Recorder()
        transport = CoalescedWrites(real, loop)  # type: ignore[arg-type]
        transport.write(b"last words")
        transport.write_eof()
        transport.write(b"bye")
        transport.close()
        await _next_pass()  # the pass's own flush finds nothing left
        assert real.calls == [
            ("write", b"last words"),
            ("write_eof", None),
            ("write", b"bye"),
            ("close", None),
        ]
        aborted = Recorder()
        transport = CoalescedWrites(aborted, loop)  # type: ignore[arg-type]
        transport.write(b"never sent")
        transport.abort()
        await _next_pass()
        assert aborted.calls == [("abort", None)]

    asyncio.run(body())


def test_writes_pending_when_the_connection_went_away_are_dropped() -> None:
    async def body() -> None:
        real = Recorder()
        transport = CoalescedWrites(real, asyncio.get_running_loop())  # type: ignore[arg-type]
        transport.write(b"too late")
        real.closing = True  # the peer hung up before the end of the pass (connection_lost)
        await _next_pass()
        assert real.calls == []

    asyncio.run(body())
