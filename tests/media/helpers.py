"""Helpers for the media tests: image factories and a loopback-only HTTP test server.

Network rule: everything here listens on and connects to 127.0.0.1 only. Tests that need a "public" host
name map it to 127.0.0.1 with an injected resolver plus `allow_hosts`; nothing else is ever connected to.
"""

from __future__ import annotations

import base64
import io
import socket
import ssl
import struct
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image

PARAM = "messages[0].content[1].image_url.url"


def png_bytes(size: tuple[int, int] = (64, 48), mode: str = "RGB", color: object = (200, 30, 30)) -> bytes:
    return encode(Image.new(mode, size, color), "PNG")  # type: ignore[arg-type]


def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt, **params)
    return out.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_with_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR (with a correct CRC) claims width x height, with one tiny IDAT: a bomb header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


@dataclass
class Route:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    delay_s: float = 0.0  # before the status line
    trickle_s: float = 0.0  # between body bytes (one byte at a time)
    content_length: bool = True  # False: close-delimited body


@dataclass
class Hit:
    path: str
    headers: dict[str, str]


class LoopbackServer:
    """A threaded HTTP/1.1 server on 127.0.0.1:<random port> serving a route table."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.routes: dict[str, Route | Callable[[], Route]] = {}
        self.hits: list[Hit] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                server.hits.append(Hit(self.path, {k.lower(): v for k, v in self.headers.items()}))
                found = server.routes.get(self.path)
                route = found() if callable(found) else found
                if route is None:
                    route = Route(404, {"Content-Type": "text/plain"}, b"secret body text")
                try:
                    self._serve(route)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def _serve(self, route: Route) -> None:
                if route.delay_s:
                    time.sleep(route.delay_s)
                self.send_response(route.status)
                for name, value in route.headers.items():
                    self.send_header(name, value)
                if route.content_length and "Content-Length" not in route.headers:
                    self.send_header("Content-Length", str(len(route.body)))
                if not route.content_length:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                if route.trickle_s:
                    for index in range(len(route.body)):
                        self.wfile.write(route.body[index : index + 1])
                        self.wfile.flush()
                        time.sleep(route.trickle_s)
                else:
                    self.wfile.write(route.body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def allow(self) -> frozenset[str]:
        return frozenset({f"127.0.0.1:{self.port}"})


class StalledListener:
    """A listener on (host, port) whose accept queue is full, so a new connect never completes.

    Linux keeps backlog + 1 connections queued; once that many are waiting and none is accepted, further
    SYNs are dropped and the client's connect hangs until its own timeout. Loopback addresses only.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.listener.bind((host, port))
        self.listener.listen(0)
        self.port = int(self.listener.getsockname()[1])
        self._waiting: list[socket.socket] = []
        for _ in range(8):
            client = socket.socket(self.listener.family)
            client.settimeout(0.2)
            try:
                client.connect((host, self.port))
            except TimeoutError:
                client.close()
                return
            self._waiting.append(client)
        raise RuntimeError("could not fill the accept queue")

    def close(self) -> None:
        for client in self._waiting:
            client.close()
        self.listener.close()
