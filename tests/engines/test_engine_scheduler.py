"""The decode loop with a scripted runner: ordering, failures, cancellation and the queue bound."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest

from tokentill.engines.scheduler import SamplingParams, Scheduler, Sequence, new_channel, stream
from tokentill.errors import Overloaded, UpstreamError
from tokentill.types import Finished, TextDelta

END = 0


class ScriptedRunner:
    """Each sequence "generates" its prompt tokens back, then END; token t decodes to b"<t>"."""

    def __init__(self) -> None:
        self.position: dict[Sequence, int] = {}
        self.fail_on: int | None = None  # raise when this token is about to be sampled
        self.gate = threading.Event()  # cleared = the loop blocks before each sample
        self.gate.set()
        self.released: list[str] = []
        self.resets = 0
        self.pieces: dict[int, bytes] = {}  # tokens with scripted bytes (a byte of a character, say)

    def prefill(self, seq: Sequence) -> None:
        self.position[seq] = 0
        seq.cached_tokens = 1

    def sample(self, seq: Sequence) -> int:
        self.gate.wait(5)
        index = self.position[seq]
        token = seq.prompt[index] if index < len(seq.prompt) else END
        if token == self.fail_on:
            raise RuntimeError("llama_decode returned -1")
        return token

    def is_end(self, token: int) -> bool:
        return token == END

    def piece(self, token: int) -> bytes:
        if token in self.pieces:
            return self.pieces[token]
        return b"\xc3" if token == 99 else b"\xa9" if token == 98 else f"<{token}>".encode()

    def decode(self, seq: Sequence, token: int) -> None:
        self.position[seq] += 1

    def release(self, seq: Sequence) -> None:
        self.released.append(seq.request_id)
        self.position.pop(seq, None)

    def reset(self) -> None:
        self.resets += 1


@pytest.fixture
def runner() -> ScriptedRunner:
    return ScriptedRunner()


@pytest.fixture
def scheduler(runner: ScriptedRunner) -> Iterator[Scheduler]:
    scheduler = Scheduler(runner, queue_size=1, name="test")
    scheduler.start()
    yield scheduler
    runner.gate.set()
    scheduler.close(timeout=5)


def _seq(request_id: str, tokens: list[int], *, max_new: int = 100, stop: tuple[str, ...] = ()) -> Sequence:
    return Sequence(
        request_id=request_id,
        prompt=tokens,
        max_new_tokens=max_new,
        sampling=SamplingParams(temperature=0.0),
        stop=stop,
        deadline=time.monotonic() + 10,
        channel=new_channel(),
    )


async def _collect(scheduler: Scheduler, seq: Sequence) -> tuple[str, Finished]:
    parts: list[str] = []
    async for event in stream(scheduler, seq):
        if isinstance(event, TextDelta):
            parts.append(event.text)
        else:
            return "".join(parts), event
    raise AssertionError("no Finished")


def test_text_usage_and_release(scheduler: Scheduler, runner: ScriptedRunner) -> None:
    async def main() -> tuple[str, Finished]:
        return await _collect(scheduler, _seq("a", [5, 6, 7]))

    text, finished = asyncio.run(main())
    assert text == "<5><6><7>"
    assert finished.finish_reason == "stop"
    assert finished.usage.prompt_tokens == 3 and finished.usage.completion_tokens == 3  # END not counted
    assert finished.usage.cached_tokens == 1
    assert scheduler.tokens_decoded("a") == 3
    time.sleep(0.05)
    assert runner.released == ["a"]


def test_length_stop_and_utf8(scheduler: Scheduler) -> None:
    async def main() -> None:
        _, finished = await _collect(scheduler, _seq("len", [5, 6, 7], max_new=2))
        assert finished.finish_reason == "length" and finished.usage.completion_tokens == 2
        text, finished = await _collect(scheduler, _seq("stop", [5, 6, 7], stop=("<6",)))
        assert text == "<5>" and finished.finish_reason == "stop" and finished.usage.completion_tokens == 2
        text, _ = await _collect(scheduler, _seq("utf8", [99, 98]))
        assert text == "é"

    asyncio.run(main())


def test_failure_is_upstream_error_and_the_loop_survives(
    scheduler: Scheduler, runner: ScriptedRunner
) -> None:
    runner.fail_on = 6

    async def main() -> None:
        with pytest.raises(UpstreamError) as info:
            await _collect(scheduler, _seq("bad", [5, 6, 7]))
        assert isinstance(info.value.__cause__, RuntimeError)
        text, _ = await _collect(scheduler, _seq("good", [7, 8]))
        assert text == "<7><8>"

    asyncio.run(main())
    assert runner.resets == 1


def test_queue_bound_and_fifo(scheduler: Scheduler, runner: ScriptedRunner) -> None:
    runner.gate.clear()  # hold the loop inside the first sequence

    async def main() -> None:
        first = asyncio.create_task(_collect(scheduler, _seq("first", [1, 2])))
        await asyncio.sleep(0.05)
        second = asyncio.create_task(_collect(scheduler, _seq("second", [3])))
        await asyncio.sleep(0.05)
        with pytest.raises(Overloaded) as info:
            await _collect(scheduler, _seq("third", [4]))
        assert info.value.message == "The model is busy: 1 requests are queued. Retry shortly."
        assert "Retry-After" in info.value.headers
        runner.gate.set()
        assert (await first)[0] == "<1><2>"
        assert (await second)[0] == "<3>"

    asyncio.run(main())


def test_withdrawn_waiting_sequence_frees_its_slot(scheduler: Scheduler, runner: ScriptedRunner) -> None:
    runner.gate.clear()

    async def main() -> None:
        first = asyncio.create_task(_collect(scheduler, _seq("first", [1])))
        await asyncio.sleep(0.05)
        waiting = asyncio.create_task(_collect(scheduler, _seq("waiting", [2])))
        await asyncio.sleep(0.05)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert scheduler.queued == 0
        replacement = asyncio.create_task(_collect(scheduler, _seq("replacement", [3])))
        await asyncio.sleep(0.05)
        runner.gate.set()
        await first
        assert (await replacement)[0] == "<3>"

    asyncio.run(main())
    assert scheduler.tokens_decoded("waiting") is None  # never admitted


def test_close_fails_waiting_and_active(runner: ScriptedRunner) -> None:
    scheduler = Scheduler(runner, queue_size=1, name="closing")
    scheduler.start()
    runner.gate.clear()

    async def main() -> None:
        active = asyncio.create_task(_collect(scheduler, _seq("active", [1])))
        await asyncio.sleep(0.05)
        waiting = asyncio.create_task(_collect(scheduler, _seq("waiting", [2])))
        await asyncio.sleep(0.05)
        closer = asyncio.create_task(asyncio.to_thread(scheduler.close, 5))
        await asyncio.sleep(0.05)
        runner.gate.set()
        await closer
        for task in (active, waiting):
            with pytest.raises(Overloaded):
                await task
        with pytest.raises(Overloaded):
            await _collect(scheduler, _seq("late", [3]))

    asyncio.run(main())
    assert "active" in runner.released


def _byte_tokens(runner: ScriptedRunner, text: str) -> list[int]:
    """One token per UTF-8 byte of `text` (ids from 1000 on)."""
    data = text.encode()
    tokens = [1000 + i for i in range(len(data))]
    runner.pieces.update({t: data[i : i + 1] for i, t in enumerate(tokens)})
    return tokens


def test_every_token_is_counted_as_it_is_generated(scheduler: Scheduler, runner: ScriptedRunner) -> None:
    """Emoji and CJK one byte per token, and a stop prefix held back: the deltas carry every token."""
    tokens = _byte_tokens(runner, "猫🙂 ab")

    async def main() -> tuple[list[TextDelta], Finished]:
        deltas: list[TextDelta] = []
        async for event in stream(scheduler, _seq("bytes", tokens, stop=("abc",))):
            if isinstance(event, Finished):
                return deltas, event
            deltas.append(event)
        raise AssertionError("no Finished")

    deltas, finished = asyncio.run(main())
    assert "".join(d.text for d in deltas) == "猫🙂 ab"  # " ab" held back until the end, then released
    assert sum(d.tokens for d in deltas) == finished.usage.completion_tokens == len(tokens)
    assert scheduler.tokens_decoded("bytes") == len(tokens)
    assert len([d for d in deltas if d.tokens]) == len(tokens)  # one delta per token, as it was sampled


def test_withdrawal_mid_character_still_counts_the_tokens(
    scheduler: Scheduler, runner: ScriptedRunner
) -> None:
    tokens = _byte_tokens(runner, "猫猫猫猫")

    async def main() -> list[TextDelta]:
        seen: list[TextDelta] = []
        events = stream(scheduler, _seq("gone", tokens))
        async for event in events:
            assert isinstance(event, TextDelta)
            seen.append(event)
            if len(seen) == 2:  # two bytes of the first 猫: no text yet, two tokens generated
                break
        await events.aclose()
        return seen

    seen = asyncio.run(main())
    assert [d.text for d in seen] == ["", ""] and sum(d.tokens for d in seen) == 2
    deadline = time.monotonic() + 5
    while scheduler.tokens_decoded("gone") is None and time.monotonic() < deadline:
        time.sleep(0.01)
    decoded = scheduler.tokens_decoded("gone")  # the loop may have run ahead of the consumer
    assert decoded is not None and decoded >= 2
