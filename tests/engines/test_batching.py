"""Continuous batching in the llama.cpp engine, against the packaged SmolLM2-135M weights.

Greedy outputs are compared exactly: the runner is batch-invariant by construction (see `batch.py`;
`test_batch_invariance.py` compares the logits bit for bit), so the argmax, and the text, do not change.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from tests._services import require
from tests.engines._helpers import collect_text, new_llama_engine
from tokentill.catalog import ModelSpec
from tokentill.engines import create_engine
from tokentill.engines.base import EngineRequest
from tokentill.engines.llamacpp import LlamaCppEngine
from tokentill.errors import DeadlineExceeded, Overloaded
from tokentill.types import Finished, Message, TextDelta

pytestmark = pytest.mark.llama

LONG = "Count from 1 to 200, separated by commas."  # SmolLM2 keeps going until max_tokens
TOPICS = [
    "the sea", "a cat", "the moon", "bread", "a train", "winter", "a violin", "the desert",
    "coffee", "a lighthouse", "bees", "a volcano", "chess", "rain", "a library", "the forest",
]  # fmt: skip
SYSTEM = (
    "You are a careful assistant for a bakery. The bakery opens at 7, closes at 19, sells bread, "
    "croissants and cakes, and takes orders by phone. Answer briefly and politely. " * 3
)


@pytest.fixture(scope="module")
def engine() -> Iterator[LlamaCppEngine]:
    engine = new_llama_engine(parallel=8)
    yield engine
    asyncio.run(engine.aclose())


def _request(text: str, request_id: str, *, system: str | None = None, **kwargs: object) -> EngineRequest:
    messages = ((Message("system", system),) if system else ()) + (Message("user", text),)
    fields: dict[str, object] = {
        "request_id": request_id,
        "messages": messages,
        "max_tokens": 24,
        "deadline": time.monotonic() + 120,
        "temperature": 0.0,
    }
    fields.update(kwargs)
    return EngineRequest(**fields)  # type: ignore[arg-type]


def _alone(engine: LlamaCppEngine, requests: list[EngineRequest]) -> list[str]:
    async def one_by_one() -> list[str]:
        return [(await collect_text(engine, r))[0] for r in requests]

    return asyncio.run(one_by_one())


def _together(engine: LlamaCppEngine, requests: list[EngineRequest]) -> list[tuple[str, Finished]]:
    async def gathered() -> list[tuple[str, Finished]]:
        return list(await asyncio.gather(*(collect_text(engine, r) for r in requests)))

    return asyncio.run(gathered())


def test_capabilities_report_the_context_per_sequence(engine: LlamaCppEngine) -> None:
    assert engine.capabilities.context_length == 1024


def test_sixteen_concurrent_generations_each_get_their_own_text(engine: LlamaCppEngine) -> None:
    requests = [_request(f"Write one sentence about {t}.", f"r{i}") for i, t in enumerate(TOPICS)]
    expected = _alone(engine, requests)
    results = _together(engine, requests)  # 16 requests, 8 slots: half of them queue, then join
    assert len(results) == 16
    for (text, finished), alone, request in zip(results, expected, requests, strict=True):
        assert finished.usage.completion_tokens > 0
        assert text == alone, request.request_id  # uninterleaved: exactly what it says alone
    assert len(set(expected)) > 8  # and the prompts really gave different texts


def test_greedy_alone_equals_greedy_in_a_batch_of_eight(engine: LlamaCppEngine) -> None:
    requests = [
        _request(f"Tell me a fact about {t}.", f"g{i}", max_tokens=40) for i, t in enumerate(TOPICS[:8])
    ]
    expected = _alone(engine, requests)
    assert [text for text, _ in _together(engine, requests)] == expected


def test_repeated_prefix_reports_cached_tokens(engine: LlamaCppEngine) -> None:
    first, second = (
        _request(question, f"c{i}", system=SYSTEM, max_tokens=8)
        for i, question in enumerate(["When do you open?", "Do you sell cakes?"])
    )

    async def scenario() -> tuple[Finished, Finished]:
        _, one = await collect_text(engine, first)
        _, two = await collect_text(engine, second)
        return one, two

    one, two = asyncio.run(scenario())
    system_tokens = engine.count_prompt_tokens(_request("", "probe", system=SYSTEM))
    assert two.usage.cached_tokens >= system_tokens - 8  # the whole system prompt, give or take a tail
    assert two.usage.cached_tokens < two.usage.prompt_tokens
    assert one.usage.prompt_tokens == engine.count_prompt_tokens(first)


def test_concurrent_requests_with_a_shared_system_prompt(engine: LlamaCppEngine) -> None:
    def batch(suffix: str) -> list[EngineRequest]:
        return [
            _request(f"Do you sell {t}?", f"s{i}{suffix}", system=SYSTEM, max_tokens=8)
            for i, t in enumerate(TOPICS[:8])
        ]

    _together(engine, batch("a"))  # every slot now caches the system prompt
    results = _together(engine, batch("b"))
    assert all(finished.usage.cached_tokens > 100 for _, finished in results)


def test_a_cancelled_stream_frees_its_slot_for_a_queued_one() -> None:
    engine = new_llama_engine(parallel=2, queue_size=4)
    try:

        async def scenario() -> None:
            first = engine.generate(_request(LONG, "first", max_tokens=400))
            second = engine.generate(_request(LONG, "second", max_tokens=400))
            assert isinstance(await anext(first), TextDelta)
            assert isinstance(await anext(second), TextDelta)
            queued = engine.generate(_request("Say hello.", "queued", max_tokens=8))
            waiter = asyncio.create_task(anext(queued))
            await asyncio.sleep(0.3)
            assert not waiter.done()  # both slots are busy
            await first.aclose()  # the client went away
            event = await asyncio.wait_for(waiter, timeout=10)
            assert isinstance(event, TextDelta | Finished)
            assert isinstance(await anext(second), TextDelta)  # the other stream kept going
            await second.aclose()
            await queued.aclose()

        asyncio.run(scenario())
        decoded = engine.tokens_decoded("first")
        assert decoded is not None and decoded < 200, decoded
    finally:
        asyncio.run(engine.aclose())


def test_queue_full_and_deadline_with_parallel_slots() -> None:
    engine = new_llama_engine(parallel=2, queue_size=1)
    try:

        async def scenario() -> None:
            busy = [engine.generate(_request(LONG, f"busy{i}", max_tokens=400)) for i in range(2)]
            for stream in busy:
                assert isinstance(await anext(stream), TextDelta)
            waiting = engine.generate(_request("Say hello.", "waiting", deadline=time.monotonic() + 2))
            waiting_task = asyncio.create_task(anext(waiting))
            # Queued (both slots are busy), which takes the request's own admission steps, not one turn of
            # the loop: wait for that state, whatever the machine's speed.
            async with asyncio.timeout(30):
                while engine.health().queued < 1:
                    await asyncio.sleep(0.001)
            with pytest.raises(Overloaded):
                await anext(engine.generate(_request("Say hello.", "rejected")))
            with pytest.raises(DeadlineExceeded):
                await waiting_task
            running = engine.generate(
                _request(LONG, "deadline", max_tokens=400, deadline=time.monotonic() + 0.5)
            )
            for stream in busy:
                await stream.aclose()
            with pytest.raises(DeadlineExceeded):  # admitted, then out of time while generating
                async for _ in running:
                    pass
            _, finished = await collect_text(engine, _request("Say hello.", "later"))
            assert finished.usage.completion_tokens > 0

        asyncio.run(scenario())
    finally:
        asyncio.run(engine.aclose())


def test_images_and_text_share_the_batch() -> None:
    try:
        import llama_cpp.mtmd_cpp  # noqa: F401
    except (ImportError, OSError) as exc:  # pragma: no cover - depends on the machine
        require("llama.cpp", f"llama-cpp-python (with libmtmd) is not importable: {exc}")
    from tests.engines.test_vision_engine import MMPROJ, image

    spec = ModelSpec(id="vision", context=1024, n_threads=1, mmproj=MMPROJ)
    engine = create_engine(spec, queue_size=8, n_threads=None, max_parallel=4)
    assert isinstance(engine, LlamaCppEngine)
    asyncio.run(engine.start())
    try:
        texts = [_request(f"Write one sentence about {t}.", f"t{i}") for i, t in enumerate(TOPICS[:3])]
        pictures = [
            EngineRequest(
                request_id=f"img{i}",
                messages=(Message("user", "Describe it.", images=(image(color=(i * 40, 10, 10)),)),),
                max_tokens=6,
                deadline=time.monotonic() + 120,
                temperature=0.0,
            )
            for i in range(3)
        ]
        expected = _alone(engine, texts)
        results = _together(engine, [*texts, *pictures])
        assert [text for text, _ in results[:3]] == expected  # image prefills do not disturb text rows
        for _, finished in results[3:]:
            assert finished.usage.image_tokens == 16
            assert finished.usage.completion_tokens > 0
    finally:
        asyncio.run(engine.aclose())
