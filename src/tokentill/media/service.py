"""`MediaService`: image parts in, validated `ImageInput`s out. The only entry point of `tokentill.media`.

Contract: `load(url, detail=..., param=...)` accepts a `data:image/...;base64,` URI or an http(s) URL and
returns a re-encoded PNG `ImageInput`, or raises `InvalidRequest` with `param` set to the JSON path of
the url (code `invalid_image_url` for URL / fetch problems, `invalid_image` for content problems,
`invalid_value` on `...image_url.detail` for a bad detail). Nothing else escapes for bad input.

Lifecycle: `await start()` in the app lifespan opens the one shared `httpx2.AsyncClient`, `await aclose()`
closes it. Decoding (base64 and Pillow) runs in worker threads, at most `DECODE_CONCURRENCY` at a time,
so hostile images cannot starve the event loop or multiply memory use; on the loop a data URI costs only
a bounded look at its header (`MAX_DATA_URI_HEADER`).
"""

from __future__ import annotations

import base64
import binascii
import logging
import math
import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import anyio
import anyio.to_thread
import httpx2
from PIL import Image

from tokentill.errors import InvalidRequest
from tokentill.media.fetch import FetchedImage, GuardedFetcher, Resolver, parse_allow_hosts
from tokentill.media.images import DETAILS, MIME_FORMATS, prepare_image
from tokentill.settings import Settings
from tokentill.types import ImageInput

__all__ = ["DECODE_CONCURRENCY", "MAX_DATA_URI_HEADER", "ImageRef", "MediaPolicy", "MediaService"]

logger = logging.getLogger(__name__)

DECODE_CONCURRENCY = 2
MAX_DATA_URI_HEADER = 256  # characters before the comma of a data URI; a longer header is refused

# data:<type>[;param=value]*;base64, — only base64 payloads; matched against the header alone.
_DATA_URI_HEADER = re.compile(r"data:(?P<mime>[a-z0-9.+-]+/[a-z0-9.+-]+)(?:;[^,;]*)*?;base64,", re.I)
_ASCII_WHITESPACE = b" \t\n\r\x0b\x0c"


