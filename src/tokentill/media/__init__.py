"""Image intake: data URIs and guarded URL fetches in, validated and re-encoded `ImageInput`s out.

    service.py    MediaService / MediaPolicy — the entry point the request pipeline calls
    fetch.py      GuardedFetcher — SSRF-safe http(s) fetch (address pinning, manual redirects, caps)
    addresses.py  classify() — which IP addresses are globally routable
    images.py     prepare_image() — sniff, size-check, decode and re-encode with Pillow

Everything here raises `tokentill.errors.InvalidRequest` for bad input and nothing else.
"""

from __future__ import annotations

from tokentill.media.service import ImageRef, MediaPolicy, MediaService

__all__ = ["ImageRef", "MediaPolicy", "MediaService"]
