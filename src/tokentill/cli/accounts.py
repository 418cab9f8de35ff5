"""`tokentill accounts …` and `tokentill credits …`."""

from __future__ import annotations

import click

from tokentill.billing.ledger import AccountExists, BalanceRefused
from tokentill.billing.money import format_credits, parse_credits
from tokentill.billing.records import MAX_NOTE
from tokentill.cli._common import Stores, emit, json_option, with_stores
from tokentill.names import MAX_NAME_CHARS, name_problem


def _credits(value: str, hint: str, when_negative: str = "") -> int:
    try:
        return parse_credits(value)
    except ValueError as exc:
        message = f"{exc}; {when_negative}" if when_negative and value.strip().startswith("-") else str(exc)
        raise click.BadParameter(message, param_hint=hint) from None


def _amount(value: str, when_negative: str) -> int:
    amount = _credits(value, "AMOUNT", when_negative)
    if amount <= 0:
        raise click.BadParameter("must be more than 0", param_hint="AMOUNT")
    return amount


def _note(note: str) -> str:
    problem = name_problem(note, max_chars=MAX_NOTE)  # the ledger's rule, checked before the database
    if problem is not None:
        raise click.BadParameter(
            f"{problem}; a note is 1-{MAX_NOTE} printable characters without surrounding whitespace",
            param_hint="--note",
        )
    return note


# A negative AMOUNT (`credits add acme -5`) reaches the command as an argument instead of failing as an
# unknown option, so the error can name the command that takes credits away.
_NEGATIVE_AS_ARGUMENT = {"ignore_unknown_options": True}
_DEBIT_HINT = "to take credits away, use `tokentill credits debit NAME AMOUNT --note TEXT`"
_note_option = click.option(
    "--note", required=True, help="Why (kept on the ledger row), e.g. a ticket number."
)


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
    """Add, refund or debit an account's credits (each change is one ledger row)."""


@credits.command("add", context_settings=_NEGATIVE_AS_ARGUMENT)
@click.argument("name")
@click.argument("amount")
@json_option
def add(name: str, amount: str, as_json: bool) -> None:
    """Add AMOUNT credits (a decimal such as 0.25) to account NAME."""
    value = _amount(amount, _DEBIT_HINT)

    async def run(s: Stores) -> None:
        try:
            balance = await s.ledger.add_credits(name, value, note="cli")
        except LookupError as exc:
            raise click.ClickException(f"no account named {name!r}") from exc
        text = format_credits(balance)
        emit(as_json, f"{name}: balance {text} credits", {"account": name, "balance": text})

    with_stores(run)


@credits.command("refund", context_settings=_NEGATIVE_AS_ARGUMENT)
@click.argument("name")
@click.argument("amount")
@_note_option
@json_option
def refund(name: str, amount: str, note: str, as_json: bool) -> None:
    """Give AMOUNT credits back to account NAME, with a --note saying why."""
    _adjust("refunded", name, _amount(amount, _DEBIT_HINT), _note(note), as_json)


@credits.command("debit", context_settings=_NEGATIVE_AS_ARGUMENT)
@click.argument("name")
@click.argument("amount")
@_note_option
@json_option
def debit(name: str, amount: str, note: str, as_json: bool) -> None:
    """Take AMOUNT credits from account NAME, with a --note saying why; never below a zero balance."""
    value = _amount(amount, "AMOUNT is what to take away, a positive number")
    _adjust("debited", name, value, _note(note), as_json)


def _adjust(done: str, name: str, value: int, note: str, as_json: bool) -> None:
    async def run(s: Stores) -> None:
        change = s.ledger.refund if done == "refunded" else s.ledger.debit
        try:
            balance = await change(name, value, note=note)
        except LookupError as exc:
            raise click.ClickException(f"no account named {name!r}") from exc
        except BalanceRefused as exc:
            raise click.ClickException(str(exc)) from exc
        amount, text = format_credits(value), format_credits(balance)
        emit(
            as_json,
            f"{name}: {done} {amount} credits, balance {text} credits",
            {"account": name, done: amount, "balance": text, "note": note},
        )

    with_stores(run)
