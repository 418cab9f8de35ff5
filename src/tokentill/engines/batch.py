"""Continuous batching over one llama.cpp context: `BatchedLlamaRunner`, the `scheduler.BatchRunner`.

Layout of the context (created here, not by `llama_cpp.Llama`, whose constructor cannot ask for several
sequences): `parallel` slots, slot i = llama.cpp sequence id i, each with its own `n_ctx_seq` KV cells
(`kv_unified = false`: per-sequence streams, so attention never scans other sequences' cells and one
sequence can never run another out of cells). Total KV = parallel × n_ctx_seq cells.

Per step (see `scheduler.py`): every generating sequence queues its sampled token and every new sequence
queues a chunk of its prompt; `flush` evaluates each prompt chunk in a `llama_decode` of its own (one
sequence, no logits), then every sequence's one token (a sampled token, or a prompt's last token) in one
`llama_decode` asking logits for each row; `sample` reads row `logits_index` of that output with the
sequence's own sampler chain (`llama_sampler_sample(chain, ctx, i)`) for greedy and grammar rows, and
draws every other row of the step at once on the first such call (`sampling.draw`).

Batch invariance, by construction: a sequence's greedy tokens do not depend on the company it keeps.
The CPU kernels compute each row alike whatever the other rows, except where the shape of a sequence's
rows in a ubatch picks the kernel: llama.cpp splits a multi-sequence batch into ubatches by sequence, so a
prompt chunk mixed with other sequences' rows was evaluated in pieces that depended on them, and the flash
attention kernel changes path (and rounding) with the number of query rows. So prompt chunks never share a
`llama_decode`, flash attention is off (then chunk sizes do not matter either), and the decode step has
exactly one row per sequence (tests/engines/test_batch_invariance.py varies the company on purpose).

Prefix reuse: a slot keeps the tokens of its last request after it leaves (its KV cells stay). A new
request takes the free slot whose cached tokens share the longest prefix with its prompt, unless that slot
would widen the range of busy slots (which every step pays for, see `_choose`), and keeps those cells
(`llama_memory_seq_rm` from the first difference on); `Sequence.cached_tokens` reports them.

Follow-ups (`follow`, the scratchpad's answer): when a pass ends, its follow-up takes over the slot as it
is; the tokens the template writes after the output (end of turn, the next instructions, the assistant
header) are its prompt, evaluated like any prompt's remainder. If they and the follow-up's budget would
not fit the context, the end of the first pass's output is dropped from the cells first.

Images: a prompt with images is evaluated through libmtmd into its slot's sequence id at admission, on its
own (`VisionEncoder.evaluate`), all but its last token; that last token joins the shared batch. Only the
text before the first image is reusable (positions after it are recorded as `_IMAGE`).

Threads: every method runs on the scheduler thread (it owns `_ctx`, `_batch`, the samplers, the mtmd
context). With a `ThreadTuner` (`threads.py`), `flush` times each step's decode of its one-token rows and
sets the context's thread count (`llama_set_n_threads`) that the tuner asks for before the next step.
Native memory (`_ctx`, `_batch`, sampler chains) is freed by `close` / `release`.
"""

from __future__ import annotations

import ctypes
import logging
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tokentill.engines.base import THINK_CLOSE, THINK_OPEN
from tokentill.engines.sampling import RowSampler, draw, vectorisable
from tokentill.engines.sequence import SamplingParams, Sequence
from tokentill.engines.threads import ThreadTuner
from tokentill.engines.vision import VisionEncoder
from tokentill.errors import UpstreamError
from tokentill.types import Grammar

__all__ = ["BatchedLlamaRunner", "sampler_chain", "shown_control_tokens"]

logger = logging.getLogger(__name__)

N_BATCH = 512  # prompt tokens evaluated per step when nothing else runs
PREFILL_CHUNK = 256  # prompt tokens per step (all new sequences together) while others are generating
_IMAGE = -1  # a KV position holding an image embedding, in `_Slot.tokens`
SPAN_COST = 128  # prompt tokens one more slot in the busy range is worth (see `_choose`)


