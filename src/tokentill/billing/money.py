"""Credits as integers: 1 credit = 1,000,000 micro-credits (µcr). No floats anywhere.

`parse_credits` turns what an operator types ("0.25", "10") into µcr exactly, or refuses it;
`format_credits` renders µcr as decimal credits for messages, headers and the CLI.
"""

from __future__ import annotations

from decimal import Decimal, Inexact, InvalidOperation, localcontext

__all__ = ["MAX_UCR", "UCR_PER_CREDIT", "format_credits", "parse_credits"]

UCR_PER_CREDIT = 1_000_000
MAX_UCR = 2**63 - 1  # the BIGINT column's limit


def parse_credits(text: str) -> int:
    """Decimal credits → µcr, exactly: "0.25" → 250000, "10" → 10000000.

    Raises `ValueError` for text that is not a finite decimal number, a negative amount, more precision
    than one µcr (trailing zeros are fine: "1.50000000" is exact), or more than a BIGINT holds.
    """
    try:
        value = Decimal(text.strip())
    except InvalidOperation:
        raise ValueError(f"not a number of credits: {_shown(text)}") from None
    if not value.is_finite():
        raise ValueError(f"not a number of credits: {_shown(text)}")
    if value < 0:
        raise ValueError(f"credits cannot be negative: {_shown(text)}")
    if value.adjusted() > 18:  # over 10**18 credits: past any BIGINT of µcr (also keeps 1e999999 cheap)
        raise ValueError(f"too many credits: {_shown(text)}")
    too_fine = ValueError(f"credits have at most 6 decimals (1 µcr = 0.000001): {_shown(text)}")
    with localcontext() as ctx:
        ctx.prec = 60  # room for every amount that passed the check above, with 6 decimals to spare
        ctx.traps[Inexact] = True  # more significant digits than that can only be a too-fine fraction
        try:
            ucr = value * UCR_PER_CREDIT
        except Inexact:
            raise too_fine from None
    if ucr != ucr.to_integral_value():
        raise too_fine
    if ucr > MAX_UCR:
        raise ValueError(f"too many credits: {_shown(text)}")
    return int(ucr)


def _shown(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:40] + "…")


def format_credits(ucr: int) -> str:
    """µcr → decimal credits, trailing zeros trimmed: 9999850 → "9.99985", 15 → "0.000015", 0 → "0"."""
    sign = "-" if ucr < 0 else ""
    whole, frac = divmod(abs(ucr), UCR_PER_CREDIT)
    digits = f"{frac:06d}".rstrip("0")
    return f"{sign}{whole}.{digits}" if digits else f"{sign}{whole}"
