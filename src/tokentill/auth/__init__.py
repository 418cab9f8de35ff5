"""Authentication: API key text (`keys`) and the database-backed key store (`service`)."""

from __future__ import annotations

from tokentill.auth.keys import generate_key, hash_secret, parse_key
from tokentill.auth.service import UNSET, CreatedKey, KeyInfo, KeyStore, Principal

__all__ = [
    "UNSET",
    "CreatedKey",
    "KeyInfo",
    "KeyStore",
    "Principal",
    "generate_key",
    "hash_secret",
    "parse_key",
]
