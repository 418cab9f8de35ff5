"""`tokentill`: the entry point and `tokentill serve`."""

from __future__ import annotations

import asyncio
import contextlib
import logging.config
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import click
import uvicorn

from tokentill.billing.money import format_credits, parse_credits
from tokentill.bootstrap import bootstrap
from tokentill.catalog import CatalogError, load_catalog
from tokentill.cli._common import emit, json_option, load_settings, stores
from tokentill.cli.accounts import accounts, credits
from tokentill.cli.codes import codes
from tokentill.cli.keys import keys
from tokentill.cli.models import models
from tokentill.cli.usage import usage
from tokentill.settings import Settings
from tokentill.storage.db import DatabaseMissing, describe_url, open_database


@click.group()
@click.version_option(package_name="tokentill")
def cli() -> None:
    """tokentill: a metered, OpenAI-compatible API for reasoning + vision models.

    Every option also reads a TOKENTILL_* environment variable (see docs/configuration.md).
    """


async def _bootstrap(settings: Settings) -> None:
    """On an empty database: account `default` with the starting credits and one key, printed once."""
    async with stores(settings, create=True) as s:
        created = await bootstrap(s.db, parse_credits(settings.initial_credits))
    if created is not None:
        click.echo(
            f"Created account 'default' with {format_credits(created.balance)} credits and its first API "
            f"key:\n\n    {created.key}\n\nStore it now: it is not shown again.",
            err=True,
        )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _multiprocess_metrics(settings: Settings) -> Iterator[None]:
    """With several workers, give prometheus-client a fresh folder of its own under DATA_DIR/metrics for
    this serve (removed at exit; folders of dead serves are removed at start), so /metrics sums every
    worker. The variable must be set before a worker imports prometheus-client, hence here."""
    if settings.workers == 1 or settings.metrics_multiproc_dir is not None:
        yield  # one process: its own registry is the whole truth; a folder set by the user is theirs
        return
    parent = settings.data_dir / "metrics"
    parent.mkdir(parents=True, exist_ok=True)
    for old in parent.glob("serve-*"):
        pid = old.name.removeprefix("serve-")
        if not pid.isdigit() or not _pid_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    folder: Path = parent / f"serve-{os.getpid()}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)
    try:
        yield
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@cli.command()
@json_option
def init(as_json: bool) -> None:
    """Create the database (tables at the newest revision) if it does not exist yet; safe to repeat.

    `serve` does this on its first start; `init` is for managing accounts and keys before that.
    """
    url = load_settings().resolved_database_url

    async def main() -> bool:
        try:
            db = await open_database(url, create=False)
            created = False
        except DatabaseMissing:
            db = await open_database(url, create=True)
            created = True
        await db.aclose()
        return created

    created = asyncio.run(main())
    where = describe_url(url)
    text = f"database {where}: {'created' if created else 'is up to date'}"
    emit(as_json, text, {"database": where, "created": created})


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
    settings = load_settings()
    if settings.workers > 1 and not settings.redis_url:
        raise click.UsageError(
            f"--workers {settings.workers} needs TOKENTILL_REDIS_URL: without Redis every worker process "
            f"keeps its own rate limits, so each key would get {settings.workers}x its rpm, tpm and "
            "concurrency. Set TOKENTILL_REDIS_URL=redis://host:6379/0, or run one worker."
        )
    try:
        catalog = load_catalog(settings.config)
        for spec in catalog:
            if spec.engine == "upstream":
                from tokentill.engines.upstream_config import check_spec

                check_spec(spec)
    except CatalogError as exc:
        raise click.ClickException(str(exc)) from exc
    from tokentill.app import http_protocol, log_config  # the web stack loads only for `serve`

    logging.config.dictConfig(log_config(settings.log_level))
    asyncio.run(_bootstrap(settings))
    with _multiprocess_metrics(settings):
        uvicorn.run(
            "tokentill.app:create_app_from_env",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=settings.workers,
            timeout_worker_healthcheck=settings.worker_healthcheck_s,
            log_level=settings.log_level,
            log_config=log_config(settings.log_level),  # applied again in each worker process
            access_log=settings.access_log,
            timeout_graceful_shutdown=10,
            timeout_keep_alive=settings.keepalive_timeout_s,  # type: ignore[arg-type]  # a float works
            http=http_protocol(settings),  # read timeouts and the connection cap (api/connections.py)
        )


cli.add_command(accounts)
cli.add_command(codes)
cli.add_command(credits)
cli.add_command(keys)
cli.add_command(models)
cli.add_command(usage)
