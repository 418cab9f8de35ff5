from __future__ import annotations

import pytest

from tokentill.billing.money import MAX_UCR, format_credits, parse_credits
from tokentill.billing.pricing import UNLIMITED_TOKENS, affordable_completion_tokens, cost


@pytest.mark.parametrize(
    ("text", "ucr"),
    [
        ("0.25", 250_000),
        ("10", 10_000_000),
        ("0", 0),
        ("0.000001", 1),
        (" 1.5 ", 1_500_000),
        ("1.50000000", 1_500_000),
        ("1e2", 100_000_000),
        ("9.99985", 9_999_850),
        ("123456789.123456", 123_456_789_123_456),
    ],
)
def test_parse_credits(text: str, ucr: int) -> None:
    assert parse_credits(text) == ucr


@pytest.mark.parametrize(
    "text", ["", " ", "abc", "-1", "-0.000001", "NaN", "inf", "-inf", "0.0000001", "1.2345678", "1e30", "1,5"]
)
def test_parse_credits_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_credits(text)


@pytest.mark.parametrize(
    ("ucr", "text"),
    [
        (9_999_850, "9.99985"),
        (10_000_000, "10"),
        (15, "0.000015"),
        (0, "0"),
        (1, "0.000001"),
        (480, "0.00048"),
        (-2_500_000, "-2.5"),
        (MAX_UCR, "9223372036854.775807"),
    ],
)
def test_format_credits(ucr: int, text: str) -> None:
    assert format_credits(ucr) == text


@pytest.mark.parametrize("ucr", [0, 1, 7, 999_999, 1_000_000, 1_000_001, 123_456_789, MAX_UCR])
def test_round_trip(ucr: int) -> None:
    assert parse_credits(format_credits(ucr)) == ucr


def test_cost() -> None:
    assert cost(32, 8, 15, 60) == 32 * 15 + 8 * 60
    assert cost(0, 0, 15, 60) == 0
    with pytest.raises(ValueError):
        cost(-1, 0, 15, 60)


def test_affordable_completion_tokens() -> None:
    # 1000 µcr; prompt 10 × 15 = 150; (1000 - 150) // 60 = 14
    assert affordable_completion_tokens(1000, 10, 15, 60) == 14
    assert cost(10, 14, 15, 60) <= 1000 < cost(10, 15, 15, 60)
    assert affordable_completion_tokens(150, 10, 15, 60) == 0
    assert affordable_completion_tokens(100, 10, 15, 60) < 0
    assert affordable_completion_tokens(1000, 10, 15, 0) == UNLIMITED_TOKENS
    assert affordable_completion_tokens(100, 10, 15, 0) < 1
    assert affordable_completion_tokens(0, 0, 0, 0) == UNLIMITED_TOKENS
