"""logit_bias and the two penalties in the llama.cpp engine, against the packaged SmolLM2-135M weights.

Token ids come from a vocabulary-only load of the same GGUF, not from the engine under test. Greedy
decoding keeps every comparison deterministic.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.engines._helpers import collect_text, new_llama_engine
from tokentill.catalog import default_weights_path
from tokentill.engines.base import EngineRequest
from tokentill.engines.llamacpp import LlamaCppEngine
from tokentill.errors import InvalidRequest
from tokentill.types import Finished, Message

pytestmark = pytest.mark.llama


@pytest.fixture(scope="module")
def engine() -> Iterator[LlamaCppEngine]:
    engine = new_llama_engine(parallel=2)
    yield engine
    asyncio.run(engine.aclose())


@pytest.fixture(scope="module")
def vocab() -> Iterator[Any]:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(default_weights_path()), vocab_only=True, verbose=False)
    yield llm
    llm.close()


def _token(vocab: Any, text: str) -> int:
    tokens = vocab.tokenize(text.encode(), add_bos=False, special=True)
    assert len(tokens) == 1, (text, tokens)
    return int(tokens[0])


def _run(engine: LlamaCppEngine, text: str, **kwargs: Any) -> tuple[str, Finished]:
    request = EngineRequest(
        request_id=f"s-{time.monotonic_ns()}",
        messages=(Message("user", text),),
        max_tokens=kwargs.pop("max_tokens", 24),
        deadline=time.monotonic() + 120,
        temperature=0.0,
        **kwargs,
    )
    return asyncio.run(collect_text(engine, request))


def test_banning_the_end_tokens_runs_to_the_budget(engine: LlamaCppEngine, vocab: Any) -> None:
    text, finished = _run(engine, "Say hi.", max_tokens=40)
    assert finished.finish_reason == "stop" and finished.usage.completion_tokens < 40  # a short answer
    ends = ((_token(vocab, "<|im_end|>"), -100.0), (_token(vocab, "<|endoftext|>"), -100.0))
    longer, finished = _run(engine, "Say hi.", max_tokens=40, logit_bias=ends)
    assert finished.finish_reason == "length" and finished.usage.completion_tokens == 40
    assert longer.startswith(text)  # the same greedy path until the banned end token


def test_a_large_positive_bias_forces_a_token(engine: LlamaCppEngine, vocab: Any) -> None:
    seven = _token(vocab, "7")
    text, finished = _run(engine, "Name a colour.", max_tokens=12, logit_bias=((seven, 100.0),))
    assert finished.usage.completion_tokens == 12
    assert text == "7" * 12


def _punctuation(text: str) -> int:
    """How often the commonest separator repeats: what a counting answer is mostly made of."""
    return max(text.count(mark) for mark in ".,\n")


def test_penalties_discourage_repeated_tokens(engine: LlamaCppEngine) -> None:
    prompt = "Count from 1 to 200."
    plain, _ = _run(engine, prompt, max_tokens=40)
    assert _punctuation(plain) >= 8, plain  # greedy: a list, one separator per number
    for penalties in ({"frequency_penalty": 2.0}, {"frequency_penalty": 1.0, "presence_penalty": 2.0}):
        penalised, _ = _run(engine, prompt, max_tokens=40, **penalties)
        assert _punctuation(penalised) < _punctuation(plain), (penalties, penalised)


def test_token_ids_outside_the_vocabulary_are_refused(engine: LlamaCppEngine, vocab: Any) -> None:
    with pytest.raises(InvalidRequest) as info:
        _run(engine, "Hi", logit_bias=((vocab.n_vocab(), 1.0),))
    assert info.value.param == "logit_bias"
    assert str(vocab.n_vocab()) in info.value.message


def test_presence_penalty_alone_changes_a_free_text_answer(engine: LlamaCppEngine) -> None:
    prompt = "Write a short poem about the sea."
    plain, _ = _run(engine, prompt, max_tokens=48)
    penalised, _ = _run(engine, prompt, max_tokens=48, presence_penalty=2.0)
    assert penalised != plain
    assert _variety(penalised) >= _variety(plain)


def _variety(text: str) -> float:
    words = text.split()
    return len(set(words)) / len(words)
