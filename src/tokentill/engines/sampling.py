"""Temperature sampling for every row of a decode step at once, in numpy (OpenAI's default sampling).

`draw` is the distribution of llama.cpp's `temp → dist` chain: softmax(logits / temperature), sampled by
inverse CDF with one uniform number per row. It serves the rows that need nothing else (no grammar, no
top-p cut, no penalties, no logit bias); those keep llama.cpp's chain (`batch._Sampler`). Per row it costs
one pass of exp/cumsum over the vocabulary, vectorised over the rows, instead of llama.cpp building and
scanning a 49k-entry candidate array per sequence through ctypes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["draw"]

_BLOCK = 256


def draw(
    logits: np.ndarray[Any, Any], temperature: np.ndarray[Any, Any], uniform: np.ndarray[Any, Any]
) -> list[int]:
    """Token ids, one per row of `logits` (rows × vocab), each from softmax(row / temperature[row]).

    `uniform[row]` in [0, 1) picks the token whose cumulative probability first exceeds it.
    """
    n_rows, n_vocab = logits.shape
    scaled = logits * (1.0 / temperature[:, None]).astype(np.float32)
    scaled -= scaled.max(axis=1, keepdims=True)
    np.exp(scaled, out=scaled)
    # Inverse CDF in two levels (blocks of _BLOCK tokens, then tokens in the chosen block): exact, without
    # a cumulative sum over the whole vocabulary.
    pad = -n_vocab % _BLOCK
    if pad:
        scaled = np.concatenate([scaled, np.zeros((n_rows, pad), dtype=np.float32)], axis=1)
    blocks = scaled.reshape(n_rows, -1, _BLOCK).sum(axis=2, dtype=np.float64)
    block_cdf = np.cumsum(blocks, axis=1)
    target = uniform * block_cdf[:, -1]
    tokens = []
    for row in range(n_rows):
        block = min(int(np.searchsorted(block_cdf[row], target[row], side="right")), blocks.shape[1] - 1)
        before = block_cdf[row, block - 1] if block else 0.0
        inside = np.cumsum(scaled[row, block * _BLOCK : (block + 1) * _BLOCK], dtype=np.float64)
        offset = int(np.searchsorted(inside, target[row] - before, side="right"))
        tokens.append(min(block * _BLOCK + min(offset, _BLOCK - 1), n_vocab - 1))
    return tokens
