"""Which free slot a new request takes (`BatchedLlamaRunner._choose`): cached prefix against a compact
range of busy slots. The policy only reads slot bookkeeping, so the runner is built without a model."""

from __future__ import annotations

from tokentill.engines.batch import SPAN_COST, BatchedLlamaRunner, _Slot


def _runner(busy: set[int], cached: dict[int, list[int]]) -> BatchedLlamaRunner:
    runner = object.__new__(BatchedLlamaRunner)
    slots = [_Slot(seq_id=i, tokens=list(cached.get(i, []))) for i in range(8)]
    for slot in slots:
        if slot.seq_id in busy:
            slot.owner = object()  # type: ignore[assignment]
    runner._slots = slots
    return runner


def _pick(busy: set[int], cached: dict[int, list[int]], prompt: list[int]) -> int:
    runner = _runner(busy, cached)
    free = [s for s in runner._slots if s.owner is None]
    slot, _ = runner._choose(free, prompt)
    return slot.seq_id


def test_idle_engine_takes_the_longest_cached_prefix() -> None:
    prompt = list(range(50))
    assert _pick(set(), {5: prompt[:40], 2: prompt[:10]}, prompt) == 5


def test_ties_go_to_the_lowest_slot() -> None:
    assert _pick(set(), {}, [1, 2, 3]) == 0
    assert _pick({0, 1}, {}, [1, 2, 3]) == 2


def test_a_short_shared_prefix_does_not_spread_the_busy_range() -> None:
    header = list(range(30))  # e.g. the chat template's opening, cached in every slot
    cached = {i: header + [1000 + i] for i in range(8)}
    assert _pick({0, 1, 2}, cached, header + [7, 8, 9]) == 3


def test_a_long_cached_prefix_is_worth_widening_the_range() -> None:
    history = list(range(6 * SPAN_COST))  # a long conversation cached in slot 7: widens 3 slots to 8
    assert _pick({0, 1}, {7: history}, history + [5]) == 7
    short = list(range(SPAN_COST))
    assert _pick({0, 1}, {7: short}, short + [5]) == 2
