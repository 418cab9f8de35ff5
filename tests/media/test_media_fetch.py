"""The guarded fetcher against a real HTTP server on 127.0.0.1 (the only address any test connects to).

"Public" host names are mapped to 127.0.0.1 by an injected resolver and let through with `allow_hosts`;
addresses outside loopback appear only as resolver answers or redirect targets that must be refused
before any connection is attempted.
"""

from __future__ import annotations

import asyncio
import gzip
import time
from collections.abc import Sequence

import pytest
from PIL import Image

from tests.media.helpers import PARAM, LoopbackServer, Route, StalledListener, encode, png_bytes
from tokentill.errors import InvalidRequest
from tokentill.media import MediaPolicy, MediaService
from tokentill.media.fetch import parse_allow_hosts
from tokentill.types import ImageInput

PNG = png_bytes((30, 20))


class FakeResolver:
    """Answers from a table and records every lookup; never touches real DNS."""

    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.calls: list[tuple[str, int]] = []

    async def __call__(self, host: str, port: int) -> Sequence[str]:
        self.calls.append((host, port))
        if host not in self.answers:
            raise OSError(f"no such host {host}")
        return self.answers[host]


def fetch(url: str, policy: MediaPolicy | None = None, resolver: FakeResolver | None = None) -> ImageInput:
    async def go() -> ImageInput:
        service = MediaService(policy or MediaPolicy(), resolver=resolver)
        await service.start()
        try:
            return await service.load(url, detail="auto", param=PARAM)
        finally:
            await service.aclose()

    return asyncio.run(go())


def refused(
    url: str,
    code: str = "invalid_image_url",
    policy: MediaPolicy | None = None,
    resolver: FakeResolver | None = None,
) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        fetch(url, policy, resolver)
    assert info.value.code == code, info.value.message
    assert info.value.param == PARAM
    return info.value


def allowed(server: LoopbackServer, **limits: float) -> MediaPolicy:
    return MediaPolicy(allow_hosts=server.allow, **limits)  # type: ignore[arg-type]


def test_loopback_is_refused_by_default_without_connecting(server: LoopbackServer) -> None:
    server.routes["/img.png"] = Route(headers={"Content-Type": "image/png"}, body=PNG)
    error = refused(f"{server.origin}/img.png")
    assert "127.0.0.1 is a loopback address" in error.message
    assert "TOKENTILL_MEDIA_ALLOW_HOSTS" in error.message
    assert server.hits == []


def test_allow_hosts_lets_the_exact_host_and_port_through(server: LoopbackServer) -> None:
    server.routes["/img.png"] = Route(headers={"Content-Type": "image/png"}, body=PNG)
    image = fetch(f"{server.origin}/img.png", allowed(server))
    assert (image.width, image.height) == (30, 20)
    assert image.data.startswith(b"\x89PNG")
    hit = server.hits[0]
    assert hit.headers["host"] == f"127.0.0.1:{server.port}"
    assert hit.headers["accept-encoding"] == "identity"
    # Another port on the same host is not covered by the entry.
    other = MediaPolicy(allow_hosts=frozenset({f"127.0.0.1:{server.port + 1}"}))
    refused(f"{server.origin}/img.png", policy=other)


def test_allow_hosts_matches_the_name_as_written(server: LoopbackServer) -> None:
    server.routes["/img.png"] = Route(headers={"Content-Type": "image/png"}, body=PNG)
    # "localhost" resolves to loopback; allowing 127.0.0.1:port does not allow the name localhost:port.
    error = refused(f"http://localhost:{server.port}/img.png", policy=allowed(server))
    assert "localhost resolves to" in error.message and "loopback" in error.message
    assert server.hits == []


def test_named_host_is_pinned_to_the_checked_address(server: LoopbackServer) -> None:
    """One lookup per hop; the request goes to that address with the original Host header."""
    server.routes["/img.png"] = Route(headers={"Content-Type": "image/png"}, body=PNG)
    resolver = FakeResolver({"images.example": ["127.0.0.1"]})
    policy = MediaPolicy(allow_hosts=frozenset({f"Images.Example:{server.port}"}))
    image = fetch(f"http://IMAGES.example:{server.port}/img.png", policy, resolver)
    assert image.width == 30
    assert resolver.calls == [("images.example", server.port)]
    assert server.hits[0].headers["host"] == f"images.example:{server.port}"


