"""Issue 15.6: slow, idle and too many clients against a real `tokentill serve`, over raw sockets.

Every wait comes from the settings of the server under test (`READ_S`, `IDLE_S`): a lower bound says the
server waited as long as promised, the upper bound is a generous multiple (a loaded machine is slow, not
fast). The echo engine keeps start-up to a second.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.e2e.conftest import TokentillServer

pytestmark = [pytest.mark.e2e]

READ_S = 1.0  # TOKENTILL_READ_TIMEOUT_S of the `timed` server
IDLE_S = 1.0  # TOKENTILL_KEEPALIVE_TIMEOUT_S of the `timed` server
PATIENCE_S = 15.0  # how long a test waits for what should come after about one timeout
CAP = 4  # TOKENTILL_MAX_CONNECTIONS of the `capped` server
ADMIN = "admin-key-slow-clients-0123456789"


def _server(workdir: Path, **env: str) -> Iterator[TokentillServer]:
    workdir.mkdir(parents=True, exist_ok=True)
    catalogue = workdir / "models.toml"
    catalogue.write_text('[[models]]\nid = "echo"\nengine = "echo"\n')
    server = TokentillServer(workdir, None, TOKENTILL_CONFIG=str(catalogue), **env).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def timed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokentillServer]:
    yield from _server(
        tmp_path_factory.mktemp("timed"),
        TOKENTILL_READ_TIMEOUT_S=str(READ_S),
        TOKENTILL_KEEPALIVE_TIMEOUT_S=str(IDLE_S),
        TOKENTILL_ADMIN_KEY=ADMIN,
    )


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokentillServer]:
    yield from _server(
        tmp_path_factory.mktemp("capped"),
        TOKENTILL_MAX_CONNECTIONS=str(CAP),
        TOKENTILL_KEEPALIVE_TIMEOUT_S="60",
    )


def connect(server: TokentillServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=PATIENCE_S)


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length body: status, headers (lower-case names), body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside the body"
        body += chunk
    return int(status_line.split()[1]), headers, body


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def trickle_until_answered(sock: socket.socket, byte: bytes) -> None:
    """Send one byte every READ_S / 4 until the server answers (or PATIENCE_S passes)."""
    sock.settimeout(READ_S / 4)
    deadline = time.monotonic() + PATIENCE_S
    while time.monotonic() < deadline:
        try:
            sock.send(byte)
        except (BrokenPipeError, ConnectionResetError):
            return
        try:
            sock.recv(1, socket.MSG_PEEK)  # an answer, or b"" for a close
        except TimeoutError:
            continue
        sock.settimeout(PATIENCE_S)
        return
    raise AssertionError("the server never cut the trickling client off")


def envelope(body: bytes) -> dict[str, Any]:
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return dict(error)


def test_trickled_headers_get_408_and_the_connection_closes(timed: TokentillServer) -> None:
    sock = connect(timed)
    started = time.monotonic()
    sock.sendall(b"POST /v1/echo HTTP/1.1\r\nHost: tokentill\r\n")
    trickle_until_answered(sock, b"X")
    status, headers, body = read_response(sock)
    assert time.monotonic() - started >= READ_S * 0.9
    assert status == 408 and headers["content-type"] == "application/json"
    assert envelope(body)["code"] == "request_timeout"
    assert headers["connection"] == "close" and closed_by_server(sock)


@pytest.mark.parametrize("path", ["/v1/echo", "/admin/accounts"])  # our parser, and FastAPI's
def test_trickled_body_gets_the_408_envelope_with_a_request_id(timed: TokentillServer, path: str) -> None:
    key = timed.new_key("slow-body") if path.startswith("/v1") else ADMIN
    sock = connect(timed)
    started = time.monotonic()
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: tokentill\r\ncontent-type: application/json\r\n".encode()
        + f"Authorization: Bearer {key}\r\ncontent-length: 10000\r\n\r\n".encode()
        + b'{"name": "x'
    )
    trickle_until_answered(sock, b" ")
    status, headers, body = read_response(sock)
    assert time.monotonic() - started >= READ_S * 0.9
    assert status == 408 and envelope(body)["code"] == "request_timeout", body
    assert headers["x-request-id"].startswith("req_") and headers["connection"] == "close"
    assert closed_by_server(sock)


@pytest.mark.parametrize("path", ["/v1/echo", "/v1/responses"])  # the chat fast path, and FastAPI's
def test_a_client_that_hangs_up_mid_body_is_not_a_server_error(timed: TokentillServer, path: str) -> None:
    key = timed.new_key("hang-up")
    gone = "the client closed the connection before its body arrived"

    def counts() -> tuple[int, int]:
        text = timed.log_path.read_text(errors="replace")
        return text.count(gone), text.count("unhandled error") + text.count("Traceback")

    before = counts()
    sock = connect(timed)
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nHost: tokentill\r\ncontent-type: application/json\r\n".encode()
        + f"Authorization: Bearer {key}\r\ncontent-length: 10000\r\n\r\n".encode()
        + b'{"model": "echo", "messages": [{"role": "user", "content": "hel'
    )
    sock.close()
    deadline = time.monotonic() + PATIENCE_S
    while counts()[0] == before[0]:
        assert time.monotonic() < deadline, timed.log()
        time.sleep(0.05)
    assert counts() == (before[0] + 1, before[1]), timed.log()  # an event, not a 500 with a traceback
    assert requests.get(timed.url + "/healthz", timeout=PATIENCE_S).status_code == 200  # and it goes on


def test_a_body_nobody_reads_cannot_hold_the_connection(timed: TokentillServer) -> None:
    # No key: the 401 goes out before the body is read; the client keeps trickling the body.
    sock = connect(timed)
    sock.sendall(b"POST /v1/echo HTTP/1.1\r\nHost: tokentill\r\ncontent-length: 10000\r\n\r\n{")
    status, _, body = read_response(sock)
    assert status == 401 and envelope(body)["code"] == "missing_api_key"
    started = time.monotonic()
    trickle_until_answered(sock, b" ")
    assert closed_by_server(sock)
    assert time.monotonic() - started < PATIENCE_S


def test_idle_connections_are_closed(timed: TokentillServer) -> None:
    fresh = connect(timed)  # never sends a byte
    started = time.monotonic()
    assert closed_by_server(fresh)
    assert time.monotonic() - started >= IDLE_S * 0.9

    kept = connect(timed)  # one request, then idle on keep-alive
    kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: tokentill\r\n\r\n")
    status, _, _ = read_response(kept)
    assert status == 200
    started = time.monotonic()
    assert closed_by_server(kept)
    assert time.monotonic() - started >= IDLE_S * 0.9


def test_a_client_that_keeps_up_is_not_cut_off(timed: TokentillServer) -> None:
    sock = connect(timed)
    for _ in range(3):  # three requests on one connection, each well inside the limits
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: tokentill\r\n\r\n")
        assert read_response(sock)[0] == 200
    sock.close()


def test_connections_over_the_cap_get_503_and_are_closed(capped: TokentillServer) -> None:
    held = [served_connection(capped) for _ in range(CAP)]
    extra = connect(capped)
    status, headers, body = read_response(extra)
    assert status == 503 and envelope(body)["code"] == "overloaded" and headers["retry-after"] == "1"
    assert closed_by_server(extra)

    held.pop().close()  # one slot free again: a new connection is served
    held.append(served_connection(capped))
    for sock in held:
        sock.close()


def served_connection(server: TokentillServer) -> socket.socket:
    """A connection the server has answered once (so it surely counts it). A connection the server has
    not yet seen closed (the fixture's readiness probe, the test's own last one) may still hold a slot
    for a moment: then this retries."""
    deadline = time.monotonic() + PATIENCE_S
    while True:
        sock = connect(server)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: tokentill\r\n\r\n")
        if read_response(sock)[0] == 200:
            return sock
        sock.close()
        assert time.monotonic() < deadline, "no slot became free"
        time.sleep(0.05)
