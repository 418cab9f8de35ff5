"""Image validation and re-encoding, driven through MediaService with data URIs (no network)."""

from __future__ import annotations

import asyncio
import io
import random
import threading
import time

import pytest
from PIL import Image

from tests.media.helpers import PARAM, data_uri, encode, png_bytes, png_with_header
from tokentill.errors import InvalidRequest
from tokentill.media import ImageRef, MediaPolicy, MediaService
from tokentill.media.images import prepare_image
from tokentill.media.service import MAX_DATA_URI_HEADER, _DataURI
from tokentill.types import ImageInput


async def _load(url: str, detail: str = "auto", policy: MediaPolicy | None = None) -> ImageInput:
    service = MediaService(policy or MediaPolicy())
    await service.start()
    try:
        return await service.load(url, detail=detail, param=PARAM)
    finally:
        await service.aclose()


def load(url: str, detail: str = "auto", policy: MediaPolicy | None = None) -> ImageInput:
    return asyncio.run(_load(url, detail, policy))


def refused(url: str, code: str, detail: str = "auto", policy: MediaPolicy | None = None) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        load(url, detail, policy)
    assert info.value.code == code, info.value.message
    assert info.value.status == 400
    return info.value


def _frames(color_a: tuple[int, int, int], color_b: tuple[int, int, int]) -> list[Image.Image]:
    return [Image.new("RGB", (32, 32), color_a), Image.new("RGB", (32, 32), color_b)]


def _reopen(image: ImageInput) -> Image.Image:
    img = Image.open(io.BytesIO(image.data))
    img.load()
    return img


@pytest.mark.parametrize(
    ("fmt", "mime"),
    [
        ("PNG", "image/png"),
        ("JPEG", "image/jpeg"),
        ("JPEG", "image/jpg"),
        ("WEBP", "image/webp"),
        ("GIF", "image/gif"),
    ],
)
def test_each_supported_format_is_reencoded_as_png(fmt: str, mime: str) -> None:
    original = encode(Image.new("RGB", (40, 30), (10, 120, 240)), fmt)
    image = load(data_uri(original, mime))
    assert image.mime == "image/png"
    assert (image.width, image.height) == (40, 30)
    assert image.data.startswith(b"\x89PNG\r\n\x1a\n")
    assert image.data != original
    decoded = _reopen(image)
    assert decoded.mode == "RGB"
    assert decoded.size == (40, 30)


@pytest.mark.parametrize(
    ("size", "detail", "expected"),
    [
        ((1024, 768), "low", (512, 384)),
        ((300, 200), "low", (300, 200)),  # never upscaled
        ((3000, 1000), "high", (2048, 683)),
        ((3000, 1000), "auto", (2048, 683)),
        ((1000, 3000), "high", (683, 2048)),
        ((800, 600), "high", (800, 600)),
    ],
)
def test_detail_scales_to_fit(size: tuple[int, int], detail: str, expected: tuple[int, int]) -> None:
    image = load(data_uri(encode(Image.new("RGB", size, (1, 2, 3)), "JPEG"), "image/jpeg"), detail)
    assert (image.width, image.height) == expected
    assert _reopen(image).size == expected
    assert image.detail == detail


def test_invalid_detail_points_at_the_detail_param() -> None:
    error = refused(data_uri(png_bytes()), "invalid_value", detail="ultra")
    assert error.param == "messages[0].content[1].image_url.detail"


def test_transparency_is_flattened_onto_white() -> None:
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    image = load(data_uri(encode(rgba, "PNG")))
    assert _reopen(image).getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_greyscale_is_scaled_not_clipped() -> None:
    grey = Image.new("I;16", (8, 8), 32768)
    pixel = _reopen(load(data_uri(encode(grey, "PNG")))).getpixel((0, 0))
    assert pixel == (128, 128, 128)


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise when displayed
    jpeg = encode(Image.new("RGB", (40, 20), (0, 0, 0)), "JPEG", exif=exif.tobytes())
    image = load(data_uri(jpeg, "image/jpeg"))
    assert (image.width, image.height) == (20, 40)


def test_base64_with_whitespace_is_accepted() -> None:
    uri = data_uri(png_bytes())
    head, payload = uri.split(",", 1)
    wrapped = "\n".join(payload[i : i + 60] for i in range(0, len(payload), 60))
    assert load(f"{head},{wrapped}  ").width == 64


def test_heavily_whitespaced_base64_is_accepted() -> None:
    """Every ASCII whitespace between every character, plus megabytes of trailing blanks, still decodes."""
    head, payload = data_uri(png_bytes()).split(",", 1)
    blanks = " \t\r\n\x0b\x0c"
    spread = "".join(char + blanks[index % len(blanks)] for index, char in enumerate(payload))
    assert load(f"{head}, {spread}" + " \n" * 4_000_000).width == 64


def test_non_ascii_whitespace_is_not_base64() -> None:
    head, payload = data_uri(png_bytes()).split(",", 1)
    error = refused(f"{head},{payload[:40]}\u00a0{payload[40:]}", "invalid_image_url")
    assert "base64" in error.message