def test_dns_answer_with_any_private_address_is_refused(server: LoopbackServer) -> None:
    """Rebinding: a public-looking first answer does not excuse a loopback second one."""
    resolver = FakeResolver({"rebind.example": ["93.184.216.34", "127.0.0.1"]})
    error = refused(f"http://rebind.example:{server.port}/img.png", resolver=resolver)
    assert "rebind.example resolves to 127.0.0.1, and 127.0.0.1 is a loopback address" in error.message
    assert resolver.calls == [("rebind.example", server.port)]
    assert server.hits == []


@pytest.mark.parametrize(
    "answer",
    [
        ["10.0.0.5"],
        ["169.254.169.254"],
        ["::1"],
        ["::ffff:127.0.0.1"],
        ["fd00::1"],
        ["64:ff9b::a00:1"],
        ["0.0.0.0"],
    ],
)
def test_names_resolving_to_special_addresses_are_refused(answer: list[str]) -> None:
    resolver = FakeResolver({"internal.example": answer})
    error = refused("http://internal.example/cat.png", resolver=resolver)
    assert "internal.example resolves to" in error.message


def test_unresolvable_host_is_refused() -> None:
    error = refused("http://nowhere.example/cat.png", resolver=FakeResolver({}))
    assert "could not be resolved" in error.message


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://10.0.0.5/x.png", "private"),
        ("http://[::1]/x.png", "loopback"),
        ("http://[::ffff:127.0.0.1]/x.png", "loopback"),
        ("http://0.0.0.0/x.png", "unspecified"),
        ("http://2130706433/x.png", "non-standard spelling of 127.0.0.1"),
        ("http://0x7f000001/x.png", "non-standard spelling of 127.0.0.1"),
        ("http://127.1/x.png", "non-standard spelling of 127.0.0.1"),
        ("http://0x8.0x8.0x8.0x8/x.png", "non-standard spelling of 8.8.8.8"),
        ("http://0177.0.0.1/x.png", "not a valid URL"),
        ("ftp://example.com/x.png", "must use http or https"),
        ("file:///etc/passwd", "must use http or https"),
        ("gopher://127.0.0.1:70/", "must use http or https"),
        ("//example.com/x.png", "must use http or https"),
        ("http://user:pass@example.com/x.png", "user name or password"),
        ("http://user@example.com/x.png", "user name or password"),
        ("http:///x.png", "has no host"),
        ("http://example.com:0/x.png", "invalid port"),
        ("http://example.com:99999/x.png", "invalid port"),
        ("http://[fe80::1%25eth0]/x.png", "zone id"),
        ("http://" + "a" * 9000 + ".com/", "longer than"),
    ],
)
def test_urls_refused_before_any_connection(url: str, why: str) -> None:
    resolver = FakeResolver({})  # any lookup of a public name fails: nothing can be connected to
    error = refused(url, resolver=resolver)
    assert why in error.message


def test_redirect_to_a_refused_host_is_refused(server: LoopbackServer) -> None:
    server.routes["/to-private"] = Route(302, {"Location": "http://10.0.0.5/x.png"})
    server.routes["/to-metadata"] = Route(301, {"Location": "http://169.254.169.254/latest/"})
    server.routes["/to-other-port"] = Route(307, {"Location": f"http://127.0.0.1:{server.port + 1}/x.png"})
    server.routes["/to-file"] = Route(302, {"Location": "file:///etc/passwd"})
    server.routes["/to-userinfo"] = Route(302, {"Location": "http://a:b@example.com/"})
    server.routes["/no-location"] = Route(302)
    policy = allowed(server)
    assert "10.0.0.5 is a private address" in refused(f"{server.origin}/to-private", policy=policy).message
    assert "link-local" in refused(f"{server.origin}/to-metadata", policy=policy).message
    assert "loopback" in refused(f"{server.origin}/to-other-port", policy=policy).message
    assert "redirect target must use http" in refused(f"{server.origin}/to-file", policy=policy).message
    assert "password" in refused(f"{server.origin}/to-userinfo", policy=policy).message
    assert "without a Location" in refused(f"{server.origin}/no-location", policy=policy).message


