"""How many threads llama.cpp decodes with: `ThreadTuner`, measured on the engine's own decode steps.

Why it adapts: llama.cpp's workers meet at a barrier hundreds of times per token. On a quiet machine all
cores with briefly spinning workers decode fastest (2 threads ≈ 2× one on 2 cores); beside a CPU hog a
worker that lost its core stalls every barrier, and one thread fewer is faster (docs/performance.md,
"Busy machine"). No fixed count is right for both, so the decode loop measures.

How: the tuner runs at `maximum` and, after a little decoding (`FIRST_PROBE_S` of measured step time,
doubling after each probe that changes nothing, up to `MAX_INTERVAL_S` at `maximum` and
`RECOVERY_INTERVAL_S` below it, where the load that pushed it down may have gone), probes one neighbour
count (one fewer; one more when below `maximum`; alternately when both exist). Between probes it watches
its own steps: when the recent ones of a row count run `JUMP` slower or faster than that count's
baseline (a hog arrived, or left), it probes at once instead of waiting out the interval; so on a
steady machine probes stay rare (a probe's slower steps are a few per cent of a minute of batched
decoding at most) and a change of load is still followed within a few steps. A probe alternates steps
between the current count and the candidate, so a load that changes during the probe costs both alike,
until `PROBE_STEPS` comparable steps of each share one row count. Comparable: no prompt chunk evaluated
in that step, and the same number of decode rows (a step's cost grows with its rows). The candidate wins
only if its median step is more than `MARGIN` faster; then the interval starts again from `FIRST_PROBE_S`.
The median, not the mean: on a machine whose cores are all in use, any other thread that wakes (the event
loop, the database writer, a client) preempts one worker and that step stalls at its barriers, often
doubling it. One such step among four made the mean prefer one thread fewer, wrongly (under the natural
workload of bench/batching.py, 1 thread decoded 8 rows in 170 ms against 104 ms at 2, and the wrong
switches cost about 8 % of the run; docs/performance.md, "Engine, fourth pass").

Pure logic: the caller times its steps (`observe`) and applies `threads` before the next one. The thread
count does not change outputs: ggml's CPU kernels give each output element to one thread, and logits at
1, 2 and 3 threads were bit-identical (docs/performance.md, "Same outputs, by construction").
"""

from __future__ import annotations

import logging
import statistics

__all__ = [
    "FIRST_PROBE_S",
    "JUMP",
    "MARGIN",
    "MAX_INTERVAL_S",
    "PROBE_STEPS",
    "RECOVERY_INTERVAL_S",
    "ThreadTuner",
]

logger = logging.getLogger(__name__)

FIRST_PROBE_S = 1.0  # seconds of decode steps before the first probe, and after a switch
MAX_INTERVAL_S = 60.0  # the interval doubles after each probe that keeps the count, up to this
RECOVERY_INTERVAL_S = 8.0  # ... or up to this below `maximum`
JUMP = 0.3  # recent steps this much slower or faster than their baseline: probe now
_RECENT = 0.3  # weight of a new step in the recent mean (exponential)
_BASELINE = 0.05  # ... and in the baseline
_SETTLED = 8  # steps of a row count before its baseline is trusted
PROBE_STEPS = 4  # comparable steps per count in one probe
MARGIN = 0.15  # the candidate must be this much faster (median seconds per step) to be chosen
_GIVE_UP_STEPS = 16 * PROBE_STEPS  # a probe that found no comparable steps by then is abandoned


