"""`tokentill usage`: the metered requests, newest first."""

from __future__ import annotations

import click

from tokentill.billing.money import format_credits
from tokentill.cli._common import Stores, emit, json_option, with_stores


@click.command()
@click.option("--account", default=None, help="Only this account.")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True)
@json_option
def usage(account: str | None, limit: int, as_json: bool) -> None:
    """Show usage rows: tokens by kind, cost and status per request."""

    async def run(s: Stores) -> None:
        rows = await s.ledger.usage(account, limit=limit)
        items = [
            {
                "request_id": r.request_id,
                "account": r.account_name,
                "key": r.key_id,
                "model": r.model,
                "prompt_tokens": r.prompt_tokens,
                "completion_tokens": r.completion_tokens,
                "reasoning_tokens": r.reasoning_tokens,
                "cached_tokens": r.cached_tokens,
                "image_tokens": r.image_tokens,
                "estimated": r.estimated,
                "cost": format_credits(r.cost),
                "cached_saving": format_credits(r.cached_saving),
                "status": r.status,
                "latency_ms": r.latency_ms,
                "created_at": str(r.created_at),
            }
            for r in rows
        ]
        lines = [
            f"{str(r.created_at)[:19]}  {r.account_name:<12} {r.model:<14} {r.status}  "
            f"in={r.prompt_tokens} (cached {r.cached_tokens}) out={r.completion_tokens} "
            f"(reasoning {r.reasoning_tokens})  {format_credits(r.cost)} cr"
            + (f" (saved {format_credits(r.cached_saving)})" if r.cached_saving else "")
            for r in rows
        ]
        emit(as_json, "\n".join(lines) or "no usage yet", {"usage": items})

    with_stores(run)