@dataclass(frozen=True)
class MediaPolicy:
    """Limits for image intake; `from_settings` builds it for the app factory."""

    allow_hosts: frozenset[str] = frozenset()  # "host:port" an operator allows even if private
    max_bytes: int = 20 * 1024 * 1024  # per image, encoded file size
    max_pixels: int = 50_000_000  # width * height, checked from the header before decoding
    max_images: int = 8  # per request
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 10.0
    total_timeout_s: float = 30.0  # wall clock for one fetch, all redirects included
    max_redirects: int = 3
    low_detail_side: int = 512
    high_detail_side: int = 2048

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_pixels", "max_images", "low_detail_side", "high_detail_side"):
            if getattr(self, name) < 1:
                raise ValueError(f"MediaPolicy.{name} must be at least 1")
        for name in ("connect_timeout_s", "read_timeout_s", "total_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"MediaPolicy.{name} must be positive")
        if self.max_redirects < 0:
            raise ValueError("MediaPolicy.max_redirects must not be negative")
        parse_allow_hosts(self.allow_hosts)  # raises ValueError on a malformed entry

    @classmethod
    def from_settings(cls, settings: Settings) -> MediaPolicy:
        hosts = frozenset(h.strip().lower() for h in settings.media_allow_hosts.split(",") if h.strip())
        return cls(
            allow_hosts=hosts,
            max_bytes=settings.media_max_bytes,
            max_pixels=settings.media_max_pixels,
            max_images=settings.media_max_images,
            total_timeout_s=settings.media_timeout_s,
        )


@dataclass(frozen=True)
class ImageRef:
    """One image part of a request: its url, detail and the JSON path of the url."""

    url: str
    detail: str
    param: str


def _detail_param(param: str) -> str:
    return param[: -len(".url")] + ".detail" if param.endswith(".url") else param + ".detail"


class MediaService:
    """Loads image parts under one `MediaPolicy`. Safe to share between concurrent requests."""

    def __init__(
        self,
        policy: MediaPolicy,
        *,
        resolver: Resolver | None = None,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        """`resolver` and `verify` exist for tests (an injected DNS answer, a test CA); keep the defaults."""
        self.policy = policy
        self._resolver = resolver
        self._verify = verify
        self._client: httpx2.AsyncClient | None = None
        self._fetcher: GuardedFetcher | None = None
        self._limiter: anyio.CapacityLimiter | None = None

    async def start(self) -> None:
        """Open the shared HTTP client. Idempotent."""
        if self._client is not None:
            return
        # Pillow's own decompression-bomb guard is process-wide; make sure nobody disabled it and that it
        # is no looser than our limit (our header check runs too, this is the second line).
        current = Image.MAX_IMAGE_PIXELS
        if current is None or current > self.policy.max_pixels:
            Image.MAX_IMAGE_PIXELS = self.policy.max_pixels
        p = self.policy
        timeout = httpx2.Timeout(
            connect=p.connect_timeout_s,
            read=p.read_timeout_s,
            write=p.read_timeout_s,
            pool=p.connect_timeout_s,
        )
        self._client = httpx2.AsyncClient(
            timeout=timeout,
            # No keep-alive: a pooled connection is keyed by the pinned IP, so reusing it could carry a
            # request for another host name over a TLS session verified for the first one.
            limits=httpx2.Limits(max_connections=64, max_keepalive_connections=0),
            follow_redirects=False,  # redirects are followed by hand, each hop checked
            trust_env=False,  # an HTTP(S)_PROXY from the environment would re-resolve the host itself
            verify=self._verify,
        )
        self._fetcher = GuardedFetcher(p, self._client, resolver=self._resolver)
        self._limiter = anyio.CapacityLimiter(DECODE_CONCURRENCY)

    async def aclose(self) -> None:
        """Close the shared HTTP client. Idempotent."""
        client, self._client, self._fetcher = self._client, None, None
        if client is not None:
            await client.aclose()

    def check_count(self, count: int, *, param: str = "messages") -> None:
        """Refuse a request carrying more than `max_images` image parts."""
        if count > self.policy.max_images:
            raise InvalidRequest(
                f"Too many images: {count} given, at most {self.policy.max_images} per request.",
                code="invalid_value",
                param=param,
            )

    async def load_many(self, refs: Sequence[ImageRef]) -> list[ImageInput]:
        """Load every image part of one request, in order; the count is checked before any fetch."""
        if len(refs) > self.policy.max_images:
            self.check_count(len(refs), param=refs[self.policy.max_images].param)
        results: list[ImageInput | None] = [None] * len(refs)

        async def one(index: int, ref: ImageRef) -> None:
            results[index] = await self.load(ref.url, detail=ref.detail, param=ref.param)

        # The first InvalidRequest cancels the rest; anyio raises it wrapped in an ExceptionGroup.
        try:
            async with anyio.create_task_group() as group:
                for index, ref in enumerate(refs):
                    group.start_soon(one, index, ref)
        except ExceptionGroup as group_error:
            first = _first_api_error(group_error)
            if first is not None:
                raise first from None
            raise
        return [image for image in results if image is not None]

    async def load(self, url: str, *, detail: str, param: str) -> ImageInput:
        """One image part → validated, re-encoded `ImageInput`; see the module docstring."""
        if detail not in DETAILS:
            raise InvalidRequest(
                f"Invalid image detail {detail[:32]!r}; expected one of 'low', 'high', 'auto'.",
                code="invalid_value",
                param=_detail_param(param),
            )
        if self._limiter is None:
            raise RuntimeError("MediaService.start() was not awaited")
        p = self.policy
        source: bytes | _DataURI
        declared: str | None
        if url[:5].lower() == "data:":
            # Only the short header is parsed here; the payload is decoded in the worker thread below.
            source = self._data_uri(url, param)
            declared = source.mime
        else:
            fetched = await self._fetch(url, param)
            source, declared = fetched.data, fetched.content_type
        prepare = partial(
            prepare_image,
            declared_mime=declared,
            detail=detail,
            max_pixels=p.max_pixels,
            low_side=p.low_detail_side,
            high_side=p.high_detail_side,
            param=param,
        )

        def work() -> ImageInput:  # the heavy part, in a worker thread: base64, then Pillow
            return prepare(source.decode(param) if isinstance(source, _DataURI) else source)

        return await anyio.to_thread.run_sync(work, limiter=self._limiter)

    async def _fetch(self, url: str, param: str) -> FetchedImage:
        if self._fetcher is None:
            raise RuntimeError("MediaService.start() was not awaited")
        return await self._fetcher.fetch(url, param=param)

    def _data_uri(self, url: str, param: str) -> _DataURI:
        """Check a data URI's header and size without scanning or copying its payload (cheap, event loop)."""
        # A bounded search: the regex only ever sees the short header, never megabytes of hostile text.
        comma = url.find(",", 0, MAX_DATA_URI_HEADER + 1)
        match = _DATA_URI_HEADER.fullmatch(url, 0, comma + 1) if comma > 0 else None
        if match is None:
            raise InvalidRequest(
                "Image data URI must look like data:image/png;base64,<data>.",
                code="invalid_image_url",
                param=param,
            )
        mime = match["mime"].lower()
        if mime not in MIME_FORMATS:
            raise InvalidRequest(
                f"Image data URI type {mime[:64]} is not supported; use image/png, image/jpeg, "
                "image/webp or image/gif.",
                code="invalid_image",
                param=param,
            )
        # Whitespace can only make the payload longer than its base64, and base64 is 4/3 of the bytes;
        # anything over twice that is refused without being copied.
        if len(url) - (comma + 1) > 2 * _encoded_length(self.policy.max_bytes):
            raise _too_large(self.policy.max_bytes, param)
        return _DataURI(url, comma + 1, mime, self.policy.max_bytes)


@dataclass(frozen=True)
class _DataURI:
    """A data URI whose header passed `MediaService._data_uri`; the payload starts at `start`."""

    url: str
    start: int
    mime: str
    max_bytes: int

    def decode(self, param: str) -> bytes:
        """The payload's bytes (ASCII whitespace ignored); runs in a worker thread."""
        try:
            # ASCII only: anything else is not base64. One copy to bytes, one without whitespace.
            encoded = self.url[self.start :].encode("ascii").translate(None, _ASCII_WHITESPACE)
        except UnicodeEncodeError:
            raise _bad_base64(param) from None
        if len(encoded) > _encoded_length(self.max_bytes):
            raise _too_large(self.max_bytes, param)
        if not encoded:
            raise InvalidRequest("Image data URI is empty.", code="invalid_image", param=param)
        try:
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise _bad_base64(param) from None
        if len(data) > self.max_bytes:
            raise _too_large(self.max_bytes, param)
        if not data:
            raise InvalidRequest("Image data URI is empty.", code="invalid_image", param=param)
        return data


def _encoded_length(max_bytes: int) -> int:
    return 4 * math.ceil(max_bytes / 3)


def _too_large(max_bytes: int, param: str) -> InvalidRequest:
    message = f"Image is larger than the {max_bytes} byte limit."
    return InvalidRequest(message, code="invalid_image", param=param)


def _bad_base64(param: str) -> InvalidRequest:
    return InvalidRequest("Image data URI is not valid base64.", code="invalid_image_url", param=param)


def _first_api_error(group: BaseExceptionGroup[BaseException]) -> InvalidRequest | None:
    for exc in group.exceptions:
        if isinstance(exc, InvalidRequest):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            found = _first_api_error(exc)
            if found is not None:
                return found
    return None
