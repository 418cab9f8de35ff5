from __future__ import annotations

import hashlib
import re

import pytest

from tokentill.auth.keys import generate_key, hash_secret, mask_key, parse_key


def test_generate_and_parse() -> None:
    seen = set()
    for _ in range(200):
        key_id, secret, full = generate_key()
        assert re.fullmatch(r"[a-z0-9]{8}", key_id)
        assert len(secret) == 43
        assert full == f"tt-{key_id}-{secret}"
        assert parse_key(full) == (key_id, secret)
        seen.add(key_id)
    assert len(seen) == 200


def test_secret_with_dashes_parses() -> None:
    secret = "-" * 10 + "_" * 10 + "a" * 23
    assert parse_key(f"tt-abcd1234-{secret}") == ("abcd1234", secret)


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "tt",
        "tt-abcd1234",
        "sk-abcd1234-" + "a" * 43,
        "tt-ABCD1234-" + "a" * 43,
        "tt-abcd123-" + "a" * 43,
        "tt-abcd1234-" + "a" * 42,
        "tt-abcd1234-" + "a" * 44,
        "tt-abcd1234-" + "a" * 42 + "!",
        "tt-abcd1234-" + "a" * 42 + "=",
    ],
)
def test_parse_rejects(raw: str) -> None:
    assert parse_key(raw) is None


def test_hash_secret() -> None:
    assert hash_secret("abc") == hashlib.sha256(b"abc").hexdigest()
    assert len(hash_secret("x")) == 64


def test_mask_never_shows_secret() -> None:
    key_id, secret, full = generate_key()
    assert mask_key(full) == f"tt-{key_id[:4]}****"
    assert secret not in mask_key(full)
    assert mask_key("sk-proj-averylongsecretvalue") == "sk-****"
    assert mask_key("short") == "****"
