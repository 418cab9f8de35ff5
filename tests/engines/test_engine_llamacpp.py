"""The embedded llama.cpp engine against the packaged SmolLM2-135M weights (real model, small budgets)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Iterator

import pytest

from tests._services import require
from tests.engines._helpers import collect_text
from tokentill.catalog import ModelSpec
from tokentill.engines import create_engine
from tokentill.engines.base import EngineRequest
from tokentill.engines.llamacpp import LlamaCppEngine
from tokentill.errors import DeadlineExceeded, InvalidRequest, Overloaded
from tokentill.types import EngineEvent, Finished, Message, TextDelta

pytestmark = pytest.mark.llama

CONTEXT = 512
LONG = "Count from 1 to 200, separated by commas."  # SmolLM2 keeps going until max_tokens


def _require_llama() -> None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the machine
        require("llama.cpp", f"llama-cpp-python is not importable: {exc}")


def _new_engine(queue_size: int) -> LlamaCppEngine:
    _require_llama()
    # One thread: llama.cpp's worker threads spin at barriers, which collapses on a busy 2-core CI box.
    spec = ModelSpec(id="smol", engine="llamacpp", context=CONTEXT, n_threads=1)
    engine = create_engine(spec, queue_size=queue_size, n_threads=None)
    assert isinstance(engine, LlamaCppEngine)
    asyncio.run(engine.start())
    return engine


@pytest.fixture(scope="module")
def engine() -> Iterator[LlamaCppEngine]:
    engine = _new_engine(queue_size=4)
    yield engine
    asyncio.run(engine.aclose())


def _request(text: str, request_id: str = "req", **kwargs: object) -> EngineRequest:
    fields: dict[str, object] = {
        "request_id": request_id,
        "messages": (Message("user", text),),
        "max_tokens": 16,
        "deadline": time.monotonic() + 60,
        "temperature": 0.0,
    }
    fields.update(kwargs)
    return EngineRequest(**fields)  # type: ignore[arg-type]


async def _first(stream: AsyncGenerator[EngineEvent, None]) -> EngineEvent:
    return await anext(stream)


def _run(engine: LlamaCppEngine, request: EngineRequest) -> tuple[str, Finished]:
    return asyncio.run(collect_text(engine, request))


def test_completion_text_and_exact_usage(engine: LlamaCppEngine) -> None:
    request = _request("What is the capital of France?")
    text, finished = _run(engine, request)
    assert text.strip()
    assert finished.usage.prompt_tokens == engine.count_prompt_tokens(request)
    assert 0 < finished.usage.completion_tokens <= 16
    assert engine.capabilities.context_length == CONTEXT
    # The same prompt again reuses the KV cache for all but the last prompt token, with the same output.
    again, finished_again = _run(engine, request)
    assert again == text
    assert finished_again.usage.cached_tokens == finished.usage.prompt_tokens - 1


def test_max_tokens_gives_length(engine: LlamaCppEngine) -> None:
    text, finished = _run(engine, _request(LONG, max_tokens=5))
    assert finished.finish_reason == "length"
    assert finished.usage.completion_tokens == 5
    assert text


def test_stop_string_cuts_output(engine: LlamaCppEngine) -> None:
    full, _ = _run(engine, _request(LONG))
    assert "3" in full
    text, finished = _run(engine, _request(LONG, stop=("3",)))
    assert finished.finish_reason == "stop"
    assert text == full[: full.index("3")]
    assert finished.usage.completion_tokens < 16


def test_same_seed_same_text(engine: LlamaCppEngine) -> None:
    def sampled(seed: int) -> str:
        text, _ = _run(engine, _request("Tell me a story.", temperature=1.0, top_p=0.95, seed=seed))
        return text

    first = sampled(7)
    _run(engine, _request("Something else entirely."))  # disturb the KV cache in between
    assert sampled(7) == first


def test_concurrent_requests_do_not_interleave(engine: LlamaCppEngine) -> None:
    prompts = ["Name three colors.", "Say hello.", "What is 2+2?", LONG]
    alone = [_run(engine, _request(p))[0] for p in prompts]

    async def together() -> list[tuple[str, Finished]]:
        return await asyncio.gather(
            *(collect_text(engine, _request(p, request_id=f"c{i}")) for i, p in enumerate(prompts))
        )

    results = asyncio.run(together())
    assert [text for text, _ in results] == alone


def test_context_length_exceeded(engine: LlamaCppEngine) -> None:
    request = _request("hello " * (CONTEXT + 10))
    with pytest.raises(InvalidRequest) as info:
        _run(engine, request)
    error = info.value
    assert error.code == "context_length_exceeded" and error.param == "messages"
    n = engine.count_prompt_tokens(request)
    assert f"maximum context length is {CONTEXT} tokens" in error.message and f"{n} tokens" in error.message


def test_generation_is_clamped_to_the_context(engine: LlamaCppEngine) -> None:
    overhead = engine.count_prompt_tokens(_request("hi " * 100)) - 100  # template tokens; "hi " is one token
    request = _request("hi " * (CONTEXT - 8 - overhead), max_tokens=500)
    room = CONTEXT - engine.count_prompt_tokens(request)
    assert room == 8
    _, finished = _run(engine, request)
    assert finished.usage.prompt_tokens + finished.usage.completion_tokens <= CONTEXT
    assert finished.finish_reason == "stop" or finished.usage.completion_tokens == room


def test_deadline_while_generating(engine: LlamaCppEngine) -> None:
    request = _request(LONG, request_id="slow", max_tokens=400, deadline=time.monotonic() + 0.3)
    with pytest.raises(DeadlineExceeded):
        _run(engine, request)


def test_deadline_message_counts_the_whole_request(engine: LlamaCppEngine) -> None:
    """A later pass (the scratchpad's answer) reports the request's time, not its own share of it."""
    now = time.monotonic()
    request = _request(LONG, request_id="late", max_tokens=400, deadline=now + 0.2, started=now - 5)
    with pytest.raises(DeadlineExceeded, match=r"^The request timed out after 5\.2 seconds\.$"):
        _run(engine, request)


def test_closing_the_stream_stops_decoding(engine: LlamaCppEngine) -> None:
    async def scenario() -> None:
        stream = engine.generate(_request(LONG, request_id="gone", max_tokens=400))
        for _ in range(3):
            assert isinstance(await anext(stream), TextDelta)
        await stream.aclose()  # what a client disconnect does
        # FIFO with one active sequence: "next" can only run once "gone" has been retired.
        _, finished = await collect_text(engine, _request("Say hello.", request_id="next"))
        assert finished.usage.completion_tokens > 0

    asyncio.run(scenario())
    decoded = engine.tokens_decoded("gone")
    assert decoded is not None and decoded < 50, decoded  # of 400 allowed


def test_cancelled_task_stops_decoding(engine: LlamaCppEngine) -> None:
    async def scenario() -> None:
        first_delta = asyncio.Event()

        async def consume() -> None:
            async for event in engine.generate(_request(LONG, request_id="task", max_tokens=400)):
                if isinstance(event, TextDelta):
                    first_delta.set()

        task = asyncio.create_task(consume())
        await first_delta.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await collect_text(engine, _request("Say hello.", request_id="after-task"))

    asyncio.run(scenario())
    decoded = engine.tokens_decoded("task")
    assert decoded is not None and decoded < 50, decoded  # of 400 allowed


def test_queue_full_is_overloaded_and_queue_deadline() -> None:
    # Its own engine: the overload needs queue_size=1 (loading these weights takes well under a second).
    engine = _new_engine(queue_size=1)
    try:

        async def scenario() -> None:
            busy = engine.generate(_request(LONG, request_id="busy", max_tokens=400))
            assert isinstance(await anext(busy), TextDelta)  # admitted and decoding
            waiting = engine.generate(
                _request("Say hello.", request_id="waiting", deadline=time.monotonic() + 0.2)
            )
            waiting_task = asyncio.create_task(_first(waiting))
            await asyncio.sleep(0)  # let it enter the queue
            with pytest.raises(Overloaded) as info:
                await anext(engine.generate(_request("Say hello.", request_id="rejected")))
            assert "1 requests are queued" in info.value.message
            assert int(info.value.headers["Retry-After"]) >= 1
            with pytest.raises(DeadlineExceeded):  # timed out while still queued behind "busy"
                await waiting_task
            await busy.aclose()
            _, finished = await collect_text(engine, _request("Say hello.", request_id="later"))
            assert finished.usage.completion_tokens > 0

        asyncio.run(scenario())
    finally:
        asyncio.run(engine.aclose())


def test_aclose_fails_queued_requests() -> None:
    engine = _new_engine(queue_size=2)

    async def scenario() -> None:
        busy = engine.generate(_request(LONG, request_id="busy", max_tokens=400))
        assert isinstance(await anext(busy), TextDelta)
        queued = asyncio.create_task(collect_text(engine, _request("Say hello.", request_id="queued")))
        await asyncio.sleep(0)
        await engine.aclose()
        with pytest.raises(Overloaded):
            await queued
        with pytest.raises(Overloaded):
            async for _ in busy:
                pass

    asyncio.run(scenario())


def test_count_prompt_tokens_while_decoding(engine: LlamaCppEngine) -> None:
    # Tokenizing on the event loop while the decode thread runs llama_decode must give stable counts.
    probe = _request("The quick brown fox jumps over the lazy dog. " * 40)
    expected = engine.count_prompt_tokens(probe)

    async def scenario() -> set[int]:
        stream = engine.generate(_request(LONG, request_id="bg", max_tokens=60))
        await anext(stream)
        counts = set()
        for _ in range(100):
            counts.add(engine.count_prompt_tokens(probe))
            await asyncio.sleep(0)
        await stream.aclose()
        return counts

    assert asyncio.run(scenario()) == {expected}


def test_every_token_reaches_the_consumer_on_a_delta(engine: LlamaCppEngine) -> None:
    """Emoji and CJK (several tokens per character) with a stop prefix held back: the deltas' tokens add
    up to the usage, so a stream cut anywhere is billed for what was generated."""

    async def main() -> tuple[list[TextDelta], Finished]:
        deltas: list[TextDelta] = []
        request = _request("Repeat exactly: 猫猫猫 🙂🙂🙂 日本語 🙂🙂", max_tokens=40, stop=("🙂🙂🙂🙂",))
        async for event in engine.generate(request):
            if isinstance(event, Finished):
                return deltas, event
            deltas.append(event)
        raise AssertionError("no Finished")

    deltas, finished = asyncio.run(main())
    assert sum(d.tokens for d in deltas) == finished.usage.completion_tokens > 0
    assert all(d.tokens in (0, 1) for d in deltas)


def test_think_tags_that_are_control_tokens_are_shown(engine: LlamaCppEngine) -> None:
    """`shown_control_tokens` finds a tag that is one special token hidden by plain detokenizing (here the
    real `<|im_end|>` of SmolLM2 stands in for a CONTROL `<think>`), and leaves ordinary text alone."""
    from tokentill.engines.batch import shown_control_tokens

    llm = engine._llm  # tokenizing only reads the vocabulary (see the engine's module docstring)
    (end,) = llm.tokenize(b"<|im_end|>", add_bos=False, special=True)
    assert llm.detokenize([end]) == b""  # what the decode loop used to emit for such a tag
    assert shown_control_tokens(llm, ("<|im_end|>", "<think>", "hello")) == {end}


def test_native_reasoning_starts_inside_a_prefilled_think() -> None:
    """A DeepSeek-R1-style template ends the prompt with `<think>`: everything SmolLM2 writes (it never
    closes the block) is reasoning, none of it content."""
    from tokentill.engines.chat_template import ChatTemplate

    _require_llama()
    spec = ModelSpec(id="r1", engine="llamacpp", context=CONTEXT, n_threads=1, reasoning="native")
    engine = create_engine(spec, queue_size=2, n_threads=None)
    assert isinstance(engine, LlamaCppEngine)
    asyncio.run(engine.start())
    try:
        r1 = (
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}<|im_start|>assistant\n<think>\n"
        )
        engine._template = ChatTemplate(  # the packaged GGUF's own template does not pre-fill
            {"tokenizer.chat_template": r1}, bos_token="", eos_token="<|im_end|>"
        )

        async def main() -> list[EngineEvent]:
            return [e async for e in engine.generate(_request("Say hi.", max_tokens=8))]

        events = asyncio.run(main())
    finally:
        asyncio.run(engine.aclose())
    deltas = [e for e in events if isinstance(e, TextDelta)]
    assert deltas and all(d.reasoning for d in deltas)
    assert "".join(d.text for d in deltas).strip()
    finished = events[-1]
    assert isinstance(finished, Finished) and finished.usage.completion_tokens == sum(
        d.tokens for d in deltas
    )
