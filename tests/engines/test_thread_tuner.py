"""`ThreadTuner`'s decisions, driven by made-up step timings (no model, no clock, no machine speed)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest

from tokentill.engines.threads import ThreadTuner

# Seconds per decode step by thread count, shaped like the 2-core measurements in docs/performance.md.
QUIET = {2: 0.010, 1: 0.018}  # both cores free: 2 threads almost twice as fast
HOG = {2: 0.060, 1: 0.020}  # one core taken by a CPU hog: the second worker stalls every barrier

Cost = Callable[[int], float]


def run(tuner: ThreadTuner, cost: dict[int, float] | Cost, *, seconds: float, rows: int = 1) -> list[int]:
    """Decode steps for `seconds` of step time; returns the thread count of every step."""
    at = cost if callable(cost) else cost.__getitem__
    used: list[int] = []
    total = 0.0
    while total < seconds:
        threads = tuner.threads
        step = at(threads)
        tuner.observe(threads=threads, rows=rows, prompt=False, seconds=step)
        used.append(threads)
        total += step
    return used


def test_a_quiet_machine_keeps_every_core_and_probes_rarely() -> None:
    tuner = ThreadTuner(2)
    used = run(tuner, QUIET, seconds=120)
    assert tuner.current == 2 and tuner.threads in (1, 2)
    # Probes back off (1, 2, 4, ... up to 60 s of decoding apart): the slower count ran in well under 1 %
    # of the steps.
    assert used.count(1) / len(used) < 0.01
    assert used.count(1) > 0  # it did probe


def test_beside_a_hog_it_switches_down_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    tuner = ThreadTuner(2, name="smol")
    with caplog.at_level(logging.INFO, logger="tokentill.engines.threads"):
        used = run(tuner, HOG, seconds=60)
    assert tuner.current == 1
    assert "smol: llama.cpp threads 2 → 1" in caplog.text
    # It keeps probing 2 threads (the hog may go), rarely: 2 threads ran in under 2 % of the steps.
    assert used.count(2) / len(used) < 0.02


def test_it_switches_back_up_when_the_hog_goes() -> None:
    tuner = ThreadTuner(2)
    run(tuner, HOG, seconds=60)
    assert tuner.current == 1
    run(tuner, QUIET, seconds=8 + 1)  # a probe comes at least every 8 s of decoding
    assert tuner.current == 2


def test_a_hog_arriving_after_a_long_quiet_spell_is_followed_at_once() -> None:
    """The interval has grown towards a minute; the steps slowing down trigger a probe anyway."""
    tuner = ThreadTuner(2)
    run(tuner, QUIET, seconds=120)
    steps = 0
    while tuner.current == 2 and steps < 100:
        threads = tuner.threads
        tuner.observe(threads=threads, rows=1, prompt=False, seconds=HOG[threads])
        steps += 1
    # A few steps for the recent mean to leave the baseline, then the probe's 4 + 4: under a second of
    # decoding, where the interval alone would have waited up to a minute.
    assert tuner.current == 1 and steps <= 16, steps


def test_a_steady_machine_with_jitter_probes_rarely() -> None:
    """Step times that wander ±10 % (a quiet machine's noise) do not look like a change of load."""
    tuner = ThreadTuner(2)
    jitter = [1.0, 1.08, 0.94, 1.1, 0.9, 1.03, 0.97, 1.06, 0.92, 1.0]
    steps = 0

    def cost(threads: int) -> float:
        nonlocal steps
        steps += 1
        return QUIET[threads] * jitter[steps % len(jitter)]

    used = run(tuner, cost, seconds=600)
    assert tuner.current == 2
    # Probes back off to one per minute: 4 steps at 1 thread each, 0.03 % of 10 minutes' steps.
    assert 0 < used.count(1) / len(used) < 0.001


def test_a_small_gain_does_not_switch() -> None:
    tuner = ThreadTuner(2)
    run(tuner, {2: 0.010, 1: 0.0090}, seconds=30)  # one thread 10 % faster: inside the margin
    assert tuner.current == 2


def test_a_preempted_step_among_the_probe_does_not_switch() -> None:
    """On cores that are all in use, another thread waking (the event loop, a client) now and then holds a
    worker off its core and that step stalls at its barriers: the stall costs the same 40 ms at either
    count, but here chance puts one on every 4th step at 2 threads, so every probe holds one. The mean of
    such a probe (0.020 s) makes 1 thread (0.016 s) look more than 15 % faster; the median (0.010 s) keeps
    2 threads, the faster count once the stall is set aside."""
    tuner = ThreadTuner(2)
    steps = {2: 0}

    def cost(threads: int) -> float:
        if threads == 1:
            return 0.016
        steps[2] += 1
        return 0.010 + (0.040 if steps[2] % 4 == 0 else 0.0)

    used = run(tuner, cost, seconds=60)
    assert tuner.current == 2
    assert used.count(1) / len(used) < 0.02


def test_steps_with_prompt_chunks_are_not_compared() -> None:
    tuner = ThreadTuner(2)
    total = 0.0
    while total < 30:  # every step evaluates a prompt chunk too, and 1 thread looks far faster
        threads = tuner.threads
        step = HOG[threads]
        tuner.observe(threads=threads, rows=1, prompt=True, seconds=step)
        total += step
    assert tuner.current == 2


def test_steps_of_different_row_counts_are_not_compared() -> None:
    tuner = ThreadTuner(2)
    total = 0.0
    while total < 30:  # 1-thread steps happen to hold one row, 2-thread steps eight
        threads = tuner.threads
        step = {1: 0.005, 2: 0.040}[threads]
        tuner.observe(threads=threads, rows=1 if threads == 1 else 8, prompt=False, seconds=step)
        total += step
    assert tuner.current == 2


def test_comparable_steps_are_paired_by_row_count_among_others() -> None:
    tuner = ThreadTuner(2)
    steps = 0
    total = 0.0
    while total < 5:  # the row count cycles, as requests come and go; at every count 1 thread wins
        threads = tuner.threads
        rows = 1 + steps % 3
        step = rows * HOG[threads]
        tuner.observe(threads=threads, rows=rows, prompt=steps % 5 == 0, seconds=step)
        total += step
        steps += 1
    assert tuner.current == 1


def test_more_cores_step_down_one_at_a_time_to_the_best_count() -> None:
    tuner = ThreadTuner(4)
    run(tuner, {4: 0.050, 3: 0.020, 2: 0.025, 1: 0.040}, seconds=60)
    assert tuner.current == 3


def test_one_thread_is_never_probed() -> None:
    tuner = ThreadTuner(1)
    assert set(run(tuner, {1: 0.02}, seconds=30)) == {1}
    assert tuner.probing is None
