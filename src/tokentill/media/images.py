"""Decode, validate and re-encode one untrusted image (CPU work: call it from a worker thread).

Contract of `prepare_image(data, ...)`: returns an `ImageInput` holding a freshly encoded RGB PNG of the
image, scaled down for the requested detail, or raises `InvalidRequest(code="invalid_image")` saying why.
Engines never see the client's original bytes, so a payload aimed at a decoder further down the line
(a malformed chunk, a polyglot file, metadata) does not survive.

Order of checks, each before the more expensive next one:

1. Magic bytes decide the format (PNG, JPEG, WEBP, GIF); a declared type that disagrees is refused.
2. `Image.open` reads only the header: zero sizes and `width * height > max_pixels` are refused before any
   pixel is decoded (a 100 kB PNG can claim 100000 x 100000 pixels).
3. Animated GIF / WebP / APNG are refused (one frame per image part, like the hosted API).
4. `verify()` checks the structure (PNG CRCs), then a fresh `open` + `load()` decodes every pixel, so a
   truncated or corrupt file fails here rather than in the engine.
5. EXIF orientation is applied, transparency is flattened onto white, the image is scaled to fit
   `low_side` (detail `low`) or `high_side` (`high`, `auto`) and encoded as PNG.
"""

from __future__ import annotations

import io
import logging
from typing import Final

from PIL import Image, ImageOps

from tokentill.errors import InvalidRequest
from tokentill.types import ImageInput

__all__ = ["DETAILS", "MIME_FORMATS", "OPAQUE_TYPES", "prepare_image", "sniff_format"]

logger = logging.getLogger(__name__)

DETAILS: Final = frozenset({"low", "high", "auto"})

# Declared media types we accept, and the Pillow format each must be.
MIME_FORMATS: Final[dict[str, str]] = {
    "image/png": "PNG",
    "image/jpeg": "JPEG",
    "image/jpg": "JPEG",
    "image/pjpeg": "JPEG",
    "image/webp": "WEBP",
    "image/gif": "GIF",
}
# Declared types that say nothing about the content: the sniffed format decides.
OPAQUE_TYPES: Final = frozenset({"application/octet-stream", "binary/octet-stream"})

_WHITE = (255, 255, 255)


def sniff_format(data: bytes) -> str | None:
    """The Pillow format name for the file's magic bytes, or None if it is none of the four we accept."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _invalid(message: str, param: str) -> InvalidRequest:
    return InvalidRequest(message, code="invalid_image", param=param)


def _check_declared(declared: str | None, sniffed: str, param: str) -> None:
    if declared is None or declared in OPAQUE_TYPES:
        return
    expected = MIME_FORMATS.get(declared)
    if expected is None:
        shown = declared[:64]
        raise _invalid(f"Image type {shown} is not supported; use PNG, JPEG, WEBP or GIF.", param)
    if expected != sniffed:
        raise _invalid(f"Image is declared as {declared} but its content is {sniffed}.", param)


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB pixels; transparency is composited onto white, 16-bit greyscale is scaled rather than clipped."""
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        flat = Image.new("RGB", rgba.size, _WHITE)
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    if img.mode.startswith("I;16") or img.mode == "I":
        img = img.convert("I").point(lambda value: value * (1 / 256)).convert("L")
    return img.convert("RGB")


def prepare_image(
    data: bytes,
    *,
    declared_mime: str | None,
    detail: str,
    max_pixels: int,
    low_side: int,
    high_side: int,
    param: str,
) -> ImageInput:
    """Validate `data` and return it re-encoded; see the module docstring for the checks and their order.

    `declared_mime` is the data URI's type or the HTTP Content-Type (lowercased, no parameters), or None.
    Runs Pillow decoders on hostile input: call it off the event loop and bound how many run at once.
    """
    sniffed = sniff_format(data)
    if sniffed is None:
        raise _invalid("Image content is not a PNG, JPEG, WEBP or GIF file.", param)
    _check_declared(declared_mime, sniffed, param)
    side = low_side if detail == "low" else high_side
    try:
        return _decode(data, sniffed, detail=detail, side=side, max_pixels=max_pixels, param=param)
    except InvalidRequest:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        # Pillow's own guard (Image.MAX_IMAGE_PIXELS) fired inside Image.open, before our header check
        # could run. The warning arrives as an exception only where warnings are errors (pytest);
        # elsewhere it is logged by `warnings` and our explicit check below refuses the image anyway.
        raise _invalid(f"Image has more than the {max_pixels} pixel limit.", param) from None
    except Exception as exc:
        # Pillow signals corrupt input with many types (OSError, SyntaxError, ValueError, EOFError,
        # struct.error, IndexError, ...); for hostile bytes each of them means "bad image", not a bug.
        logger.info("image rejected by the decoder (%s): %r", sniffed, exc)
        raise _invalid(
            f"Image could not be decoded as {sniffed}: the file is corrupt or truncated.", param
        ) from None


def _decode(data: bytes, fmt: str, *, detail: str, side: int, max_pixels: int, param: str) -> ImageInput:
    # `formats=[fmt]` keeps Pillow from trying every other decoder it has on the bytes.
    with Image.open(io.BytesIO(data), formats=[fmt]) as probe:
        width, height = probe.size
        if width <= 0 or height <= 0:
            raise _invalid(f"Image has an empty size ({width}x{height}).", param)
        if width * height > max_pixels:
            raise _invalid(
                f"Image is {width}x{height} pixels, more than the {max_pixels} pixel limit.", param
            )
        if getattr(probe, "is_animated", False) or getattr(probe, "n_frames", 1) > 1:
            raise _invalid("Animated images are not supported; send a single frame.", param)
        probe.verify()
    with Image.open(io.BytesIO(data), formats=[fmt]) as img:
        img.load()
        upright = ImageOps.exif_transpose(img)
    rgb = _to_rgb(upright)
    rgb.thumbnail((side, side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    # compress_level=1: the bytes only travel in-process or to a local engine; speed beats size here.
    rgb.save(out, format="PNG", compress_level=1)
    return ImageInput(
        data=out.getvalue(), mime="image/png", width=rgb.width, height=rgb.height, detail=detail
    )
