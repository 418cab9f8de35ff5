"""`tokentill accounts …` and `tokentill credits …`."""

from __future__ import annotations

import click

from tokentill.billing.ledger import AccountExists
from tokentill.billing.money import format_credits, parse_credits
from tokentill.cli._common import Stores, emit, json_option, with_stores
from tokentill.names import MAX_NAME_CHARS, name_problem


def _credits(value: str, hint: str) -> int:
    try:
        return parse_credits(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=hint) from None


def _account_name(name: str) -> str:
    # The ledger's own rule (tokentill.names), checked before any database is opened.
    problem = name_problem(name)
    if problem is not None:
        raise click.BadParameter(
            f"{problem}; account names are 1-{MAX_NAME_CHARS} characters, printable, without surrounding "
            "whitespace",
            param_hint="NAME",
        )
    return name


@click.group()
def accounts() -> None:
    """Create and list accounts (each holds a credit balance)."""


@accounts.command("create")
@click.argument("name")
@click.option("--credits", "credits_", default="0", show_default=True, help="Starting credits, e.g. 0.25.")
@json_option
def create(name: str, credits_: str, as_json: bool) -> None:
    """Create account NAME."""
    _account_name(name)
    amount = _credits(credits_, "--credits")

    async def run(s: Stores) -> None:
        try:
            account = await s.ledger.create_account(name, amount)
        except AccountExists as exc:
            raise click.ClickException(f"account {name!r} already exists") from exc
        balance = format_credits(account.balance)
        emit(as_json, f"created account {name} with {balance} credits", {"account": name, "balance": balance})

    with_stores(run)


@accounts.command("list")
@json_option
def list_(as_json: bool) -> None:
    """List accounts and balances."""

    async def run(s: Stores) -> None:
        rows = await s.ledger.list_accounts()
        lines = [f"{a.name:<24} {format_credits(a.balance):>16} credits" for a in rows]
        emit(
            as_json,
            "\n".join(lines) or "no accounts",
            {"accounts": [{"name": a.name, "balance": format_credits(a.balance)} for a in rows]},
        )

    with_stores(run)


@click.group()
def credits() -> None:
    """Add credits to an account."""


@credits.command("add")
@click.argument("name")
@click.argument("amount")
@json_option
def add(name: str, amount: str, as_json: bool) -> None:
    """Add AMOUNT credits (a decimal such as 0.25) to account NAME."""
    value = _credits(amount, "AMOUNT")
    if value <= 0:
        raise click.BadParameter("must be more than 0", param_hint="AMOUNT")

    async def run(s: Stores) -> None:
        try:
            balance = await s.ledger.add_credits(name, value, note="cli")
        except LookupError as exc:
            raise click.ClickException(f"no account named {name!r}") from exc
        text = format_credits(balance)
        emit(as_json, f"{name}: balance {text} credits", {"account": name, "balance": text})

    with_stores(run)
