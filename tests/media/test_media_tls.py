"""https through the pinned address: SNI and certificate checks use the URL's host name, not the IP.

A TLS server on 127.0.0.1 holds a throwaway certificate for `images.test`; the injected resolver maps
`images.test` to 127.0.0.1 and `allow_hosts` lets it through. Needs the `openssl` command line tool.
"""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.media.helpers import PARAM, LoopbackServer, Route, png_bytes
from tokentill.errors import InvalidRequest
from tokentill.media import MediaPolicy, MediaService
from tokentill.types import ImageInput


async def _fake_resolver(host: str, port: int) -> list[str]:
    if host in ("images.test", "other.test"):
        return ["127.0.0.1"]
    raise OSError(f"no such host {host}")


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[LoopbackServer, Path, list[str]]]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl command line tool not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=images.test",
         "-addext", "subjectAltName=DNS:images.test", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    seen_sni: list[str] = []
    context.sni_callback = lambda _sock, name, _ctx: seen_sni.append(name or "")
    srv = LoopbackServer(tls=context)
    srv.routes["/img.png"] = Route(headers={"Content-Type": "image/png"}, body=png_bytes((12, 34)))
    srv.thread.start()
    yield srv, cert, seen_sni
    srv.httpd.shutdown()
    srv.httpd.server_close()


def _fetch(url: str, port: int, cert: Path) -> ImageInput:
    async def go() -> ImageInput:
        policy = MediaPolicy(allow_hosts=frozenset({f"images.test:{port}", f"other.test:{port}"}))
        service = MediaService(
            policy, resolver=_fake_resolver, verify=ssl.create_default_context(cafile=str(cert))
        )
        await service.start()
        try:
            return await service.load(url, detail="low", param=PARAM)
        finally:
            await service.aclose()

    return asyncio.run(go())


def test_https_uses_the_host_name_for_sni_and_verification(
    tls_server: tuple[LoopbackServer, Path, list[str]],
) -> None:
    server, cert, seen_sni = tls_server
    image = _fetch(f"https://images.test:{server.port}/img.png", server.port, cert)
    assert (image.width, image.height) == (12, 34)
    assert seen_sni == ["images.test"]
    assert server.hits[0].headers["host"] == f"images.test:{server.port}"


def test_https_certificate_for_another_name_is_refused(
    tls_server: tuple[LoopbackServer, Path, list[str]],
) -> None:
    server, cert, seen_sni = tls_server
    with pytest.raises(InvalidRequest) as info:
        _fetch(f"https://other.test:{server.port}/img.png", server.port, cert)
    assert info.value.code == "invalid_image_url"
    assert "TLS certificate that failed verification" in info.value.message
    assert seen_sni == ["other.test"]
    assert server.hits == []
