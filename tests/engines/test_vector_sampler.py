"""The vectorised sampler draws from exactly the distribution of llama.cpp's chain (logit bias → penalties →
top-p → temperature → dist), for each combination of the parameters OpenAI clients send.

Each case is checked twice by chi-square over 10k draws against the exact distribution written out below:
draws of `sampling` (10k rows of one step, so the vectorised path itself is under test), and draws of the
llama.cpp chain `batch.sampler_chain` builds (which pins the reference to llama.cpp's semantics).
"""

from __future__ import annotations

import ctypes
from collections import Counter
from typing import Any

import numpy as np
import pytest

from tokentill.engines.sampling import RowSampler, draw, vectorisable
from tokentill.engines.sequence import SamplingParams
from tokentill.types import Grammar

DRAWS = 10_000
LOGITS = np.array([2.0, 1.5, 0.3, -0.7, 0.0, 1.0, -2.0, 0.8], dtype=np.float32)
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}  # 99.9 % quantiles

# name: (SamplingParams, the completion sampled so far, which the penalties count)
CASES: dict[str, tuple[SamplingParams, tuple[int, ...]]] = {
    "temperature": (SamplingParams(temperature=0.7), ()),
    "hot": (SamplingParams(temperature=1.8), ()),
    "top_p": (SamplingParams(temperature=1.0, top_p=0.9), ()),
    "top_p+temperature": (SamplingParams(temperature=1.6, top_p=0.7), ()),
    "top_p+cold": (SamplingParams(temperature=0.5, top_p=0.95), ()),
    "logit_bias": (SamplingParams(temperature=1.0, logit_bias=((0, -3.0), (6, 2.5))), ()),
    "frequency": (SamplingParams(temperature=1.0, frequency_penalty=0.5), (0, 0, 0, 1, 5)),
    "presence": (SamplingParams(temperature=1.0, presence_penalty=1.2), (0, 1, 1)),
    "penalties+top_p": (
        SamplingParams(temperature=1.0, top_p=0.8, frequency_penalty=0.4, presence_penalty=0.6),
        (0, 0, 5, 1),
    ),
    "all": (
        SamplingParams(
            temperature=0.8,
            top_p=0.85,
            logit_bias=((1, 1.0), (2, -100.0)),
            frequency_penalty=0.5,
            presence_penalty=0.5,
        ),
        (0, 0, 5),
    ),
}


def exact(logits: np.ndarray, params: SamplingParams, history: tuple[int, ...]) -> np.ndarray:
    """The chain's distribution, written out: bias, penalties, top-p at temperature 1 (shortest prefix of
    the sorted softmax whose mass reaches top_p), then softmax(kept / temperature)."""
    adjusted = logits.astype(np.float64)
    for token, bias in params.logit_bias:
        adjusted[token] += bias
    for token, count in Counter(history).items():
        adjusted[token] -= count * params.frequency_penalty + params.presence_penalty
    order = np.argsort(-adjusted, kind="stable")
    keep = order
    if params.top_p < 1.0:
        p = np.exp(adjusted - adjusted.max())
        cumulative = np.cumsum((p / p.sum())[order])
        keep = order[: int(np.argmax(cumulative >= params.top_p)) + 1]
    weights = np.zeros_like(adjusted)
    weights[keep] = np.exp((adjusted[keep] - adjusted.max()) / params.temperature)
    return weights / weights.sum()


def _vectorised_draws(params: SamplingParams, history: tuple[int, ...], rows: int = DRAWS) -> np.ndarray:
    sampler = RowSampler(params, max_tokens=64)
    for token in history:
        sampler.accept(token)
    logits = np.tile(LOGITS, (rows, 1))
    for row in logits:
        sampler.adjust(row)
    rng = np.random.default_rng(1234)
    tokens = draw(logits, np.full(rows, params.temperature), rng.random(rows), np.full(rows, params.top_p))
    return np.bincount(np.array(tokens), minlength=len(LOGITS))


def _chain_draws(params: SamplingParams, history: tuple[int, ...]) -> np.ndarray:
    """`DRAWS` tokens from llama.cpp's chain on `LOGITS`, its state fixed after accepting `history`."""
    lib: Any = pytest.importorskip("llama_cpp")
    from tokentill.engines.batch import sampler_chain

    n = len(LOGITS)
    chain = sampler_chain(lib, params, n_vocab=n, max_tokens=64)
    try:
        for token in history:
            lib.llama_sampler_accept(chain, token)
        data = (lib.llama_token_data * n)()
        entries = (lib.llama_token_data(i, float(x), 0.0) for i, x in enumerate(LOGITS))
        template = (lib.llama_token_data * n)(*entries)
        array = lib.llama_token_data_array(
            data=ctypes.cast(data, lib.llama_token_data_p), size=n, selected=-1, sorted=False
        )
        counts = np.zeros(n, dtype=np.int64)
        for _ in range(DRAWS):
            ctypes.memmove(data, template, ctypes.sizeof(data))
            array.size, array.selected, array.sorted = n, -1, False
            lib.llama_sampler_apply(chain, ctypes.byref(array))
            counts[data[array.selected].id] += 1
        return counts
    finally:
        lib.llama_sampler_free(chain)


def _assert_follows(counts: np.ndarray, expected: np.ndarray) -> None:
    """Chi-square at 99.9 % over the tokens the distribution allows; the others are never drawn."""
    allowed = expected > 1e-12
    assert counts[~allowed].sum() == 0, (counts, expected)
    if allowed.sum() == 1:
        return
    chi2 = float(((counts[allowed] - expected[allowed] * DRAWS) ** 2 / (expected[allowed] * DRAWS)).sum())
    assert chi2 < CHI2_999[int(allowed.sum()) - 1], (chi2, counts, (expected * DRAWS).round(1))


