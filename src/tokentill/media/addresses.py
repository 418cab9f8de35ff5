"""Which IP addresses an image fetch may connect to.

Contract: `classify(address)` names the special-purpose range an address falls in, or says it is
globally routable; only `AddressClass.kind is AddressKind.GLOBAL` may be connected to (unless an operator
allowed the host explicitly). The tables are written out here rather than taken from `ipaddress.is_global`
because the standard library's tables changed between patch releases (CVE-2024-4032, fixed in 3.11.10)
and miss ranges that matter for SSRF (e.g. NAT64 and 6to4 embeddings of private IPv4 addresses). The
`ipaddress` flags are still consulted afterwards as a second opinion: an address either source calls
special is refused.

IPv6 forms that embed an IPv4 address (IPv4-mapped `::ffff:a.b.c.d`, IPv4-compatible `::a.b.c.d`, 6to4
`2002:aabb:ccdd::`, NAT64 `64:ff9b::a.b.c.d`) are classified by the embedded IPv4 address, because that
is where a kernel or a translator would send the packets.

`parse_host_literal(host)` turns a URL host into an address when it is one, including the legacy IPv4
spellings that `inet_aton` (and therefore `getaddrinfo`) accept: `2130706433`, `0x7f000001`, `127.1`,
`0177.0.0.1`. Those are reported as non-canonical so the fetcher can refuse them outright.
"""

from __future__ import annotations

import enum
import ipaddress
import re
import socket
from dataclasses import dataclass

__all__ = [
    "AddressClass",
    "AddressKind",
    "HostLiteral",
    "IPAddress",
    "classify",
    "parse_host_literal",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class AddressKind(enum.Enum):
    """The range an address belongs to; the value is the phrase used in error messages."""

    GLOBAL = "a globally routable address"
    LOOPBACK = "a loopback address"
    PRIVATE = "a private address"
    LINK_LOCAL = "a link-local address"
    UNIQUE_LOCAL = "a unique-local address"
    SITE_LOCAL = "a site-local address"
    MULTICAST = "a multicast address"
    UNSPECIFIED = "an unspecified address"
    SHARED = "a carrier-grade NAT (shared) address"
    BENCHMARKING = "a benchmarking address"
    DOCUMENTATION = "a documentation address"
    BROADCAST = "a broadcast address"
    RESERVED = "a reserved address"


@dataclass(frozen=True)
class AddressClass:
    """The verdict on one address. `embedded` is set when an IPv6 address was judged by the IPv4 inside it."""

    address: IPAddress
    kind: AddressKind
    embedded: ipaddress.IPv4Address | None = None

    @property
    def is_global(self) -> bool:
        return self.kind is AddressKind.GLOBAL

    def describe(self) -> str:
        """E.g. `10.0.0.5 is a private address`, `::ffff:127.0.0.1 (IPv4 127.0.0.1) is a loopback address`."""
        if self.embedded is not None:
            return f"{self.address} (IPv4 {self.embedded}) is {self.kind.value}"
        return f"{self.address} is {self.kind.value}"


@dataclass(frozen=True)
class HostLiteral:
    """A URL host that is an IP address. `canonical` is False for legacy spellings like `127.1`."""

    address: IPAddress
    canonical: bool


def _nets(
    *specs: tuple[str, AddressKind],
) -> tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, AddressKind], ...]:
    return tuple((ipaddress.ip_network(net), kind) for net, kind in specs)


_K = AddressKind

# Order matters only where ranges nest: more specific first.
_V4_SPECIAL = _nets(
    ("0.0.0.0/8", _K.UNSPECIFIED),  # "this network"; 0.0.0.0 reaches localhost on Linux
    ("10.0.0.0/8", _K.PRIVATE),
    ("100.64.0.0/10", _K.SHARED),
    ("127.0.0.0/8", _K.LOOPBACK),
    ("169.254.0.0/16", _K.LINK_LOCAL),  # includes the cloud metadata address 169.254.169.254
    ("172.16.0.0/12", _K.PRIVATE),
    ("192.0.0.0/24", _K.RESERVED),  # IETF protocol assignments
    ("192.0.2.0/24", _K.DOCUMENTATION),
    ("192.88.99.0/24", _K.RESERVED),  # deprecated 6to4 relay anycast
    ("192.168.0.0/16", _K.PRIVATE),
    ("198.18.0.0/15", _K.BENCHMARKING),
    ("198.51.100.0/24", _K.DOCUMENTATION),
    ("203.0.113.0/24", _K.DOCUMENTATION),
    ("224.0.0.0/4", _K.MULTICAST),
    ("255.255.255.255/32", _K.BROADCAST),
    ("240.0.0.0/4", _K.RESERVED),
)

