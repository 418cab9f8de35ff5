"""`tokentill keys …`: API keys, shown once at creation."""

from __future__ import annotations

import click

from tokentill.auth.service import UNSET, _Unset
from tokentill.cli._common import Stores, emit, json_option, with_stores


def _models(value: str | None) -> list[str] | None:
    if value is None:
        return None
    models = [m.strip() for m in value.split(",") if m.strip()]
    if not models:
        raise click.BadParameter("give at least one model id", param_hint="--models")
    return models


@click.group()
def keys() -> None:
    """Create, list, limit and revoke API keys."""


@keys.command("create")
@click.option("--account", required=True, help="Account the key spends from.")
@click.option("--models", default=None, help="Comma-separated model ids the key may use (default: all).")
@click.option("--name", default=None, help="A label for the key.")
@click.option("--rpm", type=click.IntRange(min=1), default=None, help="Requests per minute.")
@click.option("--tpm", type=click.IntRange(min=1), default=None, help="Tokens per minute.")
@click.option("--max-concurrent", type=click.IntRange(min=1), default=None, help="Requests in flight.")
@json_option
def create(
    account: str,
    models: str | None,
    name: str | None,
    rpm: int | None,
    tpm: int | None,
    max_concurrent: int | None,
    as_json: bool,
) -> None:
    """Create a key; its secret is printed once and never stored."""
    allowed = _models(models)

    async def run(s: Stores) -> None:
        try:
            created = await s.keys.create_key(
                account, models=allowed, name=name, rpm=rpm, tpm=tpm, max_concurrent=max_concurrent
            )
        except LookupError as exc:
            raise click.ClickException(f"no account named {account!r}") from exc
        emit(
            as_json,
            f"{created.key}\n(key id {created.key_id}; store it now, it is not shown again)",
            {
                "key": created.key,
                "id": created.key_id,
                "account": account,
                "models": allowed,
                "name": name,
                "rpm": rpm,
                "tpm": tpm,
                "max_concurrent": max_concurrent,
            },
        )

    with_stores(run)


def _limits_text(rpm: int | None, tpm: int | None, max_concurrent: int | None) -> str:
    """`rpm=60 tpm=* concurrent=2`: `*` for no limit, as `models=*` is every model."""

    def shown(value: int | None) -> str:
        return "*" if value is None else str(value)

    return f"rpm={shown(rpm)} tpm={shown(tpm)} concurrent={shown(max_concurrent)}"


@keys.command("list")
@click.option("--account", default=None, help="Only this account's keys.")
@json_option
def list_(account: str | None, as_json: bool) -> None:
    """List keys (ids and settings, never secrets)."""

    async def run(s: Stores) -> None:
        rows = await s.keys.list_keys(account)
        items = [
            {
                "id": k.key_id,
                "account": k.account_name,
                "name": k.name,
                "models": k.models,
                "rpm": k.rpm,
                "tpm": k.tpm,
                "max_concurrent": k.max_concurrent,
                "revoked": k.revoked_at is not None,
            }
            for k in rows
        ]
        lines = [
            f"{k.key_id}  {k.account_name:<16} {'revoked' if k.revoked_at else 'active ':<8} "
            f"models={','.join(k.models) if k.models else '*'} "
            f"{_limits_text(k.rpm, k.tpm, k.max_concurrent)} name={k.name or ''}"
            for k in rows
        ]
        emit(as_json, "\n".join(lines) or "no keys", {"keys": items})

    with_stores(run)


@keys.command("revoke")
@click.argument("key_id")
@json_option
def revoke(key_id: str, as_json: bool) -> None:
    """Revoke key KEY_ID (the 8 characters after `tt-`)."""

    async def run(s: Stores) -> None:
        if not await s.keys.revoke(key_id):
            raise click.ClickException(f"no active key with id {key_id!r}")
        emit(as_json, f"revoked {key_id}", {"revoked": key_id})

    with_stores(run)


def _limit(value: int | None, remove: bool, name: str) -> int | None | _Unset:
    if value is not None and remove:
        raise click.UsageError(f"give --{name} N or --no-{name}, not both")
    if remove:
        return None
    return UNSET if value is None else value


@keys.command("update")
@click.argument("key_id")
@click.option("--rpm", type=click.IntRange(min=1), default=None, help="New requests per minute.")
@click.option("--no-rpm", is_flag=True, help="Remove the requests-per-minute limit.")
@click.option("--tpm", type=click.IntRange(min=1), default=None, help="New tokens per minute.")
@click.option("--no-tpm", is_flag=True, help="Remove the tokens-per-minute limit.")
@click.option("--max-concurrent", type=click.IntRange(min=1), default=None, help="New requests in flight.")
@click.option("--no-max-concurrent", is_flag=True, help="Remove the concurrency limit.")
@json_option
def update(
    key_id: str,
    rpm: int | None,
    no_rpm: bool,
    tpm: int | None,
    no_tpm: bool,
    max_concurrent: int | None,
    no_max_concurrent: bool,
    as_json: bool,
) -> None:
    """Change the limits of key KEY_ID; options not given stay as they are.

    Every replica reads keys from the database on each request, so the change applies to the next one.
    """
    changes = {
        "rpm": _limit(rpm, no_rpm, "rpm"),
        "tpm": _limit(tpm, no_tpm, "tpm"),
        "max_concurrent": _limit(max_concurrent, no_max_concurrent, "max-concurrent"),
    }

    async def run(s: Stores) -> None:
        if not await s.keys.update_limits(key_id, **changes):
            raise click.ClickException(f"no active key with id {key_id!r}")
        shown = {k: v for k, v in changes.items() if not isinstance(v, _Unset)}
        text = ", ".join(f"{k}={'none' if v is None else v}" for k, v in shown.items()) or "nothing"
        emit(as_json, f"updated {key_id}: {text}", {"updated": key_id, **shown})

    with_stores(run)
