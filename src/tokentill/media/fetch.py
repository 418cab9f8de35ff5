"""The guarded fetcher: the only code in tokentill that fetches a client-supplied URL.

Contract of `GuardedFetcher.fetch(url, param=...)`: it returns the body of a 2xx `http`/`https` response
of at most `max_bytes` bytes, or raises `InvalidRequest` (code `invalid_image_url`, or `invalid_image`
when the body is empty or too large) whose message says why. It never raises anything else for bad input.

What it defends against (server-side request forgery):

* Schemes other than http/https, credentials in the URL, odd ports, IPv6 zone ids.
* Hosts that are, or resolve to, addresses that are not globally routable (see `addresses.py`). A host
  is refused if ANY of its addresses is special, so a DNS answer mixing a public and a private address
  cannot win a race. Legacy IPv4 spellings (`2130706433`, `0x7f000001`, `127.1`) are refused outright.
* DNS rebinding: the host is resolved once and the request is sent to exactly the address that was
  checked. The URL is rewritten to the IP; the `Host` header and, for https, the TLS SNI / certificate
  hostname (`sni_hostname` extension) keep the original name, so certificate verification still applies.
* Redirects: followed by hand, at most `max_redirects`, each hop checked exactly like the first.
* Slow or huge responses: connect/read timeouts, one wall-clock deadline over all hops, a Content-Length
  check before reading, and a streaming byte cap. Compressed bodies are refused (decompression bombs).

`allow_hosts` ("host:port") lets an operator reach a private host: for exactly that host (as written in
the URL, lowercased) and effective port, the address check is skipped. Resolution and pinning still apply.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio
import httpx2

from tokentill.errors import InvalidRequest
from tokentill.media.addresses import HostLiteral, IPAddress, classify, parse_host_literal
from tokentill.settings import parse_allow_hosts  # the one parser start-up validation also uses

if TYPE_CHECKING:
    from tokentill.media.service import MediaPolicy

__all__ = ["FetchedImage", "GuardedFetcher", "Resolver", "parse_allow_hosts", "system_resolver"]

logger = logging.getLogger(__name__)

Resolver = Callable[[str, int], Awaitable[Sequence[str]]]
"""`(host, port) -> addresses as text`; raises OSError when the name does not resolve."""

ALLOW_HINT = "Operators can allow a host with TOKENTILL_MEDIA_ALLOW_HOSTS."
MAX_URL_LENGTH = 8192
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_DEFAULT_PORTS = {"http": 80, "https": 443}
_ACCEPT = "image/png, image/jpeg, image/webp, image/gif;q=0.9, */*;q=0.1"


async def system_resolver(host: str, port: int) -> list[str]:
    """Resolve with the operating system (`getaddrinfo`, off the event loop)."""
    infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return [str(info[4][0]) for info in infos]


@dataclass(frozen=True)
class FetchedImage:
    """A fetched body; `content_type` is the response's media type (lowercased, no parameters) or None."""

    data: bytes
    content_type: str | None
    url: str


@dataclass(frozen=True)
class _Target:
    url: httpx2.URL  # as the client wrote it (fragment dropped); used for Host, SNI and relative redirects
    host: str  # ASCII (IDNA) form, lowercased, no brackets
    port: int  # effective port
    literal: HostLiteral | None


def _refuse(message: str, param: str, code: str = "invalid_image_url") -> InvalidRequest:
    return InvalidRequest(message, code=code, param=param)


