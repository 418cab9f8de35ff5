"""Sampling for every row of a decode step at once, in numpy: what OpenAI clients send, without a grammar.

The distribution is that of the llama.cpp chain `batch._Sampler` builds, in its order:

    logit bias → penalties → top-p (at temperature 1, keeps at least one token) → temperature → dist

* logit bias adds to the token's logit (-100 leaves it e^-100 of its odds: banned in practice, as there);
* penalties subtract `count × frequency + (count > 0) × presence` for each token among this sequence's last
  `max_tokens` sampled tokens (llama.cpp's window is `max(1, max_tokens)` tokens: all of the completion);
* top-p sorts softmax(logits) and keeps the shortest prefix whose mass reaches `top_p` (ties at the cut
  in token order; llama.cpp's sort leaves their order unspecified);
* the kept logits are divided by the temperature and one token is drawn by inverse CDF from one uniform
  number per row.

Greedy rows (temperature 0) and grammar rows keep llama.cpp's chain; `vectorisable` says which go here.
Per step this is a few passes over the rows × vocabulary matrix instead of llama.cpp building, sorting
and scanning a 49k-entry candidate array per sequence through ctypes.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np

from tokentill.engines.sequence import SamplingParams

__all__ = ["RowSampler", "draw", "vectorisable"]

_BLOCK = 256  # tokens per block of the two-level inverse CDF
_REACH = (8.0, 12.0, 16.0)  # nats below a row's best logit where the top-p nucleus is looked for first

Array = np.ndarray[Any, Any]


def vectorisable(params: SamplingParams) -> bool:
    """Whether `RowSampler` + `draw` serve these settings (everything but greedy and grammars)."""
    return params.grammar is None and params.temperature > 0


class RowSampler:
    """One sequence's side of the vectorised sampler: its settings, its penalty window and its RNG."""

    def __init__(self, params: SamplingParams, *, max_tokens: int) -> None:
        self.temperature = params.temperature
        self.top_p = params.top_p
        self.rng = np.random.default_rng(None if params.seed is None else params.seed & 0xFFFFFFFF)
        self._bias_ids = np.array([token for token, _ in params.logit_bias], dtype=np.intp)
        self._bias = np.array([bias for _, bias in params.logit_bias], dtype=np.float32)
        self._frequency = np.float32(params.frequency_penalty)
        self._presence = np.float32(params.presence_penalty)
        self._penalised = bool(params.frequency_penalty or params.presence_penalty)
        self._window: deque[int] = deque()
        self._window_size = max(1, max_tokens)
        self._counts: dict[int, int] = {}

    @property
    def adjusts(self) -> bool:
        """Whether `adjust` changes anything (a bias, or penalties with tokens to count)."""
        return bool(self._bias_ids.size) or (self._penalised and bool(self._counts))

    def adjust(self, row: Array) -> None:
        """Apply the logit bias, then the penalties, to `row` (this sequence's logits, a copy) in place."""
        if self._bias_ids.size:
            row[self._bias_ids] += self._bias
        if self._penalised and self._counts:
            ids = np.fromiter(self._counts, dtype=np.intp, count=len(self._counts))
            counts = np.fromiter(self._counts.values(), dtype=np.float32, count=len(self._counts))
            row[ids] -= counts * self._frequency + self._presence

    def accept(self, token: int) -> None:
        """Count a sampled token for the penalties (llama.cpp's ring buffer of the last tokens)."""
        if not self._penalised:
            return
        self._counts[token] = self._counts.get(token, 0) + 1
        if len(self._window) >= self._window_size:
            old = self._window.popleft()
            if self._counts[old] == 1:
                del self._counts[old]
            else:
                self._counts[old] -= 1
        self._window.append(token)


