"""The address classifier. Addresses here are only classified, never connected to."""

from __future__ import annotations

import ipaddress

import pytest

from tokentill.media.addresses import AddressKind, classify, parse_host_literal

K = AddressKind

REFUSED = [
    # IPv4 special ranges
    ("0.0.0.0", K.UNSPECIFIED),
    ("0.1.2.3", K.UNSPECIFIED),
    ("10.0.0.5", K.PRIVATE),
    ("10.255.255.255", K.PRIVATE),
    ("100.64.0.1", K.SHARED),
    ("100.127.255.254", K.SHARED),
    ("127.0.0.1", K.LOOPBACK),
    ("127.255.0.9", K.LOOPBACK),
    ("169.254.169.254", K.LINK_LOCAL),  # cloud metadata
    ("169.254.0.1", K.LINK_LOCAL),
    ("172.16.0.1", K.PRIVATE),
    ("172.31.255.255", K.PRIVATE),
    ("192.0.0.8", K.RESERVED),
    ("192.0.2.10", K.DOCUMENTATION),
    ("192.88.99.1", K.RESERVED),
    ("192.168.1.1", K.PRIVATE),
    ("198.18.0.1", K.BENCHMARKING),
    ("198.19.255.255", K.BENCHMARKING),
    ("198.51.100.7", K.DOCUMENTATION),
    ("203.0.113.9", K.DOCUMENTATION),
    ("224.0.0.1", K.MULTICAST),
    ("239.255.255.250", K.MULTICAST),
    ("240.0.0.1", K.RESERVED),
    ("255.255.255.255", K.BROADCAST),
    # IPv6 special ranges
    ("::", K.UNSPECIFIED),
    ("::1", K.LOOPBACK),
    ("fe80::1", K.LINK_LOCAL),
    ("febf:ffff::1", K.LINK_LOCAL),
    ("fc00::1", K.UNIQUE_LOCAL),
    ("fd12:3456:789a::1", K.UNIQUE_LOCAL),
    ("fec0::1", K.SITE_LOCAL),
    ("ff02::1", K.MULTICAST),
    ("ff0e::1", K.MULTICAST),
    ("2001:db8::1", K.DOCUMENTATION),
    ("3fff::1", K.DOCUMENTATION),
    ("2001::1", K.RESERVED),  # Teredo
    ("2001:10::1", K.RESERVED),  # ORCHID
    ("100::1", K.RESERVED),  # discard-only
    ("64:ff9b:1::1", K.PRIVATE),  # local-use NAT64
    ("4000::1", K.RESERVED),  # outside 2000::/3
    ("1::1", K.RESERVED),
    # IPv6 embedding a non-global IPv4
    ("::ffff:127.0.0.1", K.LOOPBACK),  # IPv4-mapped
    ("::ffff:7f00:1", K.LOOPBACK),
    ("::ffff:10.0.0.1", K.PRIVATE),
    ("::ffff:169.254.169.254", K.LINK_LOCAL),
    ("::127.0.0.1", K.LOOPBACK),  # IPv4-compatible
    ("::10.1.2.3", K.PRIVATE),
    ("::8.8.8.8", K.RESERVED),  # IPv4-compatible is deprecated even with a public IPv4 inside
    ("2002:7f00:1::", K.LOOPBACK),  # 6to4 of 127.0.0.1
    ("2002:a9fe:a9fe::1", K.LINK_LOCAL),  # 6to4 of 169.254.169.254
    ("2002:c0a8:101::", K.PRIVATE),  # 6to4 of 192.168.1.1
    ("64:ff9b::127.0.0.1", K.LOOPBACK),  # NAT64
    ("64:ff9b::a00:5", K.PRIVATE),
    ("64:ff9b::169.254.169.254", K.LINK_LOCAL),
    ("fe80::1%eth0", K.LINK_LOCAL),  # zone id
]

GLOBAL = [
    "8.8.8.8",
    "1.1.1.1",
    "93.184.216.34",
    "172.32.0.1",  # just above 172.16/12
    "100.128.0.1",  # just above 100.64/10
    "198.20.0.1",  # just above 198.18/15
    "11.0.0.1",
    "2606:4700:4700::1111",
    "2a00:1450:4001:80e::200e",
    "::ffff:8.8.8.8",  # IPv4-mapped public
    "2002:808:808::1",  # 6to4 of 8.8.8.8
    "64:ff9b::8.8.8.8",  # NAT64 of a public address
]


@pytest.mark.parametrize(("text", "kind"), REFUSED)
def test_special_addresses_are_not_global(text: str, kind: AddressKind) -> None:
    verdict = classify(text)
    assert verdict.kind is kind
    assert not verdict.is_global


@pytest.mark.parametrize("text", GLOBAL)
def test_public_addresses_are_global(text: str) -> None:
    assert classify(text).is_global


def test_describe_names_the_embedded_address() -> None:
    assert classify("::ffff:127.0.0.1").describe() == "::ffff:7f00:1 (IPv4 127.0.0.1) is a loopback address"
    assert classify("10.0.0.5").describe() == "10.0.0.5 is a private address"


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("2130706433", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("0X7F000001", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("127.0.1", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("0x7f.0.0.1", "127.0.0.1"),
        ("0", "0.0.0.0"),
        ("0xa9fea9fe", "169.254.169.254"),
        ("3232235777", "192.168.1.1"),
        ("127.0.0.1.", "127.0.0.1"),  # trailing dot
        ("134744072", "8.8.8.8"),
    ],
)
def test_legacy_ipv4_spellings_are_normalised_and_marked(host: str, address: str) -> None:
    literal = parse_host_literal(host)
    assert literal is not None
    assert literal.address == ipaddress.ip_address(address)
    assert not literal.canonical


@pytest.mark.parametrize(
    ("host", "address"), [("127.0.0.1", "127.0.0.1"), ("::1", "::1"), ("8.8.8.8", "8.8.8.8")]
)
def test_canonical_literals(host: str, address: str) -> None:
    literal = parse_host_literal(host)
    assert literal is not None
    assert literal.address == ipaddress.ip_address(address)
    assert literal.canonical


@pytest.mark.parametrize(
    "host",
    ["example.com", "images.internal", "localhost", "1.2.3.4.5", "08.1.1.1", "deadbeef", "127.0.0.1 x", ""],
)
def test_names_are_not_literals(host: str) -> None:
    assert parse_host_literal(host) is None
