"""`tokentill keys …`: API keys, shown once at creation."""

from __future__ import annotations

import click

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
            {"key": created.key, "id": created.key_id, "account": account, "models": allowed},
        )

    with_stores(run)


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
            f"{i['id']}  {i['account']:<16} {'revoked' if i['revoked'] else 'active ':<8} "
            f"models={','.join(i['models']) if i['models'] else '*'} name={i['name'] or ''}"
            for i in items
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
