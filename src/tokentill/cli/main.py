"""`tokentill`: the entry point and `tokentill serve`."""

from __future__ import annotations

import asyncio
import logging
import os

import click
import uvicorn

from tokentill.billing.money import format_credits, parse_credits
from tokentill.catalog import CatalogError, load_catalog
from tokentill.cli._common import stores
from tokentill.cli.accounts import accounts, credits
from tokentill.cli.keys import keys
from tokentill.cli.models import models
from tokentill.cli.usage import usage
from tokentill.settings import Settings


@click.group()
@click.version_option(package_name="tokentill")
def cli() -> None:
    """tokentill: a metered, OpenAI-compatible API for reasoning + vision models.

    Every option also reads a TOKENTILL_* environment variable (see docs/configuration.md).
    """


async def _bootstrap(settings: Settings) -> None:
    """On an empty database: account `default` with the starting credits and one key, printed once."""
    async with stores(settings) as s:
        if await s.ledger.count_accounts() > 0:
            return
        amount = parse_credits(settings.initial_credits)
        await s.ledger.create_account("default", amount)
        created = await s.keys.create_key("default", name="bootstrap")
        click.echo(
            f"Created account 'default' with {format_credits(amount)} credits and its first API key:\n\n"
            f"    {created.key}\n\nStore it now: it is not shown again.",
            err=True,
        )


@cli.command()
@click.option("--host", default=None, help="Address to listen on [TOKENTILL_HOST, default 127.0.0.1].")
@click.option("--port", type=int, default=None, help="Port [TOKENTILL_PORT, default 8000].")
@click.option(
    "--workers", type=click.IntRange(min=1), default=None, help="Worker processes [TOKENTILL_WORKERS]."
)
def serve(host: str | None, port: int | None, workers: int | None) -> None:
    """Start the HTTP API (models from TOKENTILL_CONFIG, or the built-in o1-preview)."""
    overrides = {k: v for k, v in {"host": host, "port": port, "workers": workers}.items() if v is not None}
    for name, value in overrides.items():
        # Worker processes rebuild Settings from the environment, so options travel as variables.
        os.environ[f"TOKENTILL_{name.upper()}"] = str(value)
    settings = Settings()
    try:
        load_catalog(settings.config)
    except CatalogError as exc:
        raise click.ClickException(str(exc)) from exc
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(_bootstrap(settings))
    uvicorn.run(
        "tokentill.app:create_app_from_env",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_level=settings.log_level,
        timeout_graceful_shutdown=10,
    )


cli.add_command(accounts)
cli.add_command(credits)
cli.add_command(keys)
cli.add_command(models)
cli.add_command(usage)