def shown_control_tokens(llm: Any, texts: tuple[str, ...]) -> frozenset[int]:
    """Ids of the `texts` that are one special token which plain detokenizing would hide.

    Some GGUFs mark `<think>` / `</think>` as CONTROL tokens; `detokenize(special=False)` renders those
    as nothing, and the reasoning would then reach `content` with no tag to split it at.
    """
    shown: set[int] = set()
    for text in texts:
        tokens = list(llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))
        if len(tokens) == 1 and bytes(llm.detokenize(tokens)) != text.encode("utf-8"):
            if bytes(llm.detokenize(tokens, special=True)) == text.encode("utf-8"):
                shown.add(tokens[0])
    return frozenset(shown)


class _Sampler:
    """The sampler of one sequence. With a temperature and no grammar, a `sampling.RowSampler` that the
    runner draws with the step's other such rows; otherwise a llama.cpp sampler chain: logit bias →
    penalties → greedy at temperature 0, else top-p → temp → dist (the distribution `sampling` matches,
    tests/engines/test_vector_sampler.py). Penalties count only the tokens this sequence sampled (the
    completion), as OpenAI's do; their memory is bounded by the sequence's own budget.

    A grammar sampler beside the chain keeps the sequence's parse state (it accepts each sampled token), so
    every sequence in the batch has its own. It allows only what the grammar allows, end-of-generation
    included until the grammar is complete, and only end-of-generation once it is. Checking all 49k
    vocabulary entries against a grammar costs more than a small model's decode, so sampling goes as
    llama.cpp's own `common_sampler` does: sample without the grammar, check that one token against it,
    and only if it is refused sample again with the grammar applied first. That is rejection sampling with
    the exact fallback, so the distribution is the grammar-masked one (top-p cuts the unmasked
    distribution on the first try, as in llama.cpp)."""

    def __init__(
        self, lib: Any, params: SamplingParams, *, vocab: Any, n_vocab: int, max_tokens: int
    ) -> None:
        self._lib = lib
        self._n_vocab = n_vocab
        self._grammar: Any = None
        self._chain: Any = None
        # Rows with a temperature and no grammar are drawn by the runner, all together (`sampling`), with
        # this chain's distribution; greedy and grammar rows use the chain.
        self.row = RowSampler(params, max_tokens=max_tokens) if vectorisable(params) else None
        if self.row is not None:
            return
        self._chain = sampler_chain(lib, params, n_vocab=n_vocab, max_tokens=max_tokens)  # freed by `close`
        if params.grammar is not None:
            try:
                self._grammar = _grammar_sampler(lib, vocab, params.grammar)
            except BaseException:
                self.close()
                raise
            from llama_cpp._internals import LlamaTokenDataArray

            self._candidates: Any = LlamaTokenDataArray(n_vocab=n_vocab)
            self._one: Any = (lib.llama_token_data * 1)()
            self._one_array: Any = lib.llama_token_data_array(
                data=ctypes.cast(self._one, lib.llama_token_data_p), size=1, selected=-1, sorted=False
            )

    def sample(self, ctx: Any, index: int) -> int:
        lib = self._lib
        if self._grammar is None:
            # llama_sampler_sample also "accepts" the token into the chain's state.
            return int(lib.llama_sampler_sample(self._chain, ctx, index))
        logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, index), shape=(self._n_vocab,))
        token = self._pick(logits, grammar_first=False)
        if not self._allowed(token):
            token = self._pick(logits, grammar_first=True)
        lib.llama_sampler_accept(self._grammar, token)
        lib.llama_sampler_accept(self._chain, token)
        return token

    def _pick(self, logits: Any, *, grammar_first: bool) -> int:
        candidates = self._candidates
        candidates.copy_logits(logits)
        candidates.candidates.selected = -1
        pointer = ctypes.byref(candidates.candidates)
        if grammar_first:
            self._lib.llama_sampler_apply(self._grammar, pointer)
        self._lib.llama_sampler_apply(self._chain, pointer)
        # `selected` indexes the (possibly re-sorted) data the samplers worked on
        return int(candidates.candidates_data.id[candidates.candidates.selected])

    def _allowed(self, token: int) -> bool:
        """Whether the grammar, in its current state, allows `token` next."""
        self._one[0].id, self._one[0].logit, self._one[0].p = token, 0.0, 0.0
        self._one_array.size, self._one_array.selected = 1, -1
        self._lib.llama_sampler_apply(self._grammar, ctypes.byref(self._one_array))
        return bool(math.isfinite(self._one[0].logit))

    def close(self) -> None:
        if self._chain is not None:
            self._lib.llama_sampler_free(self._chain)
            self._chain = None
        if self._grammar is not None:
            self._lib.llama_sampler_free(self._grammar)
            self._grammar = None