def draw(logits: Array, temperature: Array, uniform: Array, top_p: Array | None = None) -> list[int]:
    """Token ids, one per row of `logits` (rows × vocab, float32, already biased and penalised; its
    contents are overwritten).

    Row i: cut to the top-`top_p[i]` nucleus of softmax(row) when `top_p[i] < 1`, then drawn from
    softmax(kept / temperature[i]); `uniform[i]` in [0, 1) picks the token whose cumulative probability
    first exceeds it.
    """
    n_rows = logits.shape[0]
    cut = np.zeros(n_rows, dtype=bool) if top_p is None else top_p < 1.0
    if not cut.any():
        return _draw_whole(logits, temperature, uniform)
    assert top_p is not None
    if cut.all():
        return _draw_nucleus(logits, temperature, uniform, top_p)
    tokens = [0] * n_rows
    for rows, drawn in (
        (whole := np.flatnonzero(~cut), _draw_whole(logits[whole], temperature[whole], uniform[whole])),
        (
            nucleus := np.flatnonzero(cut),
            _draw_nucleus(logits[nucleus], temperature[nucleus], uniform[nucleus], top_p[nucleus]),
        ),
    ):
        for row, token in zip(rows.tolist(), drawn, strict=True):
            tokens[row] = token
    return tokens


def _draw_whole(logits: Array, temperature: Array, uniform: Array) -> list[int]:
    """softmax(row / temperature) over the whole vocabulary, by a two-level inverse CDF (blocks of
    `_BLOCK` tokens, then the token in the chosen block): exact, without a cumulative sum over it all.
    Works in place in `logits`."""
    n_rows, n_vocab = logits.shape
    scaled = logits
    if (temperature != 1.0).any():
        scaled *= (1.0 / temperature[:, None]).astype(np.float32)
    scaled -= scaled.max(axis=1, keepdims=True)
    np.exp(scaled, out=scaled)
    pad = -n_vocab % _BLOCK
    if pad:
        scaled = np.concatenate([scaled, np.zeros((n_rows, pad), dtype=np.float32)], axis=1)
    block_cdf = np.cumsum(scaled.reshape(n_rows, -1, _BLOCK).sum(axis=2), axis=1, dtype=np.float64)
    target = uniform * block_cdf[:, -1]
    tokens = []
    for row in range(n_rows):
        block = min(int(np.searchsorted(block_cdf[row], target[row], side="right")), block_cdf.shape[1] - 1)
        before = block_cdf[row, block - 1] if block else 0.0
        inside = np.cumsum(scaled[row, block * _BLOCK : (block + 1) * _BLOCK], dtype=np.float64)
        offset = int(np.searchsorted(inside, target[row] - before, side="right"))
        tokens.append(min(block * _BLOCK + min(offset, _BLOCK - 1), n_vocab - 1))
    return tokens


def _draw_nucleus(logits: Array, temperature: Array, uniform: Array, top_p: Array) -> list[int]:
    """Top-p then temperature. Only tokens that can be in the nucleus are sorted: those within `_REACH`
    nats of the row's best logit, once their mass reaches `top_p` (a few hundred tokens holding ≥ 96 % of
    the mass, on SmolLM2's logits); a wider reach, then the whole row, otherwise."""
    best = logits.max(axis=1)
    probs = logits - best[:, None]
    np.exp(probs, out=probs)
    total = probs.sum(axis=1).astype(np.float64)
    tokens = []
    for row in range(logits.shape[0]):
        need = top_p[row] * total[row]
        row_logits = logits[row]
        for reach in _REACH:
            candidates = np.flatnonzero(row_logits >= best[row] - reach)
            mass = probs[row, candidates]
            if mass.sum(dtype=np.float64) >= need:
                break
        else:
            candidates, mass = np.arange(logits.shape[1]), probs[row]
        order = np.argsort(-row_logits[candidates], kind="stable")  # best first, ties by token id
        cumulative = np.cumsum(mass[order], dtype=np.float64)
        keep = candidates[order[: min(int(np.searchsorted(cumulative, need, side="left")) + 1, order.size)]]
        weights = np.exp((row_logits[keep].astype(np.float64) - best[row]) / temperature[row])
        kept_cdf = np.cumsum(weights)
        pick = int(np.searchsorted(kept_cdf, uniform[row] * kept_cdf[-1], side="right"))
        tokens.append(int(keep[min(pick, keep.size - 1)]))
    return tokens