_V6_SPECIAL = _nets(
    ("::/128", _K.UNSPECIFIED),
    ("::1/128", _K.LOOPBACK),
    ("64:ff9b:1::/48", _K.PRIVATE),  # local-use NAT64 (RFC 8215)
    ("100::/64", _K.RESERVED),  # discard-only
    ("2001:db8::/32", _K.DOCUMENTATION),
    ("2001::/23", _K.RESERVED),  # IETF protocol assignments, incl. Teredo 2001::/32 and ORCHID
    ("3fff::/20", _K.DOCUMENTATION),  # RFC 9637
    ("5f00::/16", _K.RESERVED),  # SRv6 SIDs
    ("fc00::/7", _K.UNIQUE_LOCAL),
    ("fe80::/10", _K.LINK_LOCAL),
    ("fec0::/10", _K.SITE_LOCAL),
    ("ff00::/8", _K.MULTICAST),
)

_V4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_V4_COMPATIBLE = ipaddress.IPv6Network("::/96")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_SIX_TO_FOUR = ipaddress.IPv6Network("2002::/16")
_GLOBAL_UNICAST_V6 = ipaddress.IPv6Network("2000::/3")

# Characters that can appear in an inet_aton spelling. Checked first because glibc's inet_aton stops at
# whitespace and accepts "127.0.0.1 anything".
_LEGACY_V4 = re.compile(r"[0-9a-fA-FxX.]+")


def _classify_v4(address: ipaddress.IPv4Address) -> AddressKind:
    for net, kind in _V4_SPECIAL:
        if address in net:
            return kind
    # Second opinion from the standard library (its tables differ between Python patch releases).
    if address.is_private or address.is_reserved or address.is_multicast or not address.is_global:
        return _K.RESERVED
    return _K.GLOBAL


def _embedded_v4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    packed = address.packed
    if address in _V4_MAPPED or address in _NAT64:
        return ipaddress.IPv4Address(packed[12:])
    if address in _SIX_TO_FOUR:
        return ipaddress.IPv4Address(packed[2:6])
    if address in _V4_COMPATIBLE and int(address) > 1:  # ::a.b.c.d, but not :: or ::1
        return ipaddress.IPv4Address(packed[12:])
    return None


def _classify_v6(address: ipaddress.IPv6Address) -> AddressClass:
    if address.scope_id:  # "fe80::1%eth0": a zone only makes sense on a local link
        return AddressClass(address, _K.LINK_LOCAL)
    embedded = _embedded_v4(address)
    if embedded is not None:
        kind = _classify_v4(embedded)
        if kind is _K.GLOBAL and address in _V4_COMPATIBLE and address not in _V4_MAPPED:
            kind = _K.RESERVED  # IPv4-compatible addresses are deprecated (RFC 4291); nothing serves there
        return AddressClass(address, kind, embedded)
    for net, kind in _V6_SPECIAL:
        if address in net:
            return AddressClass(address, kind)
    if address not in _GLOBAL_UNICAST_V6:
        return AddressClass(address, _K.RESERVED)  # everything outside 2000::/3 is unallocated
    if address.is_private or address.is_reserved or address.is_multicast or not address.is_global:
        return AddressClass(address, _K.RESERVED)
    return AddressClass(address, _K.GLOBAL)


def classify(address: IPAddress | str) -> AddressClass:
    """Classify an address (object or canonical text). Raises ValueError on text that is not an address."""
    if isinstance(address, str):
        address = ipaddress.ip_address(address)
    if isinstance(address, ipaddress.IPv4Address):
        return AddressClass(address, _classify_v4(address))
    return _classify_v6(address)


def parse_host_literal(host: str) -> HostLiteral | None:
    """The address a URL host names literally, or None if the host is a name to resolve.

    `host` is the host as a URL parser returns it: IPv6 without brackets, possibly with a `%zone`.
    Legacy IPv4 spellings accepted by `inet_aton` are normalised and marked non-canonical. A host made only
    of digits and dots that `inet_aton` refuses (e.g. `1.2.3.4.5`) is not an address; resolving it fails.
    """
    candidate = host.strip().rstrip(".") if host.endswith(".") else host.strip()
    try:
        parsed = ipaddress.ip_address(candidate.replace("%25", "%"))
    except ValueError:
        pass
    else:
        return HostLiteral(parsed, canonical=candidate == host)
    if not candidate or not _LEGACY_V4.fullmatch(candidate):
        return None
    try:
        packed = socket.inet_aton(candidate)
    except OSError:
        return None
    return HostLiteral(ipaddress.IPv4Address(packed), canonical=False)