def sampler_chain(lib: Any, params: SamplingParams, *, n_vocab: int, max_tokens: int) -> Any:
    """llama.cpp's sampler chain for `params` (the grammar aside): logit bias → penalties → greedy at
    temperature 0, else top-p → temp → dist. The caller frees it (`llama_sampler_free`)."""
    chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
    if params.logit_bias:
        biases = (lib.llama_logit_bias * len(params.logit_bias))(
            *(lib.llama_logit_bias(token, bias) for token, bias in params.logit_bias)
        )
        lib.llama_sampler_chain_add(
            chain, lib.llama_sampler_init_logit_bias(n_vocab, len(params.logit_bias), biases)
        )
    if params.frequency_penalty or params.presence_penalty:
        penalties = lib.llama_sampler_init_penalties(
            n_vocab, max(1, max_tokens), 1.0, params.frequency_penalty, params.presence_penalty
        )
        lib.llama_sampler_chain_add(chain, penalties)
    if params.temperature <= 0:
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
    else:
        seed = lib.LLAMA_DEFAULT_SEED if params.seed is None else params.seed & 0xFFFFFFFF
        if params.top_p < 1.0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(params.top_p, 1))
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(params.temperature))
        lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(seed))
    return chain


def _grammar_sampler(lib: Any, vocab: Any, grammar: Grammar) -> Any:
    """llama.cpp's grammar sampler; lazy (free until a trigger string appears) when `grammar.triggers`."""
    text = grammar.text.encode("utf-8")
    if grammar.triggers:
        patterns = [re.escape(t).encode("utf-8") for t in grammar.triggers]
        array = (ctypes.c_char_p * len(patterns))(*patterns)
        sampler = lib.llama_sampler_init_grammar_lazy_patterns(
            vocab, text, b"root", array, len(patterns), None, 0
        )
    else:
        sampler = lib.llama_sampler_init_grammar(vocab, text, b"root")
    if not sampler:  # the compiler wrote a grammar llama.cpp cannot parse: our bug, not the client's
        raise RuntimeError("llama.cpp refused the grammar compiled for this request")
    return sampler


@dataclass(eq=False)
class _Slot:
    seq_id: int
    tokens: list[int] = field(default_factory=list)  # per KV position: token id or _IMAGE (queued included)
    owner: Sequence | None = None
    pending: list[int] = field(default_factory=list)  # prompt tokens not queued yet
    prompt_end: int = 0  # the owner's output starts at this position (once its prompt is queued)
    logits_index: int = -1  # row of the last flush's output holding this slot's next-token logits
    sampler: _Sampler | None = None


