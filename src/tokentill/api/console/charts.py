"""Stacked bar charts as geometry for server-side SVG: `stacked_bars` turns per-day, per-series integers into
bars, axis ticks and a legend; `templates/_chart.html` draws them (Jinja escapes every label).

No JavaScript and nothing fetched: the SVG scales with its container (viewBox), every bar segment carries a
`<title>` tooltip, and the legend and total are HTML beside it, so they stay readable on a phone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

__all__ = ["OTHERS", "PALETTE", "Chart", "LegendEntry", "Segment", "Tick", "nice_step", "stacked_bars"]

# Okabe–Ito-like colours that stay apart for colour-blind readers; the last one is for "others".
PALETTE = ("#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#8c6bb1", "#7f7f7f")
OTHERS = "others"
MAX_SERIES = len(PALETTE) - 1

WIDTH, HEIGHT = 640, 240
LEFT, RIGHT, TOP, BOTTOM = 74, WIDTH - 8, 10, HEIGHT - 28


@dataclass(frozen=True)
class Segment:
    x: float
    y: float
    width: float
    height: float
    color: str
    title: str


@dataclass(frozen=True)
class Tick:
    position: float
    label: str


@dataclass(frozen=True)
class LegendEntry:
    name: str
    color: str
    total: str


@dataclass(frozen=True)
class Chart:
    id: str
    title: str
    unit: str
    segments: list[Segment]
    y_ticks: list[Tick]
    x_ticks: list[Tick]
    legend: list[LegendEntry]
    total: int
    total_text: str
    description: str
    width: int = WIDTH
    height: int = HEIGHT
    left: int = LEFT
    right: int = RIGHT
    top: int = TOP
    bottom: int = BOTTOM

    @property
    def empty(self) -> bool:
        return self.total == 0


def nice_step(raw: float) -> int:
    """The smallest of 1, 2, 5 × 10^k (an integer, at least 1) that is >= raw."""
    if raw <= 1:
        return 1
    base = 10 ** math.floor(math.log10(raw))
    for multiple in (1, 2, 5, 10):
        if multiple * base >= raw:
            return int(multiple * base)
    return int(10 * base)  # pragma: no cover - the loop always returns


def _fold(totals: Mapping[str, int], fixed: Sequence[str] | None) -> tuple[list[str], dict[str, str]]:
    """Series in legend order and where each name is drawn: the biggest MAX_SERIES, the rest as OTHERS."""
    if fixed is not None:
        return list(fixed), {name: name for name in fixed}
    ranked = sorted(totals, key=lambda name: (-totals[name], name))
    kept = ranked[:MAX_SERIES] if len(ranked) > MAX_SERIES + 1 else ranked
    where = {name: name for name in kept}
    for name in ranked[len(kept) :]:
        where[name] = OTHERS
    return kept + ([OTHERS] if len(kept) < len(ranked) else []), where


def stacked_bars(
    *,
    chart_id: str,
    title: str,
    unit: str,
    days: Sequence[str],
    points: Mapping[tuple[str, str], int],
    fmt: Callable[[int], str],
    series: Sequence[str] | None = None,
) -> Chart:
    """One bar per day in `days` (ISO dates, oldest first), stacked by series; `points` maps (day, series)
    to a non-negative integer, `fmt` renders one (µcr → credits, tokens → "1,234"). `series` fixes the
    series and their order (kinds of tokens); otherwise the biggest seven series are drawn and the rest
    summed as "others"."""
    totals: dict[str, int] = {}
    for (_day, name), value in points.items():
        totals[name] = totals.get(name, 0) + value
    names, where = _fold(totals, series)
    colors = {
        name: PALETTE[-1] if name == OTHERS else PALETTE[i % MAX_SERIES] for i, name in enumerate(names)
    }
    stacks: dict[str, dict[str, int]] = {day: {} for day in days}
    for (day, name), value in points.items():
        if day in stacks and value > 0:
            drawn = where.get(name, OTHERS)
            stacks[day][drawn] = stacks[day].get(drawn, 0) + value
    day_totals = {day: sum(stack.values()) for day, stack in stacks.items()}
    peak = max(day_totals.values(), default=0)
    step = nice_step(peak / 4) if peak else 1
    top_value = step * max(1, math.ceil(peak / step))
    plot_height = BOTTOM - TOP
    slot = (RIGHT - LEFT) / max(1, len(days))
    bar_width = round(slot * 0.72, 2)

    segments: list[Segment] = []
    for i, day in enumerate(days):
        y = float(BOTTOM)
        x = round(LEFT + i * slot + (slot - bar_width) / 2, 2)
        for name in names:
            value = stacks[day].get(name, 0)
            if not value:
                continue
            height = value / top_value * plot_height
            y -= height
            tip = f"{day} · {name}: {fmt(value)} {unit} (day total {fmt(day_totals[day])} {unit})"
            segments.append(Segment(x, round(y, 2), bar_width, round(height, 2), colors[name], tip))

    y_ticks = [
        Tick(round(BOTTOM - v / top_value * plot_height, 2), fmt(v)) for v in range(0, top_value + 1, step)
    ]
    every = max(1, math.ceil(len(days) / 6))
    x_ticks = [
        Tick(round(LEFT + (i + 0.5) * slot, 2), day[5:])
        for i, day in enumerate(days)
        if i % every == 0 or i == len(days) - 1
    ]
    drawn_totals: dict[str, int] = {}
    for name, value in totals.items():
        drawn_totals[where.get(name, OTHERS)] = drawn_totals.get(where.get(name, OTHERS), 0) + value
    legend = [LegendEntry(name, colors[name], fmt(drawn_totals.get(name, 0))) for name in names]
    total = sum(totals.values())
    span = f"{days[0]} to {days[-1]}" if days else ""
    description = f"{title}, {span}: {fmt(total)} {unit} in all, " + ", ".join(
        f"{entry.name} {entry.total}" for entry in legend
    )
    return Chart(
        id=chart_id,
        title=title,
        unit=unit,
        segments=segments,
        y_ticks=y_ticks,
        x_ticks=x_ticks,
        legend=legend,
        total=total,
        total_text=fmt(total),
        description=description,
    )
