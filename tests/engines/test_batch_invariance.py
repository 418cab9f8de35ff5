"""Greedy decoding does not depend on the company a sequence keeps, by construction (see `batch.py`).

The batch composition is varied on purpose, not by timing luck: the runner is driven step by step here,
one thread as the scheduler would, and a long prompt's next-token logits are compared bit for bit while
it is prefilled alone (512-token chunks), in 256-token chunks beside a generating sequence in a lower
slot, beside other prompts prefilled in the same steps, and after a prefix reused from an earlier request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from tests.engines._helpers import new_llama_engine
from tokentill.engines.batch import BatchedLlamaRunner
from tokentill.engines.llamacpp import LlamaCppEngine
from tokentill.engines.sequence import Channel, SamplingParams, Sequence

pytestmark = pytest.mark.llama

STORY = "Tell me a long story about a lighthouse keeper and his dog, with many details. " * 40
STEPS = 12


@pytest.fixture(scope="module")
def engine() -> Iterator[LlamaCppEngine]:
    engine = new_llama_engine(parallel=1)  # for its weights and tokenizer; the tests make their runners
    yield engine
    asyncio.run(engine.aclose())


class Driver:
    """Steps a fresh runner like the scheduler does, recording one sequence's logits after each flush."""

    def __init__(self, engine: LlamaCppEngine) -> None:
        self.llm: Any = engine._llm
        self.runner = BatchedLlamaRunner(self.llm, parallel=4, n_ctx_seq=1024, n_threads=1)
        self.loop = asyncio.new_event_loop()
        self.active: list[Sequence] = []

    def sequence(self, text: str) -> Sequence:
        chat = f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
        prompt = list(self.llm.tokenize(chat.encode(), add_bos=False, special=True))
        seq = Sequence(
            request_id=text[:16], prompt=prompt, max_new_tokens=64, sampling=SamplingParams(0.0),
            stop=(), deadline=float("inf"), channel=Channel(self.loop),
        )  # fmt: skip
        self.active.append(seq)
        return seq

    def logits(self, seq: Sequence) -> np.ndarray[Any, Any]:
        import llama_cpp

        index = self.runner._by_seq[seq].logits_index
        row = llama_cpp.llama_get_logits_ith(self.runner.ctx, index)
        return np.ctypeslib.as_array(row, shape=(self.runner.n_vocab,)).copy()

    def step(self) -> None:
        for seq in self.active:
            if seq.prefilled:
                self.runner.decode(seq, int(np.argmax(self.logits(seq))))
        for seq in self.active:
            if not seq.prefilled:
                seq.prefilled = self.runner.prefill_chunk(seq)
        self.runner.flush()

    def watch(self, seq: Sequence, steps: int = STEPS) -> list[np.ndarray[Any, Any]]:
        seen: list[np.ndarray[Any, Any]] = []
        while len(seen) < steps:
            was_ready = seq.prefilled
            self.step()
            if was_ready or seq.prefilled:
                seen.append(self.logits(seq))
        return seen

    def retire_all(self) -> None:
        for seq in self.active:
            self.runner.release(seq)
        self.active.clear()

    def close(self) -> None:
        self.runner.close()
        self.loop.close()


def _run(engine: LlamaCppEngine, scenario: Callable[[Driver], list[np.ndarray[Any, Any]]]) -> list[Any]:
    driver = Driver(engine)
    try:
        return scenario(driver)
    finally:
        driver.close()


def _alone(d: Driver) -> list[np.ndarray[Any, Any]]:
    return d.watch(d.sequence(STORY))


def _beside_a_generating_sequence(d: Driver) -> list[np.ndarray[Any, Any]]:
    d.sequence("Count from 1 to 200, separated by commas.")
    d.step()
    d.step()  # it generates, so the story is prefilled in 256-token chunks, in slot 1
    return d.watch(d.sequence(STORY))


def _prefilled_with_other_prompts(d: Driver) -> list[np.ndarray[Any, Any]]:
    d.sequence(STORY.replace("dog", "cat"))  # takes the first chunk's budget: the story's chunks shift
    d.sequence("Hello!")
    return d.watch(d.sequence(STORY))


def _after_prefix_reuse(d: Driver) -> list[np.ndarray[Any, Any]]:
    d.watch(d.sequence(STORY[: len(STORY) // 2] + "And then?"), steps=2)
    d.retire_all()  # its slot keeps half the story cached: the story starts from there
    seq = d.sequence(STORY)
    seen = d.watch(seq)
    assert seq.cached_tokens > 100
    return seen


@pytest.mark.parametrize(
    "company", [_beside_a_generating_sequence, _prefilled_with_other_prompts, _after_prefix_reuse]
)
def test_greedy_logits_are_bit_identical_whatever_the_batch(
    engine: LlamaCppEngine, company: Callable[[Driver], list[np.ndarray[Any, Any]]]
) -> None:
    alone = _run(engine, _alone)
    together = _run(engine, company)
    assert len(alone) == len(together) == STEPS
    for step, (a, b) in enumerate(zip(alone, together, strict=True)):
        assert np.array_equal(a, b), f"step {step}: max |Δlogit| = {np.max(np.abs(a - b))}"