class GuardedFetcher:
    """Fetches image URLs under a `MediaPolicy` through one shared client (owned by the caller)."""

    def __init__(
        self, policy: MediaPolicy, client: httpx2.AsyncClient, *, resolver: Resolver | None = None
    ) -> None:
        self._policy = policy
        self._client = client
        self._resolver: Resolver = resolver or system_resolver
        self._allowed = parse_allow_hosts(policy.allow_hosts)

    async def fetch(self, url: str, *, param: str) -> FetchedImage:
        """Fetch `url` under every guard in the module docstring; see there for the contract."""
        total = self._policy.total_timeout_s
        try:
            with anyio.fail_after(total):
                return await self._fetch(url, param)
        except TimeoutError:
            raise _refuse(f"Image URL could not be fetched within {total:g} seconds.", param) from None

    async def _fetch(self, url: str, param: str) -> FetchedImage:
        target = self._parse(url, param)
        redirects = 0
        while True:
            addresses = await self._checked_addresses(target, param)
            response = await self._send(target, addresses, param)
            try:
                status = response.status_code
                if status in _REDIRECT_STATUSES:
                    location = response.headers.get("location")
                    if not location:
                        raise _refuse(f"Image URL returned HTTP {status} without a Location header.", param)
                    if redirects >= self._policy.max_redirects:
                        raise _refuse(
                            f"Image URL redirected more than {self._policy.max_redirects} times.", param
                        )
                    redirects += 1
                    target = self._parse_redirect(target, location, param)
                    continue
                if not 200 <= status < 300:
                    raise _refuse(f"Image URL returned HTTP {status}; expected 200.", param)
                data = await self._read_body(response, target, param)
                return FetchedImage(data, _media_type(response.headers.get("content-type")), str(target.url))
            finally:
                await response.aclose()

    def _parse(self, url: str, param: str) -> _Target:
        if len(url) > MAX_URL_LENGTH:
            raise _refuse(f"Image URL is longer than {MAX_URL_LENGTH} characters.", param)
        try:
            parsed = httpx2.URL(url)
        except (httpx2.InvalidURL, TypeError, ValueError):
            raise _refuse("Image URL is not a valid URL.", param) from None
        return self._check_url(parsed, param)

    def _parse_redirect(self, current: _Target, location: str, param: str) -> _Target:
        try:
            parsed = current.url.join(location)
        except (httpx2.InvalidURL, TypeError, ValueError):
            raise _refuse("Image URL redirected to an invalid URL.", param) from None
        logger.debug("image fetch redirected from %s to %s", current.host, parsed.host)
        return self._check_url(parsed, param, redirect=True)

    def _check_url(self, url: httpx2.URL, param: str, *, redirect: bool = False) -> _Target:
        where = "Image URL redirect target" if redirect else "Image URL"
        scheme = url.scheme.lower()
        if scheme not in _DEFAULT_PORTS:
            shown = scheme[:16] or "none"
            raise _refuse(f"{where} must use http or https (scheme: {shown}).", param)
        if url.userinfo:
            raise _refuse(f"{where} must not contain a user name or password.", param)
        host = url.raw_host.decode("ascii", errors="replace").lower()
        if not host:
            raise _refuse(f"{where} has no host.", param)
        if "%" in host:
            raise _refuse(f"{where} must not use an IPv6 zone id.", param)
        port = url.port if url.port is not None else _DEFAULT_PORTS[scheme]
        if not 1 <= port <= 65535:
            raise _refuse(f"{where} has an invalid port {port}.", param)
        literal = parse_host_literal(host)
        if literal is not None and not literal.canonical:
            verdict = classify(literal.address)
            why = f", which is {verdict.kind.value}" if not verdict.is_global else ""
            raise _refuse(
                f"Image URL refused: host {host[:64]} is a non-standard spelling of {literal.address}{why}. "
                "Write IP addresses in dotted-decimal form.",
                param,
            )
        return _Target(url.copy_with(fragment=None), host, port, literal)

    def _is_allowed(self, target: _Target) -> bool:
        return (target.host.rstrip("."), target.port) in self._allowed

    async def _checked_addresses(self, target: _Target, param: str) -> list[IPAddress]:
        """The addresses to connect to, all checked; the caller must not resolve the host again."""
        if target.literal is not None:
            addresses: list[IPAddress] = [target.literal.address]
        else:
            try:
                resolved = await self._resolver(target.host, target.port)
                addresses = [ipaddress.ip_address(text) for text in resolved]
            except (OSError, UnicodeError, ValueError) as exc:
                logger.info("image host %s did not resolve: %s", target.host, exc)
                raise _refuse(f"Image URL host {target.host[:253]} could not be resolved.", param) from None
            if not addresses:
                raise _refuse(f"Image URL host {target.host[:253]} could not be resolved.", param)
        if self._is_allowed(target):
            return addresses
        for address in addresses:
            verdict = classify(address)
            if not verdict.is_global:
                # "localhost resolves to 127.0.0.1, and 127.0.0.1 is a loopback address"
                via = "" if target.literal is not None else f"{target.host[:253]} resolves to {address}, and "
                logger.info("image URL refused: %s%s", via, verdict.describe())
                raise _refuse(f"Image URL refused: {via}{verdict.describe()}. {ALLOW_HINT}", param)
        return addresses

    async def _send(self, target: _Target, addresses: list[IPAddress], param: str) -> httpx2.Response:
        """Send the GET to the first checked address that accepts a connection within the connect timeout."""
        headers = {
            "Host": target.url.netloc.decode("ascii"),
            "Accept": _ACCEPT,
            "Accept-Encoding": "identity",
            "User-Agent": "tokentill-media/1",
        }
        # SNI and certificate verification use the name the client wrote, not the pinned IP.
        extensions = {"sni_hostname": target.host} if target.literal is None else {}
        for index, address in enumerate(addresses):
            request = self._client.build_request(
                "GET", target.url.copy_with(host=str(address)), headers=headers, extensions=extensions
            )
            try:
                return await self._client.send(request, stream=True)
            except httpx2.ConnectError as exc:
                if _is_certificate_error(exc):
                    raise _refuse(
                        f"Image URL host {target.host[:253]} presented a TLS certificate that failed "
                        "verification.",
                        param,
                    ) from None
                if index + 1 < len(addresses):
                    continue
                raise _refuse(
                    f"Image URL host {target.host[:253]} could not be connected to.", param
                ) from None
            except httpx2.ConnectTimeout:
                # Like a refused connection: the next checked address may answer (the total deadline
                # still bounds the whole walk).
                if index + 1 < len(addresses):
                    continue
                message = f"Image URL host {target.host[:253]} timed out while connecting."
                raise _refuse(message, param) from None
            except httpx2.TimeoutException:
                raise _refuse(f"Image URL host {target.host[:253]} timed out.", param) from None
            except (httpx2.HTTPError, httpx2.InvalidURL, httpx2.StreamError, OSError) as exc:
                logger.info("image fetch from %s failed: %r", target.host, exc)
                raise _refuse(f"Image URL could not be fetched from {target.host[:253]}.", param) from None
        raise _refuse(f"Image URL host {target.host[:253]} has no usable address.", param)

    async def _read_body(self, response: httpx2.Response, target: _Target, param: str) -> bytes:
        limit = self._policy.max_bytes
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            # We asked for identity; decoding gzip/br here would let a small body expand without bound.
            raise _refuse(f"Image URL returned a compressed body (Content-Encoding: {encoding[:32]}).", param)
        declared = response.headers.get("content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            raise _refuse(
                f"Image is larger than the {limit} byte limit (Content-Length: {int(declared)}).",
                param,
                "invalid_image",
            )
        body = bytearray()
        try:
            async for chunk in response.aiter_raw():
                body += chunk
                if len(body) > limit:
                    raise _refuse(f"Image is larger than the {limit} byte limit.", param, "invalid_image")
        except httpx2.TimeoutException:
            raise _refuse(f"Image URL host {target.host[:253]} timed out while sending.", param) from None
        except (httpx2.HTTPError, httpx2.StreamError, OSError) as exc:
            logger.info("image body from %s failed: %r", target.host, exc)
            raise _refuse(f"Image URL body from {target.host[:253]} could not be read.", param) from None
        if not body:
            raise _refuse("Image URL returned an empty body.", param, "invalid_image")
        return bytes(body)


def _is_certificate_error(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    for _ in range(8):  # the SSL error sits a few links down the __cause__/__context__ chain
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _media_type(header: str | None) -> str | None:
    if header is None:
        return None
    media_type = header.split(";", 1)[0].strip().lower()
    return media_type or None
