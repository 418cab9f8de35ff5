"""The console's view models and actions: what each page shows, computed from the services, and what each
form does, with its fields checked; the customer's pages and sign-in here, the operator's in `operator.py`.
No framework here: `routes.py` reads the request and renders.

A customer page only ever reads the account of the session's key (`Principal.account_id`, never a value
from the request); an action on a key goes through `KeyStore.revoke(..., account_name=...)`, which cannot
touch another account's key. A key cannot create a key with more than it has itself: its models and
limits bound the new key's.
"""

from __future__ import annotations

import csv
import hmac
import io
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

from tokentill import errors
from tokentill.api.console.charts import Chart, stacked_bars
from tokentill.api.console.forms import Form, limit_field, name_field
from tokentill.auth.service import CreatedKey, Principal
from tokentill.billing.codes import Redemption
from tokentill.billing.money import format_credits
from tokentill.billing.records import UsageRow
from tokentill.billing.reports import MAX_PAGE, UsageBucket, UsageQuery, UsageTotals
from tokentill.limits import KeyLimits
from tokentill.services import Services

__all__ = ["CHART_DAYS", "MAX_CSV_ROWS", "ConsoleViews"]

CHART_DAYS = 30
MAX_CSV_ROWS = 100_000
PAGE_ROWS = 50
KINDS = ("prompt text", "prompt cached", "prompt images", "answer", "reasoning")
CSV_HEADER = (
    "id",
    "created",
    "model",
    "key_id",
    "status",
    "prompt_tokens",
    "completion_tokens",
    "reasoning_tokens",
    "cached_tokens",
    "image_tokens",
    "cost",
    "latency_ms",
    "estimated",
)


def tokens_text(n: int) -> str:
    return f"{n:,}"


def totals_view(t: UsageTotals) -> dict[str, Any]:
    return {
        "requests": tokens_text(t.requests),
        "prompt": tokens_text(t.prompt_tokens),
        "completion": tokens_text(t.completion_tokens),
        "reasoning": tokens_text(t.reasoning_tokens),
        "cached": tokens_text(t.cached_tokens),
        "image": tokens_text(t.image_tokens),
        "tokens": tokens_text(t.prompt_tokens + t.completion_tokens),
        "cost": format_credits(t.cost),
    }


def row_view(row: UsageRow) -> dict[str, Any]:
    return {
        "id": row.request_id,
        "created": row.created_at.strftime("%Y-%m-%d %H:%M:%S"),
        "account": row.account_name,
        "model": row.model,
        "key_id": row.key_id or "",
        "status": row.status,
        "prompt": row.prompt_tokens,
        "completion": row.completion_tokens,
        "reasoning": row.reasoning_tokens,
        "cached": row.cached_tokens,
        "image": row.image_tokens,
        "cost": format_credits(row.cost),
        "latency_ms": row.latency_ms,
    }


def _csv_cell(value: object) -> str:
    text = str(value)
    # A cell a spreadsheet would run as a formula is quoted as text (CSV injection).
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


@dataclass(frozen=True)
class Window:
    query: UsageQuery
    days: list[str]


def last_days(today: date, group_by: tuple[str, ...], n: int = CHART_DAYS) -> Window:
    start = today - timedelta(days=n - 1)
    return Window(
        UsageQuery(start=start, end=today, group_by=group_by),
        [(start + timedelta(days=i)).isoformat() for i in range(n)],
    )


def by_group(buckets: list[UsageBucket], field: str) -> dict[str, UsageTotals]:
    sums: dict[str, UsageTotals] = {}
    for b in buckets:
        name = b.group.get(field) or "(none)"
        sums[name] = sums.get(name, UsageTotals()) + b.totals
    return sums


def day_points(buckets: list[UsageBucket], series: str, value: str) -> dict[tuple[str, str], int]:
    points: dict[tuple[str, str], int] = {}
    for b in buckets:
        key = (b.group["day"] or "", b.group.get(series) or "(none)")
        t = b.totals
        amount = t.cost if value == "cost" else t.prompt_tokens + t.completion_tokens
        points[key] = points.get(key, 0) + amount
    return points


