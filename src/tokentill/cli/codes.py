"""`tokentill codes …`: redemption codes, printed once at creation."""

from __future__ import annotations

import click

from tokentill.billing.codes import MAX_CODES_PER_BATCH
from tokentill.billing.money import format_credits, parse_credits
from tokentill.cli._common import Stores, emit, json_option, with_stores


@click.group()
def codes() -> None:
    """Create and list redemption codes (prepaid credits a key's account redeems once)."""


@codes.command("create")
@click.option("--credits", "credits_", required=True, help="Credits each code is worth, e.g. 5 or 0.25.")
@click.option(
    "--count",
    type=click.IntRange(1, MAX_CODES_PER_BATCH),
    default=1,
    show_default=True,
    help="How many codes.",
)
@click.option(
    "--expires", type=click.IntRange(min=1), default=None, help="Days until unredeemed codes expire."
)
@json_option
def create(credits_: str, count: int, expires: int | None, as_json: bool) -> None:
    """Create COUNT codes; each code is printed once and only its hash is stored."""
    try:
        amount = parse_credits(credits_)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--credits") from None
    if amount <= 0:
        raise click.BadParameter("must be more than 0", param_hint="--credits")

    async def run(s: Stores) -> None:
        created = await s.codes.create_codes(amount, count, expires)
        items = [c.to_dict() for c in created]
        until = f", expiring {created[0].expires_at:%Y-%m-%d %H:%M} UTC" if created[0].expires_at else ""
        text = "\n".join(c.code for c in created)
        text += f"\n\n{count} code(s) of {format_credits(amount)} credits{until}. Store them now: "
        text += "they are not shown again."
        emit(as_json, text, {"codes": items})

    with_stores(run)


@codes.command("list")
@json_option
def list_(as_json: bool) -> None:
    """List codes, newest first (ids and state, never the codes)."""

    async def run(s: Stores) -> None:
        rows = await s.codes.list_codes()
        lines = [
            f"{c.id}  {format_credits(c.credits):>12} cr  {c.status:<8} created {c.created_at:%Y-%m-%d}"
            + (f"  by {c.redeemed_by} ({c.redeemed_key_id})" if c.redeemed_by else "")
            for c in rows
        ]
        emit(as_json, "\n".join(lines) or "no codes", {"codes": [c.to_dict() for c in rows]})

    with_stores(run)