def test_data_uri_payload_is_decoded_in_a_worker_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[int] = []
    original = _DataURI.decode

    def recording(self: _DataURI, param: str) -> bytes:
        threads.append(threading.get_ident())
        return original(self, param)

    monkeypatch.setattr(_DataURI, "decode", recording)
    assert load(data_uri(png_bytes())).width == 64
    assert threads and threads[0] != threading.get_ident()


def test_data_uri_scheme_and_type_are_case_insensitive() -> None:
    uri = data_uri(png_bytes()).replace("data:image/png", "DATA:IMAGE/PNG")
    assert load(uri).width == 64


# --- refusals: content (invalid_image) ------------------------------------------------------------------


def test_decompression_bomb_header_is_refused_before_decoding() -> None:
    bomb = png_with_header(100_000, 100_000)
    assert len(bomb) < 200
    error = refused(data_uri(bomb), "invalid_image")
    assert "pixel limit" in error.message
    assert error.param == PARAM


def test_pixel_limit_from_policy() -> None:
    error = refused(data_uri(png_bytes((200, 100))), "invalid_image", policy=MediaPolicy(max_pixels=10_000))
    # Pillow's own guard (tightened to max_pixels by start()) or our header check: either refuses.
    assert "10000 pixel limit" in error.message


def test_bomb_header_is_refused_by_prepare_image_directly(monkeypatch: pytest.MonkeyPatch) -> None:
    # Our header check alone must refuse it: Pillow's own guard is switched off here (another test's
    # MediaService.start() may have tightened that process-wide setting before this one runs).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with pytest.raises(InvalidRequest, match="9000x9000 pixels, more than the 50000000 pixel limit"):
        prepare_image(
            png_with_header(9000, 9000),
            declared_mime="image/png",
            detail="auto",
            max_pixels=50_000_000,
            low_side=512,
            high_side=2048,
            param=PARAM,
        )


def test_zero_width_is_refused() -> None:
    refused(data_uri(png_with_header(0, 10)), "invalid_image")


def test_animated_gif_is_refused() -> None:
    first, second = _frames((255, 0, 0), (0, 0, 255))
    gif = encode(first, "GIF", save_all=True, append_images=[second], duration=100, loop=0)
    error = refused(data_uri(gif, "image/gif"), "invalid_image")
    assert "Animated" in error.message


def test_animated_webp_is_refused() -> None:
    first, second = _frames((255, 0, 0), (0, 0, 255))
    webp = encode(first, "WEBP", save_all=True, append_images=[second], duration=100)
    refused(data_uri(webp, "image/webp"), "invalid_image")


def test_apng_is_refused() -> None:
    first, second = _frames((255, 0, 0), (0, 0, 255))
    apng = encode(first, "PNG", save_all=True, append_images=[second], duration=100)
    refused(data_uri(apng), "invalid_image")