def _kindday_points(buckets: list[UsageBucket]) -> dict[tuple[str, str], int]:
    """Tokens per day by kind, stacked without counting one token twice: cached and image tokens are
    part of the prompt, reasoning part of the completion."""
    points: dict[tuple[str, str], int] = {}
    for b in buckets:
        t = b.totals
        day = b.group["day"] or ""
        cached = min(t.cached_tokens, t.prompt_tokens)
        image = min(t.image_tokens, t.prompt_tokens - cached)
        reasoning = min(t.reasoning_tokens, t.completion_tokens)
        for kind, amount in zip(
            KINDS,
            (t.prompt_tokens - cached - image, cached, image, t.completion_tokens - reasoning, reasoning),
            strict=True,
        ):
            points[day, kind] = points.get((day, kind), 0) + amount
    return points


def day_chart(
    chart_id: str, title: str, window: Window, points: dict[tuple[str, str], int], money: bool
) -> Chart:
    return stacked_bars(
        chart_id=chart_id,
        title=title,
        unit="credits" if money else "tokens",
        days=window.days,
        points=points,
        fmt=format_credits if money else tokens_text,
    )


class ConsoleViews:
    """Sign-in and the customer's reads and actions over the running `Services`."""

    def __init__(self, services: Services) -> None:
        self.services = services

    async def sign_in(self, raw_key: str, client: str) -> Principal | None:
        """Who `raw_key` signs in as: the `Principal` of a live API key, or None for the admin key.

        Raises `RateLimited` past TOKENTILL_CONSOLE_LOGIN_ATTEMPTS_PER_MINUTE attempts from `client` (an
        address; every attempt counts) and `AuthenticationFailed` for any other key.
        """
        settings = self.services.settings
        limits = KeyLimits(rpm=settings.console_login_attempts_per_minute)
        try:
            lease = await self.services.limiter.acquire(f"console-signin:{client}", limits, 0)
        except errors.RateLimited as exc:
            wait = exc.headers.get("Retry-After", "60")
            raise errors.RateLimited(
                f"Too many sign-in attempts from this address: {limits.rpm} per minute are allowed. Try "
                f"again in {wait}s.",
                limit_type="requests",
                retry_after_s=float(wait),
            ) from None
        await lease.release()  # only the attempt counts; nothing stays in flight
        if not raw_key:
            raise errors.AuthenticationFailed("Enter an API key or the admin key.", code="missing_api_key")
        admin = settings.admin_key.get_secret_value() if settings.admin_key is not None else ""
        if admin and hmac.compare_digest(raw_key.encode(), admin.encode()):
            return None
        try:
            return await self.services.keys.authenticate(raw_key)
        except errors.AuthenticationFailed:
            raise errors.AuthenticationFailed(
                "That key is not valid: it is unknown, mistyped or revoked.", code="invalid_api_key"
            ) from None

    # ---------------------------------------------------------------- customer

    async def customer_overview(self, principal: Principal, today: date) -> dict[str, Any]:
        window = last_days(today, ("day", "model"))
        buckets, total = await self.services.reports.usage(principal.account_id, window.query)
        charts = [
            day_chart(
                "credits", "Credits per day, by model", window, day_points(buckets, "model", "cost"), True
            ),
            day_chart(
                "tokens", "Tokens per day, by model", window, day_points(buckets, "model", "tokens"), False
            ),
            stacked_bars(
                chart_id="kinds",
                title="Tokens per day, by kind",
                unit="tokens",
                days=window.days,
                points=_kindday_points(buckets),
                fmt=tokens_text,
                series=KINDS,
            ),
        ]
        models = sorted(by_group(buckets, "model").items())
        return {
            "balance": format_credits(principal.balance),
            "charts": charts,
            "total": totals_view(total),
            "models": [{"name": name, **totals_view(t)} for name, t in models],
            "start": window.days[0],
            "end": window.days[-1],
        }

    async def customer_keys(self, principal: Principal, today: date) -> dict[str, Any]:
        window = last_days(today, ("key",))
        buckets, _ = await self.services.reports.usage(principal.account_id, window.query)
        usage = by_group(buckets, "key")
        keys = await self.services.keys.list_keys(principal.account_name)
        rows = [
            {
                "id": k.key_id,
                "name": k.name or "",
                "models": ", ".join(k.models) if k.models is not None else "all",
                "rpm": k.rpm or "–",
                "tpm": k.tpm or "–",
                "max_concurrent": k.max_concurrent or "–",
                "created": k.created_at.strftime("%Y-%m-%d %H:%M"),
                "revoked": k.revoked_at is not None,
                "current": k.key_id == principal.key_id,
                **totals_view(usage.get(k.key_id, UsageTotals())),
            }
            for k in reversed(keys)
        ]
        allowed = [
            s.id for s in self.services.catalog if principal.models is None or s.id in principal.models
        ]
        return {"keys": rows, "models": allowed, "start": window.days[0], "end": window.days[-1]}

    async def customer_requests(self, principal: Principal, before: str | None) -> dict[str, Any]:
        page = await self.services.reports.requests(principal.account_id, limit=PAGE_ROWS, before=before)
        return {"rows": [row_view(r) for r in page.rows], "next": page.next, "first": before is None}

    async def requests_csv(self, principal: Principal) -> AsyncIterator[str]:
        """The account's request log as CSV text, newest first, at most MAX_CSV_ROWS rows, page by page."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\r\n")
        writer.writerow(CSV_HEADER)
        yield out.getvalue()
        before: str | None = None
        sent = 0
        while sent < MAX_CSV_ROWS:
            page = await self.services.reports.requests(principal.account_id, limit=MAX_PAGE, before=before)
            out.seek(0)
            out.truncate()
            for r in page.rows:
                writer.writerow(
                    [
                        _csv_cell(v)
                        for v in (
                            r.request_id,
                            r.created_at.isoformat(),
                            r.model,
                            r.key_id or "",
                            r.status,
                            r.prompt_tokens,
                            r.completion_tokens,
                            r.reasoning_tokens,
                            r.cached_tokens,
                            r.image_tokens,
                            format_credits(r.cost),
                            r.latency_ms,
                            "true" if r.estimated else "false",
                        )
                    ]
                )
            sent += len(page.rows)
            yield out.getvalue()
            if page.next is None:
                return
            before = page.next

    async def create_key(self, principal: Principal, form: Form) -> CreatedKey:
        """A new key of the principal's account, never allowed more than the principal's own key."""
        name = name_field(form.one("name"), "name", required=False)
        catalogue = {s.id for s in self.services.catalog}
        models: list[str] | None = form.many("models") or None
        if models is not None:
            unknown = [m for m in models if m not in catalogue]
            if unknown:
                raise errors.InvalidRequest(f"Unknown model {unknown[0][:64]!r}.", param="models")
        if principal.models is not None:
            if models is None:
                models = sorted(principal.models)
            elif not set(models) <= principal.models:
                raise errors.PermissionDenied(
                    "This key may only create keys for the models it may use itself.",
                    code="model_not_permitted",
                    param="models",
                )
        limits: dict[str, int | None] = {}
        for field in ("rpm", "tpm", "max_concurrent"):
            own = getattr(principal, field)
            value = limit_field(form.one(field), field, maximum=own or 2**31 - 1)
            limits[field] = value if value is not None else own  # a limited key makes limited keys
        try:
            return await self.services.keys.create_key(
                principal.account_name, models=models, name=name, **limits
            )
        except LookupError as exc:  # the account vanished under the session
            raise errors.AuthenticationFailed("This account no longer exists.") from exc

    async def revoke_key(self, principal: Principal, key_id: str) -> None:
        if not await self.services.keys.revoke(key_id[:64], account_name=principal.account_name):
            raise errors.NotFound("No active key with that id in this account.", code="key_not_found")

    async def redeem(self, principal: Principal, form: Form) -> Redemption:
        code = form.one("code")
        if not code:
            raise errors.InvalidRequest("Missing required parameter: 'code'.", param="code")
        return await self.services.codes.redeem(principal.account_id, principal.key_id, code[:256])
