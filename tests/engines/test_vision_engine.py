"""Vision in the embedded llama.cpp engine: SmolLM2-135M + the committed tiny random projector, real libmtmd.

The projector's weights are random, so the text it leads to is noise: the tests assert on usage, status
and the scheduler's health, and on text only where no image is involved.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from tests._services import require
from tests.engines._helpers import collect_text
from tokentill.catalog import ModelSpec
from tokentill.engines import create_engine
from tokentill.engines.base import EngineRequest
from tokentill.engines.llamacpp import LlamaCppEngine
from tokentill.errors import InvalidRequest, UpstreamError
from tokentill.media import MediaPolicy
from tokentill.media.images import prepare_image
from tokentill.types import Finished, ImageInput, Message

pytestmark = pytest.mark.llama

MMPROJ = Path(__file__).resolve().parents[1] / "fixtures" / "tiny-mmproj.gguf"
CONTEXT = 1024


def _require_llama() -> None:
    try:
        import llama_cpp.mtmd_cpp  # noqa: F401
    except (ImportError, OSError) as exc:  # pragma: no cover - depends on the machine
        require("llama.cpp", f"llama-cpp-python (with libmtmd) is not importable: {exc}")


def _start(spec: ModelSpec) -> LlamaCppEngine:
    engine = create_engine(spec, queue_size=4, n_threads=None)
    assert isinstance(engine, LlamaCppEngine)
    asyncio.run(engine.start())
    return engine


@pytest.fixture(scope="module")
def engine() -> Iterator[LlamaCppEngine]:
    _require_llama()
    engine = _start(ModelSpec(id="vision", context=CONTEXT, n_threads=1, mmproj=MMPROJ))
    yield engine
    asyncio.run(engine.aclose())


def image(
    size: tuple[int, int] = (64, 48), detail: str = "auto", color: tuple[int, int, int] = (200, 30, 30)
) -> ImageInput:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return ImageInput(data=out.getvalue(), mime="image/png", width=size[0], height=size[1], detail=detail)


def _request(text: str, *images: ImageInput, request_id: str = "req", max_tokens: int = 6) -> EngineRequest:
    return EngineRequest(
        request_id=request_id,
        messages=(Message("system", "You describe images."), Message("user", text, images=images)),
        max_tokens=max_tokens,
        deadline=time.monotonic() + 120,
        temperature=0.0,
    )


def _run(engine: LlamaCppEngine, request: EngineRequest) -> tuple[str, Finished]:
    return asyncio.run(collect_text(engine, request))


def test_image_request_counts_image_tokens_exactly(engine: LlamaCppEngine) -> None:
    assert engine.capabilities.vision
    request = _request("What is in this picture?", image())
    counted = engine.count_prompt_tokens(request)
    _, finished = _run(engine, request)
    usage = finished.usage
    assert usage.image_tokens == 16  # one 256x256 slice of 64-px patches: no slicing for a small image
    assert usage.prompt_tokens == counted
    assert usage.prompt_tokens > usage.image_tokens
    assert 0 <= usage.completion_tokens <= 6


def test_two_images_count_twice(engine: LlamaCppEngine) -> None:
    one = _run(engine, _request("Compare.", image()))[1].usage
    two = _run(engine, _request("Compare.", image(), image(color=(0, 0, 255))))[1].usage
    assert two.image_tokens == 2 * one.image_tokens
    assert two.prompt_tokens - one.prompt_tokens >= one.image_tokens


def _prepared(size: tuple[int, int], detail: str) -> ImageInput:
    """An image sized for `detail` by the media layer, the one place detail sizes are applied."""
    out = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(out, format="PNG")
    policy = MediaPolicy()
    return prepare_image(
        out.getvalue(),
        declared_mime="image/png",
        detail=detail,
        max_pixels=policy.max_pixels,
        low_side=policy.low_detail_side,
        high_side=policy.high_detail_side,
        param="p",
    )


def test_detail_changes_the_token_count(engine: LlamaCppEngine) -> None:
    # The media layer fits `low` into 512 px and `high` into 2048: the engine encodes what it is given.
    low = _request("Describe.", _prepared((1024, 1024), "low"))
    high = _request("Describe.", _prepared((1024, 1024), "high"))
    n_low, n_high = engine.count_prompt_tokens(low), engine.count_prompt_tokens(high)
    assert n_high > n_low
    _, finished = _run(engine, high)
    assert finished.usage.prompt_tokens == n_high
    assert finished.usage.image_tokens == 160  # overview + a 3x3 grid of 16-token slices
    _, finished = _run(engine, low)
    assert finished.usage.image_tokens == 80  # overview + 2x2


def test_kv_prefix_reuse_stops_before_the_image(engine: LlamaCppEngine) -> None:
    request = _request("Again?", image())
    _, first = _run(engine, request)
    _, second = _run(engine, _request("Again?", image(color=(1, 2, 3))))
    text_before_image = second.usage.prompt_tokens - second.usage.image_tokens
    # Same text, other image: only the text before the image may be reused, never the image positions.
    assert 0 < second.usage.cached_tokens < text_before_image
    _, third = _run(engine, request)
    assert third.usage.cached_tokens == second.usage.cached_tokens


def test_a_failing_image_is_a_502_and_the_engine_carries_on(engine: LlamaCppEngine) -> None:
    broken = ImageInput(data=b"not a png at all", mime="image/png", width=8, height=8)
    with pytest.raises(UpstreamError):
        engine.count_prompt_tokens(_request("Look.", broken))
    with pytest.raises(UpstreamError):
        _run(engine, _request("Look.", broken))
    _, finished = _run(engine, _request("Look.", image()))
    assert finished.usage.image_tokens == 16


def test_text_after_images_is_unchanged(engine: LlamaCppEngine) -> None:
    text_request = EngineRequest(
        request_id="text",
        messages=(Message("user", "What is the capital of France?"),),
        max_tokens=8,
        deadline=time.monotonic() + 120,
        temperature=0.0,
    )
    before, finished_before = _run(engine, text_request)
    _run(engine, _request("And this?", image((300, 200))))
    after, finished_after = _run(engine, text_request)
    assert after == before
    assert finished_after.usage.image_tokens == 0
    assert finished_after.usage.prompt_tokens == finished_before.usage.prompt_tokens


def test_a_marker_in_client_text_adds_no_image_slot(engine: LlamaCppEngine) -> None:
    from tokentill.engines.vision import VisionEncoder

    vision = engine._vision  # the marker is random per process; a client cannot know it
    assert isinstance(vision, VisionEncoder)
    sneaky = _request(f"{vision.marker} {vision.marker} <__media__>", image())
    _, finished = _run(engine, sneaky)
    assert finished.usage.image_tokens == 16


def test_images_without_a_projector_are_refused() -> None:
    _require_llama()
    engine = _start(ModelSpec(id="text-only", context=512, n_threads=1))
    try:
        assert not engine.capabilities.vision
        with pytest.raises(InvalidRequest) as caught:
            engine.count_prompt_tokens(_request("Look.", image()))
        assert caught.value.code == "image_input_unsupported"
    finally:
        asyncio.run(engine.aclose())


def test_the_scratchpad_answer_continues_after_the_image(engine: LlamaCppEngine) -> None:
    """With an image, the answer pass continues the notes' sequence: the image is not encoded again."""
    from dataclasses import replace

    from tokentill.engines.reasoning import Scratchpad

    scratchpad = Scratchpad(engine)
    # low effort: at most 64 notes tokens, so the answer pass always starts
    request = replace(
        _request("Describe this picture.", image(), request_id="pad", max_tokens=96), reasoning_effort="low"
    )

    async def collect() -> tuple[int, int, Finished]:
        hidden = shown = 0
        async for event in scratchpad.generate(request):
            if isinstance(event, Finished):
                return hidden, shown, event
            hidden += event.tokens if getattr(event, "reasoning", False) else 0
            shown += 0 if getattr(event, "reasoning", False) else event.tokens
        raise AssertionError("no Finished event")

    hidden, shown, finished = asyncio.run(collect())
    usage = finished.usage
    assert usage.image_tokens == 16 and usage.prompt_tokens == scratchpad.count_prompt_tokens(request)
    assert usage.reasoning_tokens == hidden and usage.completion_tokens == hidden + shown
    evaluated = engine.prompt_tokens_evaluated("pad")
    assert evaluated is not None
    assert evaluated - (usage.prompt_tokens - usage.cached_tokens) <= 40  # the answer's own prompt only