def test_redirects_are_followed_up_to_the_limit(server: LoopbackServer) -> None:
    server.routes["/img.png"] = Route(headers={"Content-Type": "image/png"}, body=PNG)
    server.routes["/r0"] = Route(302, {"Location": "/img.png"})
    for n in range(1, 5):
        server.routes[f"/r{n}"] = Route(301, {"Location": f"/r{n - 1}"})
    policy = allowed(server)
    assert fetch(f"{server.origin}/r2", policy).width == 30  # 3 redirects: at the limit
    error = refused(f"{server.origin}/r3", policy=policy)  # 4 redirects
    assert "more than 3 times" in error.message
    assert refused(f"{server.origin}/r0", policy=MediaPolicy(allow_hosts=server.allow, max_redirects=0))


def test_redirect_hops_are_resolved_and_checked_each_time(server: LoopbackServer) -> None:
    server.routes["/img.png"] = Route(headers={"Content-Type": "image/png"}, body=PNG)
    server.routes["/hop"] = Route(302, {"Location": f"http://cdn.example:{server.port}/img.png"})
    resolver = FakeResolver({"cdn.example": ["127.0.0.1"]})
    # cdn.example is not allowed: it resolves to loopback, so the second hop is refused.
    error = refused(f"{server.origin}/hop", policy=allowed(server), resolver=resolver)
    assert "cdn.example resolves to 127.0.0.1" in error.message
    assert resolver.calls == [("cdn.example", server.port)]
    policy = MediaPolicy(allow_hosts=server.allow | {f"cdn.example:{server.port}"})
    assert fetch(f"{server.origin}/hop", policy, resolver).width == 30
    assert server.hits[-1].headers["host"] == f"cdn.example:{server.port}"


def test_http_errors_name_the_status_but_not_the_body(server: LoopbackServer) -> None:
    error = refused(f"{server.origin}/missing.png", policy=allowed(server))
    assert "HTTP 404" in error.message
    assert "secret" not in error.message
    server.routes["/boom"] = Route(500, {"Content-Type": "text/plain"}, b"stack trace with secrets")
    error = refused(f"{server.origin}/boom", policy=allowed(server))
    assert "HTTP 500" in error.message and "secrets" not in error.message


def test_body_over_max_bytes_is_cut_off(server: LoopbackServer) -> None:
    server.routes["/big"] = Route(
        headers={"Content-Type": "image/png"}, body=PNG + b"\0" * 200_000, content_length=False
    )
    error = refused(f"{server.origin}/big", "invalid_image", policy=allowed(server, max_bytes=50_000))
    assert "50000 byte limit" in error.message


def test_content_length_over_the_cap_is_refused_before_reading(server: LoopbackServer) -> None:
    server.routes["/huge"] = Route(
        headers={"Content-Type": "image/png", "Content-Length": "999999999"}, body=PNG
    )
    started = time.monotonic()
    error = refused(f"{server.origin}/huge", "invalid_image", policy=allowed(server, max_bytes=1_000_000))
    assert "Content-Length: 999999999" in error.message
    assert time.monotonic() - started < 2


def test_slow_server_times_out(server: LoopbackServer) -> None:
    server.routes["/slow"] = Route(headers={"Content-Type": "image/png"}, body=PNG, delay_s=1.5)
    started = time.monotonic()
    error = refused(f"{server.origin}/slow", policy=allowed(server, read_timeout_s=0.3))
    assert "timed out" in error.message
    assert time.monotonic() - started < 1.4


def test_connect_timeout() -> None:
    """A listener whose accept queue is full never completes the handshake: connect_timeout_s ends it."""
    stalled = StalledListener()
    try:
        policy = MediaPolicy(allow_hosts=frozenset({f"127.0.0.1:{stalled.port}"}), connect_timeout_s=0.2)
        started = time.monotonic()
        error = refused(f"http://127.0.0.1:{stalled.port}/img.png", policy=policy)
        assert "timed out while connecting" in error.message
        assert time.monotonic() - started < 2
    finally:
        stalled.close()


def test_a_connect_timeout_moves_on_to_the_next_address(server: LoopbackServer) -> None:
    """The first resolved address (127.0.0.2, stalled) times out; the second (127.0.0.1) serves."""
    server.routes["/img.png"] = Route(headers={"Content-Type": "image/png"}, body=PNG)
    stalled = StalledListener("127.0.0.2", server.port)
    try:
        resolver = FakeResolver({"img.example": ["127.0.0.2", "127.0.0.1"]})
        policy = MediaPolicy(allow_hosts=frozenset({f"img.example:{server.port}"}), connect_timeout_s=0.2)
        image = fetch(f"http://img.example:{server.port}/img.png", policy, resolver)
        assert (image.width, image.height) == (30, 20)
        assert [hit.path for hit in server.hits] == ["/img.png"]
    finally:
        stalled.close()


