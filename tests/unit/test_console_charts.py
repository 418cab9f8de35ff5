"""The console's chart geometry and session cookies, without a server."""

from __future__ import annotations

from tokentill.api.console.charts import BOTTOM, OTHERS, TOP, nice_step, stacked_bars
from tokentill.api.console.session import SessionCodec

DAYS = ["2026-12-01", "2026-12-02", "2026-12-03"]


def test_nice_steps() -> None:
    assert [nice_step(x) for x in (0, 1, 1.5, 3, 7, 12, 45, 99, 101, 2500)] == [
        1,
        1,
        2,
        5,
        10,
        20,
        50,
        100,
        200,
        5000,
    ]


def test_stacked_bars_sum_and_scale() -> None:
    points = {("2026-12-01", "a"): 30, ("2026-12-01", "b"): 10, ("2026-12-03", "a"): 5}
    chart = stacked_bars(chart_id="t", title="T", unit="tokens", days=DAYS, points=points, fmt=str)
    assert chart.total == 45 and chart.total_text == "45"
    assert [(e.name, e.total) for e in chart.legend] == [("a", "35"), ("b", "10")]
    # The tallest day (40) fits under the top tick, which is a nice number; bars stack without gaps.
    assert chart.y_ticks[0].label == "0" and int(chart.y_ticks[-1].label) >= 40
    first_day = [s for s in chart.segments if s.title.startswith("2026-12-01")]
    assert len(first_day) == 2
    lower, upper = first_day
    assert abs(lower.y + lower.height - BOTTOM) < 0.01 and abs(upper.y + upper.height - lower.y) < 0.01
    assert all(TOP - 0.01 <= s.y for s in chart.segments)
    assert "day total 40 tokens" in lower.title
    assert [t.label for t in chart.x_ticks] == ["12-01", "12-02", "12-03"]


def test_many_series_fold_into_others_and_empty_charts() -> None:
    points = {("2026-12-02", f"m{i}"): 100 - i for i in range(10)}
    chart = stacked_bars(chart_id="t", title="T", unit="credits", days=DAYS, points=points, fmt=str)
    names = [e.name for e in chart.legend]
    assert names[:7] == [f"m{i}" for i in range(7)] and names[-1] == OTHERS
    assert chart.legend[-1].total == str(93 + 92 + 91) and chart.total == sum(points.values())
    empty = stacked_bars(chart_id="e", title="E", unit="credits", days=DAYS, points={}, fmt=str)
    assert empty.empty and not empty.segments and empty.legend == []


def test_session_cookies_are_signed_and_expire() -> None:
    codec = SessionCodec("secret-one")
    cookie = codec.issue("key", "abcd1234", ttl_s=60, now=1000)
    session = codec.read(cookie, now=1030)
    assert session is not None and session.kind == "key" and session.subject == "abcd1234"
    assert codec.read(cookie, now=1061) is None  # expired
    assert SessionCodec("secret-two").read(cookie, now=1030) is None  # another server's secret
    version, payload, mac = cookie.split(".")
    assert codec.read(f"{version}.{payload}x.{mac}", now=1030) is None
    assert codec.read("garbage", now=1030) is None and codec.read(None) is None
    nonce = codec.new_nonce()
    assert codec.csrf_ok(nonce, codec.csrf_token(nonce))
    assert not codec.csrf_ok(nonce, codec.csrf_token(codec.new_nonce())) and not codec.csrf_ok(None, "x")
