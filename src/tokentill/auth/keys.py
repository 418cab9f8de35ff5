"""API key text: `tt-<8 char id>-<43 char secret>`.

The id (lowercase letters and digits) is the database key and safe to show; the secret is
`secrets.token_urlsafe(32)` and is stored only as its sha256. The secret's alphabet includes `-` and `_`,
so a key is split on the first two dashes only.
"""

from __future__ import annotations

import hashlib
import secrets
import string

__all__ = [
    "KEY_ID_LENGTH",
    "KEY_PREFIX",
    "SECRET_LENGTH",
    "generate_key",
    "hash_secret",
    "mask_key",
    "parse_key",
]

KEY_PREFIX = "tt"
KEY_ID_LENGTH = 8
SECRET_LENGTH = 43  # len(secrets.token_urlsafe(32))
_ID_ALPHABET = string.ascii_lowercase + string.digits
_SECRET_ALPHABET = frozenset(string.ascii_letters + string.digits + "-_")


def generate_key() -> tuple[str, str, str]:
    """A fresh key as (key_id, secret, full_key); show `full_key` once, store only `hash_secret(secret)`."""
    key_id = "".join(secrets.choice(_ID_ALPHABET) for _ in range(KEY_ID_LENGTH))
    secret = secrets.token_urlsafe(32)
    return key_id, secret, f"{KEY_PREFIX}-{key_id}-{secret}"


def parse_key(raw: str) -> tuple[str, str] | None:
    """(key_id, secret) from a key's text, or None if it is not shaped like a tokentill key."""
    parts = raw.split("-", 2)
    if len(parts) != 3:
        return None
    prefix, key_id, secret = parts
    if prefix != KEY_PREFIX or len(key_id) != KEY_ID_LENGTH or len(secret) != SECRET_LENGTH:
        return None
    if any(c not in _ID_ALPHABET for c in key_id) or not _SECRET_ALPHABET.issuperset(secret):
        return None
    return key_id, secret


def hash_secret(secret: str) -> str:
    """The stored form of a secret: sha256, lowercase hex (64 characters)."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def mask_key(raw: str) -> str:
    """A key as error messages may show it: the prefix and 4 id characters, never any of the secret."""
    parsed = parse_key(raw)
    if parsed is not None:
        return f"{KEY_PREFIX}-{parsed[0][:4]}****"
    return f"{raw[:3]}****" if len(raw) >= 12 else "****"