@pytest.mark.parametrize("case", CASES)
def test_vectorised_draws_follow_the_exact_distribution(case: str) -> None:
    params, history = CASES[case]
    _assert_follows(_vectorised_draws(params, history), exact(LOGITS, params, history))


@pytest.mark.llama
@pytest.mark.parametrize("case", CASES)
def test_llama_cpp_chain_follows_the_same_distribution(case: str) -> None:
    params, history = CASES[case]
    _assert_follows(_chain_draws(params, history), exact(LOGITS, params, history))


def test_the_test_can_fail() -> None:
    """Controls: temperature 1 is far from 0.7, and top-p applied after the temperature (instead of
    before, as llama.cpp does) is told apart from the chain's order."""
    counts = _vectorised_draws(SamplingParams(temperature=1.0), ())
    with pytest.raises(AssertionError):
        _assert_follows(counts, exact(LOGITS, SamplingParams(temperature=0.7), ()))
    params = SamplingParams(temperature=0.5, top_p=0.95)
    counts = _vectorised_draws(params, ())
    wrong = exact(LOGITS / params.temperature, SamplingParams(temperature=1.0, top_p=params.top_p), ())
    with pytest.raises(AssertionError):
        _assert_follows(counts, wrong)


@pytest.mark.parametrize("temperature", [0.2, 1.0, 5.0])
@pytest.mark.parametrize("top_p", [0.0, 1e-6])
def test_a_tiny_top_p_is_the_argmax(temperature: float, top_p: float) -> None:
    params = SamplingParams(temperature=temperature, top_p=top_p)
    counts = _vectorised_draws(params, (), rows=1000)
    assert counts[int(np.argmax(LOGITS))] == 1000


def test_a_bias_of_minus_100_bans_and_plus_100_forces() -> None:
    best = int(np.argmax(LOGITS))
    banned = _vectorised_draws(SamplingParams(temperature=1.5, logit_bias=((best, -100.0),)), ())
    assert banned[best] == 0 and banned.sum() == DRAWS
    forced = _vectorised_draws(SamplingParams(temperature=1.5, logit_bias=((6, 100.0),)), ())
    assert forced[6] == DRAWS


def test_penalties_count_the_last_max_tokens_sampled() -> None:
    """llama.cpp's window: the last max(1, max_tokens) accepted tokens, each counted once per occurrence."""
    sampler = RowSampler(SamplingParams(frequency_penalty=1.0, presence_penalty=0.5), max_tokens=3)
    assert not sampler.adjusts
    for token in (1, 1, 2, 1):  # the window keeps the last three: 1, 2, 1
        sampler.accept(token)
    row = np.zeros(4, dtype=np.float32)
    sampler.adjust(row)
    assert row.tolist() == [0.0, -2.5, -1.5, 0.0]


def test_greedy_and_grammars_stay_with_llama_cpp() -> None:
    assert not vectorisable(SamplingParams(temperature=0.0))
    assert not vectorisable(SamplingParams(temperature=0.0, top_p=0.5, frequency_penalty=1.0))
    assert not vectorisable(SamplingParams(temperature=1.0, grammar=Grammar(text='root ::= "a"')))
    everything = SamplingParams(temperature=1.0, top_p=0.9, logit_bias=((1, 2.0),), presence_penalty=1)
    assert vectorisable(everything)


def test_rows_are_independent_and_extremes_stay_in_the_vocabulary() -> None:
    logits = np.array([[0.0, 50.0, 0.0], [50.0, 0.0, 0.0], [0.0, 0.0, 50.0]], dtype=np.float32)
    assert draw(logits.copy(), np.ones(3), np.array([0.5, 0.5, 0.5])) == [1, 0, 2]
    top = np.nextafter(1.0, 0.0)  # the largest uniform below 1
    for top_p in (None, np.full(3, 0.5), np.array([1.0, 0.5, 1.0])):  # whole rows, nuclei, both
        assert draw(logits.copy(), np.ones(3), np.full(3, top), top_p) == [1, 0, 2]


@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_a_vocabulary_of_many_blocks_keeps_the_exact_distribution(top_p: float) -> None:
    """49k-entry rows as the model's (many blocks, a padded last one, logits spread over many top-p
    histogram bins): the mass of the regions that matter."""
    rng = np.random.default_rng(7)
    logits = np.full(49_153, -30.0, dtype=np.float32)
    ids = [3, 300, 20_000, 49_152]
    logits[ids] = [1.0, 0.0, 0.5, -1.7]  # first block, other blocks, the padded last block
    rows = np.tile(logits, (8, 1))  # steps of 8 rows, as a batch of 8 streams
    steps = [draw(rows.copy(), np.full(8, 0.9), rng.random(8), np.full(8, top_p)) for _ in range(DRAWS // 8)]
    tokens = np.array([t for step in steps for t in step])
    counts = np.array([(tokens == t).sum() for t in ids])
    assert counts.sum() >= DRAWS - 5  # the rest of the vocabulary holds ~1e-9 of the mass
    expected = exact(logits, SamplingParams(temperature=0.9, top_p=top_p), ())[ids]
    allowed = expected > 1e-12
    assert counts[~allowed].sum() == 0
    scaled = expected[allowed] / expected[allowed].sum() * counts.sum()
    chi2 = float(((counts[allowed] - scaled) ** 2 / scaled).sum())
    assert chi2 < CHI2_999[int(allowed.sum()) - 1]
