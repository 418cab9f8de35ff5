"""The vectorised sampler draws from exactly softmax(logits / T): chi-square over 10k draws per case."""

from __future__ import annotations

import numpy as np
import pytest

from tokentill.engines.sampling import draw

DRAWS = 10_000
LOGITS = np.array([2.0, 1.5, 0.3, -0.7, 0.0, 1.0, -2.0, 0.8], dtype=np.float32)
CHI2_999 = {7: 24.32}  # 99.9 % quantile of chi-square with 7 degrees of freedom


def _chi_square(counts: np.ndarray, expected: np.ndarray) -> float:
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.8])
def test_draws_follow_the_exact_softmax(temperature: float) -> None:
    rng = np.random.default_rng(1234)
    rows = np.tile(LOGITS, (DRAWS, 1))  # 10k rows of one step: the vectorised path itself is under test
    tokens = draw(rows, np.full(DRAWS, temperature), rng.random(DRAWS))
    counts = np.bincount(np.array(tokens), minlength=len(LOGITS))
    exact = np.exp(LOGITS / temperature) / np.exp(LOGITS / temperature).sum()
    assert _chi_square(counts, exact * DRAWS) < CHI2_999[len(LOGITS) - 1]


def test_the_test_can_fail() -> None:
    """Control: draws at temperature 1 are far from the temperature-0.7 distribution."""
    rng = np.random.default_rng(1234)
    tokens = draw(np.tile(LOGITS, (DRAWS, 1)), np.ones(DRAWS), rng.random(DRAWS))
    counts = np.bincount(np.array(tokens), minlength=len(LOGITS))
    wrong = np.exp(LOGITS / 0.7) / np.exp(LOGITS / 0.7).sum()
    assert _chi_square(counts, wrong * DRAWS) > CHI2_999[len(LOGITS) - 1]


def test_rows_are_independent_and_extremes_stay_in_the_vocabulary() -> None:
    logits = np.array([[0.0, 50.0, 0.0], [50.0, 0.0, 0.0], [0.0, 0.0, 50.0]], dtype=np.float32)
    assert draw(logits, np.ones(3), np.array([0.5, 0.5, 0.5])) == [1, 0, 2]
    top = np.nextafter(1.0, 0.0)  # the largest uniform below 1
    assert draw(logits, np.ones(3), np.full(3, top)) == [1, 0, 2]


def test_a_vocabulary_of_many_blocks_keeps_the_exact_distribution() -> None:
    """49k-entry rows as the model's (many blocks, a padded last one): the mass of three regions."""
    rng = np.random.default_rng(7)
    logits = np.full(49_153, -30.0, dtype=np.float32)
    logits[[3, 300, 49_152]] = [1.0, 0.0, 0.5]  # first block, another block, the padded last block
    rows = np.tile(logits, (8, 1))  # steps of 8 rows, as a batch of 8 streams
    tokens = np.array([t for _ in range(DRAWS // 8) for t in draw(rows, np.ones(8), rng.random(8))])
    counts = np.array([(tokens == t).sum() for t in (3, 300, 49_152)])
    assert counts.sum() >= DRAWS - 5  # the rest of the vocabulary holds ~1e-9 of the mass
    exact = np.exp([1.0, 0.0, 0.5]) / np.exp([1.0, 0.0, 0.5]).sum()
    assert _chi_square(counts, exact * counts.sum()) < 13.82  # 99.9 % quantile, 2 degrees of freedom
