"""The operator's console pages: every account's usage and revenue, accounts and credits, codes, the
catalogue with each engine's health, the response counters of /metrics and the last errors."""

from __future__ import annotations

from datetime import date
from typing import Any

from tokentill import errors, metrics
from tokentill.api.console.forms import Form, credits_field, limit_field, name_field
from tokentill.api.console.views import (
    by_group,
    day_chart,
    day_points,
    last_days,
    row_view,
    tokens_text,
    totals_view,
)
from tokentill.billing.codes import MAX_CODES_PER_BATCH, CreatedCode
from tokentill.billing.money import format_credits
from tokentill.billing.records import Account, AccountExists
from tokentill.billing.reports import UsageTotals
from tokentill.engines.base import engine_health
from tokentill.services import Services

__all__ = ["OperatorViews"]


class OperatorViews:
    """The operator's reads and actions over the running `Services`."""

    def __init__(self, services: Services) -> None:
        self.services = services

    async def operator_overview(self, today: date) -> dict[str, Any]:
        by_model = last_days(today, ("day", "model"))
        by_account = last_days(today, ("day", "account"))
        model_buckets, total = await self.services.reports.operator_usage(by_model.query)
        account_buckets, _ = await self.services.reports.operator_usage(by_account.query)
        accounts = await self.services.ledger.list_accounts()
        errors_page = await self.services.reports.operator_requests(limit=20, failed_only=True)
        counted = metrics.summary(metrics.registry(self.services.settings.metrics_multiproc_dir))
        charts = [
            day_chart(
                "revenue-model",
                "Revenue per day, by model",
                by_model,
                day_points(model_buckets, "model", "cost"),
                True,
            ),
            day_chart(
                "revenue-account",
                "Revenue per day, by account",
                by_account,
                day_points(account_buckets, "account", "cost"),
                True,
            ),
            day_chart(
                "usage-model",
                "Tokens per day, by model",
                by_model,
                day_points(model_buckets, "model", "tokens"),
                False,
            ),
            day_chart(
                "usage-account",
                "Tokens per day, by account",
                by_account,
                day_points(account_buckets, "account", "tokens"),
                False,
            ),
        ]
        return {
            "charts": charts,
            "total": totals_view(total),
            "accounts": len(accounts),
            "balances": format_credits(sum(a.balance for a in accounts)),
            "responses": [
                {"status": status, "code": code or "–", "count": tokens_text(n)}
                for (status, code), n in sorted(counted.responses.items())
            ],
            "responses_total": tokens_text(counted.total_responses),
            "errors": [row_view(r) for r in errors_page.rows],
            "engines": self.engines(),
            "start": by_model.days[0],
            "end": by_model.days[-1],
        }

    def engines(self) -> list[dict[str, Any]]:
        rows = []
        for spec in self.services.catalog:
            health = engine_health(self.services.engines.get(spec.id))
            rows.append(
                {
                    "id": spec.id,
                    "engine": spec.engine,
                    "price_input": tokens_text(spec.price_input),
                    "price_output": tokens_text(spec.price_output),
                    "context": tokens_text(spec.context),
                    "reasoning": spec.reasoning,
                    "vision": spec.vision or spec.mmproj is not None,
                    "known": health is not None,
                    "up": health.replicas_up if health else 0,
                    "replicas": health.replicas if health else 0,
                    "queued": health.queued if health else 0,
                    "running": health.running if health else 0,
                    "threads": health.threads if health and health.threads is not None else "–",
                    "healthy": health is not None and health.replicas_up > 0,
                }
            )
        return rows

    async def operator_accounts(self, today: date) -> dict[str, Any]:
        window = last_days(today, ("account",))
        buckets, _ = await self.services.reports.operator_usage(window.query)
        usage = by_group(buckets, "account")
        accounts = await self.services.ledger.list_accounts()
        rows = [
            {
                "name": a.name,
                "balance": format_credits(a.balance),
                **totals_view(usage.get(a.name, UsageTotals())),
            }
            for a in accounts
        ]
        return {"accounts": rows, "start": window.days[0], "end": window.days[-1]}

    async def operator_codes(self) -> dict[str, Any]:
        codes = await self.services.codes.list_codes(limit=200)
        return {
            "codes": [
                {
                    "id": c.id,
                    "credits": format_credits(c.credits),
                    "status": c.status,
                    "created": c.created_at.strftime("%Y-%m-%d %H:%M"),
                    "expires": c.expires_at.strftime("%Y-%m-%d") if c.expires_at else "never",
                    "redeemed_by": c.redeemed_by or "",
                }
                for c in codes
            ],
            "max_count": MAX_CODES_PER_BATCH,
        }

    async def create_account(self, form: Form) -> Account:
        name = name_field(form.one("name"), "name", required=True)
        assert name is not None
        amount = credits_field(form.one("credits"), allow_zero=True)
        try:
            return await self.services.ledger.create_account(name, amount)
        except AccountExists as exc:
            raise errors.Conflict(f"Account {name!r} already exists.", code="account_exists") from exc

    async def grant(self, form: Form) -> tuple[str, int]:
        name = name_field(form.one("account"), "account", required=True)
        assert name is not None
        amount = credits_field(form.one("credits"))
        try:
            return name, await self.services.ledger.add_credits(name, amount, note="console")
        except LookupError as exc:
            raise errors.NotFound(f"No account named {name!r}.", code="account_not_found") from exc

    async def create_codes(self, form: Form) -> list[CreatedCode]:
        amount = credits_field(form.one("credits"))
        count = limit_field(form.one("count"), "count", maximum=MAX_CODES_PER_BATCH) or 1
        expires = limit_field(form.one("expires_days"), "expires_days", maximum=36500)
        return await self.services.codes.create_codes(amount, count, expires)
