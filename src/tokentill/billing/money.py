"""Credits as integers: 1 credit = 1,000,000 micro-credits (µcr). No floats anywhere.

`parse_credits` turns what an operator types ("0.25", "10") into µcr exactly, or refuses it;
`format_credits` renders µcr as decimal credits for messages, headers and the CLI. `parse_credits` and the
constants live in `settings` (which validates `TOKENTILL_INITIAL_CREDITS` with it and imports nothing of
tokentill's) and are re-exported here, where their callers look for them.
"""

from __future__ import annotations

from tokentill.settings import MAX_UCR, UCR_PER_CREDIT, parse_credits

__all__ = ["MAX_UCR", "UCR_PER_CREDIT", "format_credits", "parse_credits"]


def format_credits(ucr: int) -> str:
    """µcr → decimal credits, trailing zeros trimmed: 9999850 → "9.99985", 15 → "0.000015", 0 → "0"."""
    sign = "-" if ucr < 0 else ""
    whole, frac = divmod(abs(ucr), UCR_PER_CREDIT)
    digits = f"{frac:06d}".rstrip("0")
    return f"{sign}{whole}.{digits}" if digits else f"{sign}{whole}"