class BatchedLlamaRunner:
    """`BatchRunner` over the weights of one `llama_cpp.Llama` (tokenizer, vocabulary), own context."""

    def __init__(
        self,
        llm: Any,
        *,
        parallel: int,
        n_ctx_seq: int,
        n_threads: int,
        vision: VisionEncoder | None = None,
        tuner: ThreadTuner | None = None,
    ) -> None:
        import llama_cpp

        lib: Any = llama_cpp
        self._lib = lib
        self._llm = llm
        self._vision = vision
        self._vocab = lib.llama_model_get_vocab(llm.model)
        self.n_vocab = int(lib.llama_vocab_n_tokens(self._vocab))
        self._capacity = N_BATCH + parallel  # room for one chunk plus every slot's next token
        params = lib.llama_context_default_params()
        params.n_ctx = parallel * n_ctx_seq
        params.n_batch = self._capacity
        params.n_ubatch = N_BATCH
        params.n_seq_max = parallel
        params.kv_unified = False
        params.n_threads = n_threads
        params.n_threads_batch = n_threads
        params.no_perf = True
        # Batch invariance: ggml's CPU flash attention changes path (and rounding) with the number of query
        # rows of a sequence in a ubatch; see the module docstring.
        params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        ctx = lib.llama_init_from_model(llm.model, params)
        if not ctx:
            raise RuntimeError(f"llama.cpp could not create a context of {parallel} × {n_ctx_seq} tokens")
        self._ctx: Any = ctx
        self._memory: Any = lib.llama_get_memory(ctx)
        self.n_ctx_seq = min(n_ctx_seq, int(lib.llama_n_ctx_seq(ctx)))
        self._batch: Any = lib.llama_batch_init(self._capacity, 0, 1)
        self._rows: list[tuple[_Slot, int, int]] = []  # this step's one-token rows: (slot, token, position)
        self._chunks: list[tuple[_Slot, int, list[int]]] = []  # prompt chunks (slot, first position, tokens)
        self._decoding = 0  # sequences whose sampled token is queued in this step
        self._row_slots: list[_Slot] = []  # the last decode step's output rows, in order
        self._drawn: dict[_Slot, int] | None = None  # the vectorised rows' tokens of the last step
        self._prefill_queued = 0  # prompt tokens queued in this step
        self._slots = [_Slot(seq_id=i) for i in range(parallel)]
        self._by_seq: dict[Sequence, _Slot] = {}
        self._shown = shown_control_tokens(llm, (THINK_OPEN, THINK_CLOSE))
        self._threads = n_threads  # what the context decodes with now
        self._tuner = tuner

    @property
    def threads(self) -> int:
        """The thread count decoding runs at (the tuner's choice: during a probe some steps use another);
        any thread may read it."""
        return self._tuner.current if self._tuner is not None else self._threads

    @property
    def ctx(self) -> Any:
        """The llama context (decode thread only)."""
        return self._ctx

    # --- BatchRunner ----------------------------------------------------------------------------------

    def prefill(self, seq: Sequence) -> None:
        """The whole prompt at once (the one-at-a-time `Runner` contract; the batching scheduler uses
        `prefill_chunk` instead): chunks are queued and decoded until the prompt is in."""
        while not self.prefill_chunk(seq):
            self.flush()
        self.flush()

    def prefill_chunk(self, seq: Sequence) -> bool:
        slot = self._by_seq.get(seq)
        if slot is None:
            slot = self._admit(seq)
        # Sampled tokens were queued first (see scheduler). While other sequences generate, all prompts
        # together get PREFILL_CHUNK tokens per step, so running streams stall for one chunk at most.
        # The last prompt token joins the step's one-token rows (its logits start sampling), the rest go
        # in chunks of their own (see the module docstring).
        budget = (PREFILL_CHUNK if self._decoding else N_BATCH) - self._prefill_queued
        take = max(0, min(len(slot.pending) - 1, budget))
        if take:
            self._prefill_queued += take
            seq.evaluated += take
            chunk, slot.pending = slot.pending[:take], slot.pending[take:]
            self._chunks.append((slot, len(slot.tokens), chunk))
            slot.tokens.extend(chunk)
        if len(slot.pending) != 1:
            return False
        seq.evaluated += 1
        self._queue(slot, slot.pending.pop())
        slot.prompt_end = len(slot.tokens)
        return True

    def sample(self, seq: Sequence) -> int:
        slot = self._by_seq[seq]
        assert slot.sampler is not None and slot.logits_index >= 0, "sample before the prompt was evaluated"
        if slot.sampler.row is None:
            return slot.sampler.sample(self._ctx, slot.logits_index)
        if self._drawn is None:
            self._drawn = self._draw_all()
        return self._drawn.pop(slot)

    def _draw_all(self) -> dict[_Slot, int]:
        """The next token of every vectorised row of the last decode step, in one `sampling.draw`."""
        slots, samplers = [], []
        for slot in self._row_slots:
            if slot.sampler is not None and slot.sampler.row is not None:
                slots.append(slot)
                samplers.append(slot.sampler.row)
        pointer = self._lib.llama_get_logits(self._ctx)
        logits = np.ctypeslib.as_array(pointer, shape=(len(self._row_slots), self.n_vocab))
        rows = logits[[s.logits_index for s in slots]]  # a copy: the samplers adjust it
        for i, sampler in enumerate(samplers):
            if sampler.adjusts:
                sampler.adjust(rows[i])
        tokens = draw(
            rows,
            np.array([s.temperature for s in samplers]),
            np.array([s.rng.random() for s in samplers]),
            np.array([s.top_p for s in samplers]),
        )
        for sampler, token in zip(samplers, tokens, strict=True):
            sampler.accept(token)
        return dict(zip(slots, tokens, strict=True))

    def is_end(self, token: int) -> bool:
        return bool(self._lib.llama_vocab_is_eog(self._vocab, token))

    def piece(self, token: int) -> bytes:
        # Control tokens detokenize to nothing unless `special`; the think tags must show as text.
        return bytes(self._llm.detokenize([token], special=token in self._shown))

    def decode(self, seq: Sequence, token: int) -> None:
        self._queue(self._by_seq[seq], token)
        self._decoding += 1

    def flush(self) -> None:
        chunks, rows = self._chunks, self._rows
        self._chunks, self._rows, self._decoding, self._prefill_queued = [], [], 0, 0
        for slot, start, chunk in chunks:  # before the rows: a prompt's last token follows its chunk
            self._decode([(slot.seq_id, token, start + i, False) for i, token in enumerate(chunk)])
        self._drawn, self._row_slots = None, []
        if rows:
            started = time.perf_counter()
            self._decode([(slot.seq_id, token, pos, True) for slot, token, pos in rows])
            if self._tuner is not None:
                self._tune(self._tuner, len(rows), bool(chunks), time.perf_counter() - started)
            self._row_slots = [slot for slot, _, _ in rows]
            for i, (slot, _, _) in enumerate(rows):
                slot.logits_index = i

    def release(self, seq: Sequence) -> None:
        """Free the sampler and the slot; its KV cells stay for prefix reuse by a later request."""
        slot = self._by_seq.pop(seq, None)
        if slot is None:
            return
        if slot.sampler is not None:
            slot.sampler.close()
        slot.sampler, slot.owner, slot.logits_index = None, None, -1
        if slot.pending:  # prompt only partly evaluated: what is there is still a valid prefix
            slot.pending = []

    def follow(self, seq: Sequence, then: Sequence, tail: list[int]) -> bool:
        slot = self._by_seq[seq]
        # Room: the follow-up's prompt and budget after what the cells hold; the first pass's output
        # (cells from `prompt_end` on, then `tail`) gives way from its end, never the prompt before it.
        kept, tail_kept = len(slot.tokens), len(tail)
        over = kept + tail_kept + len(then.prompt) + then.max_new_tokens - self.n_ctx_seq
        if over > 0:
            tail_kept -= min(over, tail_kept)
            kept = max(slot.prompt_end, kept - max(0, over - len(tail)))
            if kept + tail_kept + len(then.prompt) + then.max_new_tokens > self.n_ctx_seq:
                return False  # the follow-up's own prompt leaves no room for its budget
        if not then.prompt and not tail[:tail_kept]:
            return False  # nothing to evaluate: no logits to sample the follow-up from
        sampler = _Sampler(
            self._lib, then.sampling, vocab=self._vocab, n_vocab=self.n_vocab, max_tokens=then.max_new_tokens
        )
        if kept < len(slot.tokens):
            if not self._lib.llama_memory_seq_rm(self._memory, slot.seq_id, kept, -1):
                sampler.close()
                return False  # this model's memory cannot be truncated
            slot.tokens = slot.tokens[:kept]
        if slot.sampler is not None:
            slot.sampler.close()
        del self._by_seq[seq]
        self._by_seq[then] = slot
        slot.owner, slot.sampler, slot.logits_index = then, sampler, -1
        slot.pending = tail[:tail_kept] + then.prompt
        then.prefix = kept + tail_kept
        then.cached_tokens = kept
        return True

    def discard(self, seq: Sequence) -> None:
        slot = self._by_seq.get(seq)
        self.release(seq)
        if slot is not None:
            self._forget(slot)

    def reset(self) -> None:
        """Forget every slot's cache (after a failed batch); active sequences are failed by the caller."""
        self._lib.llama_memory_clear(self._memory, True)
        self._rows, self._chunks, self._row_slots, self._drawn = [], [], [], None
        self._decoding = self._prefill_queued = 0
        for slot in self._slots:
            slot.tokens = []
            slot.pending = []
            slot.logits_index = -1

    def close(self) -> None:
        """Free native memory; only once the decode thread has stopped."""
        for seq in list(self._by_seq):
            self.release(seq)
        if self._batch is not None:
            self._lib.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx:
            self._lib.llama_free(self._ctx)
            self._ctx = None

    # --- helpers ---------------------------------------------------------------------------------------

    def _queue(self, slot: _Slot, token: int) -> None:
        """One row of this step's decode: `token` at the slot's next position, logits wanted."""
        self._rows.append((slot, token, len(slot.tokens)))
        slot.tokens.append(token)

    def _tune(self, tuner: ThreadTuner, rows: int, prompt: bool, seconds: float) -> None:
        """Tell the tuner how long this step's rows took; decode the next step with the count it asks."""
        tuner.observe(threads=self._threads, rows=rows, prompt=prompt, seconds=seconds)
        if tuner.threads != self._threads:
            self._threads = tuner.threads
            self._lib.llama_set_n_threads(self._ctx, self._threads, self._threads)  # batch count too

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> None:
        """One `llama_decode` of (sequence id, token, position, logits) rows; raising fails them all."""
        batch = self._batch
        for i, (seq_id, token, pos, logits) in enumerate(items):
            batch.token[i] = token
            batch.pos[i] = pos
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = seq_id
            batch.logits[i] = logits
        batch.n_tokens = len(items)
        rc = int(self._lib.llama_decode(self._ctx, batch))
        if rc != 0:  # 1 = no KV slot (cannot happen within n_ctx_seq), < 0 = error; outputs are undefined
            raise RuntimeError(f"llama_decode returned {rc} for a batch of {len(items)} tokens")

    def _admit(self, seq: Sequence) -> _Slot:
        """Bind `seq` to the free slot sharing the longest prefix; evaluate images now (on their own)."""
        free = [s for s in self._slots if s.owner is None]
        if not free:  # the scheduler admits at most `parallel` sequences
            raise RuntimeError("no free slot")
        if seq.media is not None:
            tokenized = self._take_media(seq)
            key = tokenized.leading_tokens
        else:
            tokenized, key = None, seq.prompt
        slot, shared = self._choose(free, key)
        # at least the last prompt token is evaluated again: its logits start sampling
        limit = len(key) if tokenized is not None else len(key) - 1
        reuse = self._truncate(slot, min(shared, limit))
        slot.owner, slot.logits_index = seq, -1
        self._by_seq[seq] = slot
        try:
            if tokenized is None:
                slot.pending = seq.prompt[reuse:]
            else:
                self._evaluate_media(seq, slot, tokenized, reuse)
            slot.sampler = _Sampler(
                self._lib,
                seq.sampling,
                vocab=self._vocab,
                n_vocab=self.n_vocab,
                max_tokens=seq.max_new_tokens,
            )
        except BaseException:
            self._by_seq.pop(seq, None)
            slot.owner = None
            self._forget(slot)
            raise
        finally:
            if tokenized is not None:
                tokenized.free()
        seq.cached_tokens = reuse
        return slot

    def _choose(self, free: list[_Slot], key: list[int]) -> tuple[_Slot, int]:
        """The free slot that best trades cached prefix against a compact range of busy slots, and the
        length of the prefix its cache shares with `key`.

        llama.cpp evaluates a step over the contiguous range of sequence streams from the lowest to the
        highest busy slot, used or not: four sequences in slots 0, 2, 4, 6 cost a step about as much as
        eight (measured 33 vs 35 ms, against 24 ms in slots 0-3). So each slot that a choice adds to that
        range counts as `SPAN_COST` prompt tokens that would have to be evaluated again; a longer cached
        prefix than that elsewhere still wins. Ties go to the lowest slot, which keeps the range compact
        for the requests that follow.
        """
        busy = [s.seq_id for s in self._slots if s.owner is not None]
        low, high = (min(busy), max(busy)) if busy else (len(self._slots), -1)
        best: tuple[int, int, _Slot, int] | None = None
        for slot in free:
            shared = _common_prefix(slot.tokens, key)
            span = max(high, slot.seq_id) - min(low, slot.seq_id) + 1
            score = shared - SPAN_COST * span
            if best is None or (score, -slot.seq_id) > best[:2]:
                best = (score, -slot.seq_id, slot, shared)
        assert best is not None, "called with at least one free slot"
        return best[2], best[3]

    def _truncate(self, slot: _Slot, reuse: int) -> int:
        """Keep the first `reuse` KV cells of `slot`, drop the rest; returns what was kept."""
        if reuse > 0 and not self._lib.llama_memory_seq_rm(self._memory, slot.seq_id, reuse, -1):
            reuse = 0  # this model's memory cannot be truncated (recurrent): start over
        if reuse == 0:
            self._lib.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
        slot.tokens = slot.tokens[:reuse]
        return reuse

    def _forget(self, slot: _Slot) -> None:
        self._lib.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
        slot.tokens, slot.pending, slot.logits_index = [], [], -1

    def _take_media(self, seq: Sequence) -> Any:
        if self._vision is None:
            raise UpstreamError("This model has no vision projector.")
        media = seq.media
        tokenized = self._vision.take(media.text, media.images, add_special=media.add_special)
        counts = tokenized.counts
        seq.media_prompt_tokens, seq.image_tokens = counts.total, counts.image  # what is decoded
        return tokenized

    def _evaluate_media(self, seq: Sequence, slot: _Slot, tokenized: Any, reuse: int) -> None:
        """All chunks but the last token through libmtmd into the slot; that token joins the batch."""
        assert self._vision is not None
        leading = tokenized.leading_tokens
        n_past, last = self._vision.evaluate(
            tokenized, ctx=self._ctx, seq_id=slot.seq_id, n_past=reuse, skip=reuse, n_batch=N_BATCH
        )
        slot.tokens = leading[: min(len(leading), n_past)] + [_IMAGE] * max(0, n_past - len(leading))
        slot.pending = [last]
        seq.evaluated += n_past - reuse


def _common_prefix(cached: list[int], tokens: list[int]) -> int:
    n = 0
    for a, b in zip(cached, tokens, strict=False):
        if a != b:  # _IMAGE equals no token id: reuse stops at the first image
            break
        n += 1
    return n