def test_truncated_png_is_refused() -> None:
    noisy = Image.frombytes("RGB", (64, 64), random.Random(1).randbytes(64 * 64 * 3))
    data = encode(noisy, "PNG")
    refused(data_uri(data[: len(data) // 2]), "invalid_image")


def test_truncated_jpeg_is_refused() -> None:
    noisy = Image.frombytes("RGB", (64, 64), random.Random(2).randbytes(64 * 64 * 3))
    data = encode(noisy, "JPEG")
    refused(data_uri(data[: len(data) // 2], "image/jpeg"), "invalid_image")


def test_png_with_a_bad_crc_is_refused() -> None:
    data = bytearray(png_bytes())
    data[30] ^= 0xFF  # inside IHDR: its CRC no longer matches
    refused(data_uri(bytes(data)), "invalid_image")


def test_random_bytes_are_refused() -> None:
    error = refused(data_uri(random.Random(3).randbytes(4096)), "invalid_image")
    assert "not a PNG, JPEG, WEBP or GIF" in error.message


def test_declared_type_must_match_the_content() -> None:
    jpeg = encode(Image.new("RGB", (8, 8)), "JPEG")
    error = refused(data_uri(jpeg, "image/png"), "invalid_image")
    assert "image/png" in error.message and "JPEG" in error.message


@pytest.mark.parametrize("mime", ["image/svg+xml", "image/bmp", "text/plain", "application/octet-stream"])
def test_unsupported_declared_types_are_refused(mime: str) -> None:
    refused(data_uri(png_bytes(), mime), "invalid_image")


def test_bmp_content_is_refused_even_if_declared_png() -> None:
    refused(data_uri(encode(Image.new("RGB", (8, 8)), "BMP")), "invalid_image")


def test_empty_data_is_refused() -> None:
    refused("data:image/png;base64,", "invalid_image")
    refused("data:image/png;base64,   \n", "invalid_image")


def test_oversize_data_uri_is_refused_before_decoding() -> None:
    policy = MediaPolicy(max_bytes=1000)
    error = refused(data_uri(b"\x89PNG" + b"\0" * 2000), "invalid_image", policy=policy)
    assert "1000 byte limit" in error.message
    # Just over the limit after decoding (encoded length still within 4*ceil(n/3)).
    refused(data_uri(b"\x89PNG" + b"\0" * 997), "invalid_image", policy=policy)


# --- refusals: the URI itself (invalid_image_url) -------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "data:image/png;base64,!!!not-base64!!!",
        "data:image/png;base64,iVBORw0KGgo=garbage",
        "data:image/png;base64,iVBORw0KGgo",  # bad padding
        "data:image/png;base64,iVBORw0KGgo-_==",  # urlsafe alphabet
        "data:image/png;base64,iVBORw0KGgoé===",
    ],
)
def test_bad_base64_is_refused(url: str) -> None:
    refused(url, "invalid_image_url")


@pytest.mark.parametrize("url", ["data:image/png,rawbytes", "data:,hello", "data:image/png;base64", "data:"])
def test_malformed_data_uris_are_refused(url: str) -> None:
    refused(url, "invalid_image_url")


@pytest.mark.parametrize(
    "url",
    [
        "data:image/png" + ";a" * 10_000_000,  # 20 MB of parameters and no comma
        "data:image/png" + ";a" * 10_000_000 + ";base64,iVBORw0KGgo=",  # the comma 20 MB in
        "data:" + "a" * 300 + "/png;base64,iVBORw0KGgo=",
    ],
    ids=["no-comma", "far-comma", "long-type"],
)
def test_a_huge_data_uri_header_is_refused_without_scanning_it(url: str) -> None:
    """The header is capped at MAX_DATA_URI_HEADER characters; nothing past the cap is read by the regex.

    Before the cap a 20 MB header took seconds of regex time on the event loop; the bound here is loose.
    """
    started = time.perf_counter()
    error = refused(url, "invalid_image_url")
    assert time.perf_counter() - started < 1.0
    assert "data:image/png;base64," in error.message


def test_a_header_at_the_cap_is_accepted() -> None:
    head, payload = data_uri(png_bytes()).split(",", 1)
    padded = head.replace(";base64", ";p=" + "x" * (MAX_DATA_URI_HEADER - len(head) - 3) + ";base64")
    assert len(padded) == MAX_DATA_URI_HEADER  # the header before the comma, at the cap
    assert load(f"{padded},{payload}").width == 64
    refused(f"{padded.replace(';p=', ';pp=')},{payload}", "invalid_image_url")


# --- robustness ----------------------------------------------------------------------------------------


def test_mutated_images_only_ever_raise_invalid_request() -> None:
    """Bit-flipped and cut files of every format: success or InvalidRequest, never another exception."""
    rng = random.Random(1234)
    noisy = Image.frombytes("RGB", (48, 48), rng.randbytes(48 * 48 * 3))
    samples: list[tuple[bytes, str]] = []
    for fmt, mime in (
        ("PNG", "image/png"),
        ("JPEG", "image/jpeg"),
        ("WEBP", "image/webp"),
        ("GIF", "image/gif"),
    ):
        original = encode(noisy, fmt)
        for _ in range(40):
            mutated = bytearray(original)
            for _ in range(rng.randint(1, 8)):
                mutated[rng.randrange(8, len(mutated))] = rng.randrange(256)
            samples.append((bytes(mutated), mime))
            samples.append((original[: rng.randrange(8, len(original))], mime))

    async def run_all() -> int:
        service = MediaService(MediaPolicy())
        await service.start()
        refusals = 0
        try:
            for sample, mime in samples:
                try:
                    await service.load(data_uri(sample, mime), detail="low", param=PARAM)
                except InvalidRequest as error:
                    assert error.code == "invalid_image", error.message
                    assert error.param == PARAM
                    refusals += 1
        finally:
            await service.aclose()
        return refusals

    assert asyncio.run(run_all()) > len(samples) // 2


# --- per-request count ----------------------------------------------------------------------------------


def test_too_many_images_are_refused_before_loading() -> None:
    refs = [
        ImageRef(data_uri(png_bytes()), "low", f"messages[0].content[{i}].image_url.url") for i in range(3)
    ]

    async def go() -> list[ImageInput]:
        service = MediaService(MediaPolicy(max_images=2))
        await service.start()
        try:
            return await service.load_many(refs)
        finally:
            await service.aclose()

    with pytest.raises(InvalidRequest) as info:
        asyncio.run(go())
    assert info.value.code == "invalid_value"
    assert info.value.param == "messages[0].content[2].image_url.url"


def test_load_many_keeps_order_and_reports_the_failing_part() -> None:
    good = [
        ImageRef(data_uri(png_bytes((10 + i, 10))), "low", f"m[0].content[{i}].image_url.url")
        for i in range(3)
    ]

    async def go(refs: list[ImageRef]) -> list[ImageInput]:
        service = MediaService(MediaPolicy())
        await service.start()
        try:
            return await service.load_many(refs)
        finally:
            await service.aclose()

    images = asyncio.run(go(good))
    assert [image.width for image in images] == [10, 11, 12]
    broken = [*good[:2], ImageRef("data:image/png;base64,AAAA", "low", "m[0].content[2].image_url.url")]
    with pytest.raises(InvalidRequest) as info:
        asyncio.run(go(broken))
    assert info.value.param == "m[0].content[2].image_url.url"
