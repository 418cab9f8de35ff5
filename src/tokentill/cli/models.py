"""`tokentill models`: list and download known-good small vision models (logic in `models_pull`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from tokentill.cli._common import load_settings
from tokentill.models_pull import DEFAULT_BASE_URL, REGISTRY, Progress, PullError, catalog_entry, pull


class _Bar(Progress):
    """One click progress bar per file, drawn on stderr so stdout carries only the catalogue entry."""

    def __init__(self) -> None:
        self._bar: Any = None

    def start(self, filename: str, total: int | None, already: int) -> None:
        # An unknown size (no Content-Length) draws a bar without a percentage.
        self._bar = click.progressbar(length=total or 0, label=filename, file=sys.stderr)
        self._bar.__enter__()
        if already:
            self._bar.update(already)

    def advance(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def finish(self) -> None:
        bar, self._bar = self._bar, None
        if bar is not None:
            bar.__exit__(None, None, None)


@click.group()
def models() -> None:
    """Known-good small vision models: list them, download one."""


@models.command("list")
def list_models() -> None:
    """Show the models `tokentill models pull` knows."""
    for model in REGISTRY.values():
        click.echo(f"{model.name:16} {model.description}")


@models.command("pull")
@click.argument("name", type=click.Choice(sorted(REGISTRY)))
@click.option(
    "--dest",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder for the files [default: TOKENTILL_DATA_DIR/models/NAME].",
)
@click.option(
    "--base-url",
    envvar="TOKENTILL_MODELS_BASE_URL",
    default=DEFAULT_BASE_URL,
    hidden=True,
    help="Hub (or mirror) to download from.",
)
@click.option(
    "--no-verify",
    is_flag=True,
    help="Accept a file for which no SHA-256 is known (none pinned, no X-Linked-Etag) unverified. "
    "A known SHA-256 is still checked.",
)
def pull_model(name: str, dest: Path | None, base_url: str, no_verify: bool) -> None:
    """Download NAME's GGUF weights and vision projector, verify them, print the catalogue entry."""
    model = REGISTRY[name]
    folder = dest if dest is not None else load_settings().data_dir / "models" / name
    try:
        pulled = pull(model, folder, base_url=base_url, progress=_Bar(), verify=not no_verify)
    except PullError as exc:
        raise click.ClickException(str(exc)) from exc
    except OSError as exc:
        raise click.ClickException(f"cannot write to {folder}: {exc}") from exc
    for filename in pulled.unverified:
        click.echo(f"Warning: {filename} was NOT verified (no SHA-256 known, --no-verify).", err=True)
    verified = "downloaded" if pulled.unverified else "downloaded and verified"
    click.echo(f"{name} {verified} into {folder}. Add this to your TOKENTILL_CONFIG file:\n", err=True)
    click.echo(catalog_entry(model, pulled.weights, pulled.mmproj))