class ThreadTuner:
    """Chooses the thread count of each decode step from the measured duration of earlier ones.

    Not thread-safe: the decode thread calls `observe` and reads `threads`; `current` may be read from
    any thread (an int, for health reports).
    """

    def __init__(
        self,
        maximum: int,
        *,
        name: str = "",
        first_probe_s: float = FIRST_PROBE_S,
        max_interval_s: float = MAX_INTERVAL_S,
        recovery_interval_s: float = RECOVERY_INTERVAL_S,
        probe_steps: int = PROBE_STEPS,
        margin: float = MARGIN,
        jump: float = JUMP,
    ) -> None:
        if maximum < 1:
            raise ValueError("maximum must be at least 1")
        self.maximum = maximum
        self.current = maximum  # the count chosen; `threads` differs from it only during a probe
        self._name = name
        self._first_probe_s = first_probe_s
        self._max_interval_s = max_interval_s
        self._recovery_interval_s = recovery_interval_s
        self._probe_steps = probe_steps
        self._margin = margin
        self._jump = jump
        # rows → (steps seen, recent mean, baseline mean) of steps at `current` since the last probe
        self._watch: dict[int, tuple[int, float, float]] = {}
        self._interval = first_probe_s
        self._since_probe = 0.0  # seconds of steps observed since the last probe ended
        self._downward = True  # the direction of the next probe, when both exist
        self._candidate: int | None = None  # the count being probed, None between probes
        self._next = maximum  # the count for the next step
        self._probe_len = 0  # steps observed in this probe
        # rows → (seconds at `current`, seconds at the candidate), comparable steps of this probe
        self._samples: dict[int, tuple[list[float], list[float]]] = {}

    @property
    def threads(self) -> int:
        """The thread count for the next step."""
        return self._next

    @property
    def probing(self) -> int | None:
        """The candidate count being probed, or None."""
        return self._candidate

    def observe(self, *, threads: int, rows: int, prompt: bool, seconds: float) -> None:
        """One decode step ran at `threads` with `rows` one-token rows (`prompt`: prompt chunks were also
        evaluated in that step) and took `seconds`."""
        if self.maximum == 1:
            return
        candidate = self._candidate
        if candidate is None:
            self._since_probe += seconds
            if self._since_probe >= self._interval or self._load_changed(threads, rows, prompt, seconds):
                self._start_probe()
            return
        self._probe_len += 1
        if not prompt and threads in (self.current, candidate):
            at_current, at_candidate = self._samples.setdefault(rows, ([], []))
            (at_current if threads == self.current else at_candidate).append(seconds)
            if len(at_current) >= self._probe_steps and len(at_candidate) >= self._probe_steps:
                self._decide(rows, statistics.median(at_current), statistics.median(at_candidate))
                return
        if self._probe_len >= _GIVE_UP_STEPS:
            self._end_probe(switched=False)
            return
        # alternate: the next step runs at the other count
        self._next = candidate if threads == self.current else self.current

    def _load_changed(self, threads: int, rows: int, prompt: bool, seconds: float) -> bool:
        """Whether this step's row count has lately run `jump` slower or faster than its baseline (not
        sooner than `first_probe_s` after the last probe)."""
        if prompt or threads != self.current:
            return False
        seen, recent, baseline = self._watch.get(rows, (0, seconds, seconds))
        seen += 1
        recent += _RECENT * (seconds - recent)
        baseline += _BASELINE * (seconds - baseline)
        self._watch[rows] = (seen, recent, baseline)
        if seen < _SETTLED or self._since_probe < self._first_probe_s:
            return False
        return abs(recent - baseline) > self._jump * baseline

    def _start_probe(self) -> None:
        down = self.current - 1 if self.current > 1 else None
        up = self.current + 1 if self.current < self.maximum else None
        if down is not None and up is not None:
            candidate = down if self._downward else up
            self._downward = not self._downward
        elif down is not None:
            candidate = down
        else:
            assert up is not None, "maximum > 1 leaves a neighbour"
            candidate = up
        self._candidate = self._next = candidate
        self._probe_len = 0
        self._samples = {}

    def _decide(self, rows: int, current_s: float, candidate_s: float) -> None:
        candidate = self._candidate
        assert candidate is not None
        if candidate_s * (1 + self._margin) < current_s:
            logger.info(
                "%sllama.cpp threads %d → %d: a decode step of %d rows took %.1f ms at %d, %.1f ms at %d",
                f"{self._name}: " if self._name else "", self.current, candidate, rows,
                current_s * 1e3, self.current, candidate_s * 1e3, candidate,
            )  # fmt: skip
            self.current = candidate
            self._end_probe(switched=True)
        else:
            self._end_probe(switched=False)

    def _end_probe(self, *, switched: bool) -> None:
        cap = self._max_interval_s if self.current == self.maximum else self._recovery_interval_s
        self._interval = self._first_probe_s if switched else min(cap, self._interval * 2)
        self._watch = {}
        self._candidate = None
        self._next = self.current
        self._since_probe = 0.0
        self._samples = {}