def test_trickling_server_hits_the_total_deadline(server: LoopbackServer) -> None:
    """Each byte arrives well within the read timeout; the wall-clock deadline still ends it."""
    server.routes["/trickle"] = Route(headers={"Content-Type": "image/png"}, body=PNG, trickle_s=0.05)
    started = time.monotonic()
    error = refused(
        f"{server.origin}/trickle", policy=allowed(server, read_timeout_s=1.0, total_timeout_s=0.5)
    )
    assert "within 0.5 seconds" in error.message
    assert time.monotonic() - started < 1.5


def test_compressed_bodies_are_refused(server: LoopbackServer) -> None:
    headers = {"Content-Type": "image/png", "Content-Encoding": "gzip"}
    server.routes["/gz"] = Route(headers=headers, body=gzip.compress(PNG))
    error = refused(f"{server.origin}/gz", policy=allowed(server))
    assert "compressed" in error.message


def test_empty_body_is_refused(server: LoopbackServer) -> None:
    server.routes["/empty"] = Route(headers={"Content-Type": "image/png"})
    refused(f"{server.origin}/empty", "invalid_image", policy=allowed(server))


@pytest.mark.parametrize(
    ("content_type", "ok"),
    [
        ("image/png", True),
        ("IMAGE/PNG; charset=binary", True),
        ("application/octet-stream", True),
        (None, True),
        ("image/jpeg", False),  # mismatch with the PNG content
        ("text/html", False),
        ("image/svg+xml", False),
    ],
)
def test_content_type_must_agree_with_the_content(
    server: LoopbackServer, content_type: str | None, ok: bool
) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    server.routes["/img"] = Route(headers=headers, body=PNG)
    if ok:
        assert fetch(f"{server.origin}/img", allowed(server)).width == 30
    else:
        refused(f"{server.origin}/img", "invalid_image", policy=allowed(server))


def test_fetched_jpeg_is_reencoded(server: LoopbackServer) -> None:
    jpeg = encode(Image.new("RGB", (4000, 1000), (5, 5, 5)), "JPEG")
    server.routes["/photo.jpg"] = Route(headers={"Content-Type": "image/jpeg"}, body=jpeg)
    image = fetch(f"{server.origin}/photo.jpg", allowed(server))
    assert (image.width, image.height) == (2048, 512)
    assert image.mime == "image/png"


def test_connection_refused_is_a_clean_error(server: LoopbackServer) -> None:
    port = server.port
    server.httpd.shutdown()
    server.httpd.server_close()
    error = refused(
        f"http://127.0.0.1:{port}/x.png", policy=MediaPolicy(allow_hosts=frozenset({f"127.0.0.1:{port}"}))
    )
    assert "could not be connected to" in error.message


def test_allow_hosts_entries_with_non_ascii_names_match_the_encoded_url_host() -> None:
    """An IDN entry is stored in the ASCII form the URL's host is compared in (it would never match raw)."""
    assert parse_allow_hosts(["Bücher.Internal:80"]) == {("xn--bcher-kva.internal", 80)}
    with pytest.raises(ValueError, match="not a valid host name"):
        parse_allow_hosts(["ｆｕｌｌ.example:80"])


def test_an_allowed_idn_host_is_fetched(server: LoopbackServer) -> None:
    server.routes["/img.png"] = Route(headers={"Content-Type": "image/png"}, body=PNG)
    resolver = FakeResolver({"xn--bcher-kva.internal": ["127.0.0.1"]})
    policy = MediaPolicy(allow_hosts=frozenset({f"bücher.internal:{server.port}"}))
    image = fetch(f"http://bücher.internal:{server.port}/img.png", policy, resolver)
    assert (image.width, image.height) == (30, 20)
    assert resolver.calls == [("xn--bcher-kva.internal", server.port)]


def test_parse_allow_hosts() -> None:
    assert parse_allow_hosts(["Images.Internal:80", "[::1]:8080", "10.0.0.5:443"]) == {
        ("images.internal", 80),
        ("::1", 8080),
        ("10.0.0.5", 443),
    }
    for bad in ["images.internal", "host:", ":80", "host:0", "host:70000", "::1:80", "host:http"]:
        with pytest.raises(ValueError):
            parse_allow_hosts([bad])
    with pytest.raises(ValueError):
        MediaPolicy(allow_hosts=frozenset({"no-port"}))
