"""Helpers shared by the command groups: settings from the environment, stores opened for one command.

Every command names the database it opened on stderr. Only `serve` and `init` create one: the others
refuse a database tokentill never set up, so a command pointed at the wrong TOKENTILL_DATA_DIR or
TOKENTILL_DATABASE_URL fails with the place it looked instead of working on a new, empty database.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import click
from pydantic import ValidationError
from sqlalchemy.exc import DBAPIError

from tokentill.auth.service import KeyStore
from tokentill.billing.codes import RedemptionCodes
from tokentill.billing.ledger import Ledger
from tokentill.errors import InvalidRequest
from tokentill.settings import Settings
from tokentill.storage.db import Database, DatabaseMissing, describe_url, open_database

T = TypeVar("T")

json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON object on the last line.")


@dataclass
class Stores:
    db: Database
    ledger: Ledger
    keys: KeyStore
    codes: RedemptionCodes


@contextlib.asynccontextmanager
async def stores(settings: Settings, *, create: bool = False) -> AsyncIterator[Stores]:
    """The stores on the database `settings` select, named on stderr; `create`: set it up if it is new."""
    url = settings.resolved_database_url
    try:
        db = await open_database(url, create=create)
    except DatabaseMissing as exc:
        where = f"TOKENTILL_DATA_DIR={settings.data_dir}"
        if settings.database_url:
            where = "TOKENTILL_DATABASE_URL"
        raise click.ClickException(
            f"{exc} (from {where}). Run `tokentill init` to create it there, or `tokentill serve`, which "
            "creates it on its first start; or point TOKENTILL_DATA_DIR / TOKENTILL_DATABASE_URL at the "
            "database your server uses."
        ) from None
    except (DBAPIError, OSError, TimeoutError) as exc:  # unreachable, no such database, refused login
        reason = str(exc.orig if isinstance(exc, DBAPIError) else exc).strip().splitlines()
        raise click.ClickException(
            f"cannot open the database {describe_url(url)}: {reason[0] if reason else type(exc).__name__}"
        ) from None
    click.echo(f"database: {describe_url(url)}", err=True)
    try:
        yield Stores(db=db, ledger=Ledger(db), keys=KeyStore(db), codes=RedemptionCodes(db))
    finally:
        await db.aclose()


def load_settings() -> Settings:
    """Settings from the environment; a bad value is a one-line error naming its TOKENTILL_* variable."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            message = error["msg"].removeprefix("Value error, ")
            if error["loc"]:
                name = "TOKENTILL_" + "_".join(str(part) for part in error["loc"]).upper()
                secret = name.endswith(("_URL", "_KEY"))  # may hold a password: never echoed
                shown = "" if secret else f"={str(error.get('input'))[:40]!r}"
                problems.append(f"{name}{shown}: {message}")
            else:  # a check across fields
                problems.append(message)
        raise click.ClickException("invalid configuration: " + "; ".join(problems)) from None


def with_stores(func: Callable[[Stores], Awaitable[T]]) -> T:
    """Run one async action against the database the environment selects.

    Input a service refuses (`InvalidRequest`: a name, label or model id that `tokentill.names`
    refuses) is a one-line usage error, as over HTTP it is a 400.
    """
    settings = load_settings()

    async def main() -> T:
        async with stores(settings) as s:
            return await func(s)

    try:
        return asyncio.run(main())
    except InvalidRequest as exc:
        raise click.UsageError(exc.message) from None


def emit(as_json: bool, text: str, obj: dict[str, Any] | list[Any]) -> None:
    if as_json:
        click.echo(json.dumps(obj, default=str))
    else:
        click.echo(text)
