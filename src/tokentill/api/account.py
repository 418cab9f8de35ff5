"""The self-serve JSON API of an API key's own account: summary, usage, request log, redeem a code.

Every route authenticates with an ordinary key and reads only that key's account: the account id comes
from the `Principal`, never from the request. The console renders the same service calls.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from tokentill import errors
from tokentill.api.routes import Authenticated, _with_balance
from tokentill.api.state import services_of
from tokentill.auth.service import KeyInfo, Principal
from tokentill.billing.money import format_credits
from tokentill.billing.records import UsageRow
from tokentill.billing.reports import UsageBucket, UsageQuery, UsageTotals, parse_usage_query

__all__ = ["account_json", "account_router", "parse_limit", "request_json", "usage_json"]

account_router = APIRouter()


class Redeem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    code: str = Field(min_length=1, max_length=256)


def _totals_json(totals: UsageTotals) -> dict[str, Any]:
    return {
        "requests": totals.requests,
        "prompt_tokens": totals.prompt_tokens,
        "completion_tokens": totals.completion_tokens,
        "reasoning_tokens": totals.reasoning_tokens,
        "cached_tokens": totals.cached_tokens,
        "image_tokens": totals.image_tokens,
        "cost": format_credits(totals.cost),
        "cached_saving": format_credits(totals.cached_saving),
    }


def usage_json(query: UsageQuery, buckets: list[UsageBucket], total: UsageTotals) -> dict[str, Any]:
    """`{"data": [{"bucket", <one field per group_by>, counters...}], "total": {counters}, "start", "end",
    "group_by"}`; `bucket` is the value of the first group_by field."""
    data = [{"bucket": next(iter(b.group.values())), **b.group, **_totals_json(b.totals)} for b in buckets]
    return {
        "object": "list",
        "data": data,
        "total": _totals_json(total),
        "start": query.start.isoformat(),
        "end": query.end.isoformat(),
        "group_by": list(query.group_by),
    }


def request_json(row: UsageRow) -> dict[str, Any]:
    return {
        "id": row.request_id,
        "created": int(row.created_at.timestamp()),
        "model": row.model,
        "key_id": row.key_id,
        "status": row.status,
        "prompt_tokens": row.prompt_tokens,
        "completion_tokens": row.completion_tokens,
        "reasoning_tokens": row.reasoning_tokens,
        "cached_tokens": row.cached_tokens,
        "image_tokens": row.image_tokens,
        "cost": format_credits(row.cost),
        "cached_saving": format_credits(row.cached_saving),
        "latency_ms": row.latency_ms,
        "estimated": row.estimated,
    }


def account_json(principal: Principal, key: KeyInfo) -> dict[str, Any]:
    """`GET /v1/account`'s body: the principal's account and balance, and `key`'s settings."""
    return {
        "object": "account",
        "account": principal.account_name,
        "balance": format_credits(principal.balance),
        "key": {
            "id": key.key_id,
            "name": key.name,
            "models": key.models,
            "rpm": key.rpm,
            "tpm": key.tpm,
            "max_concurrent": key.max_concurrent,
            "created_at": int(key.created_at.timestamp()),
        },
    }


def parse_limit(text: str | None) -> int:
    """The `limit` query parameter: default 50; not digits → 400 (the service checks the range)."""
    if text is None:
        return 50
    if not (text.isascii() and text.isdigit()) or len(text) > 6:  # "²" is a digit to isdigit(), not int()
        raise errors.InvalidRequest(
            f"Invalid 'limit': expected an integer, got {text[:32]!r}.", param="limit"
        )
    return int(text)


@account_router.get("/v1/account")
async def get_account(request: Request, principal: Authenticated) -> JSONResponse:
    key = await services_of(request).keys.get_key(principal.key_id)
    if key is None:  # revoked and deleted between the two reads; keys are never deleted today
        raise errors.AuthenticationFailed("This API key no longer exists.", code="invalid_api_key")
    return _with_balance(request, account_json(principal, key))


@account_router.get("/v1/usage")
async def get_usage(
    request: Request,
    principal: Authenticated,
    start: str | None = None,
    end: str | None = None,
    group_by: str | None = None,
) -> JSONResponse:
    query = parse_usage_query(start, end, group_by, today=datetime.now(UTC).date())
    buckets, total = await services_of(request).reports.usage(principal.account_id, query)
    return _with_balance(request, usage_json(query, buckets, total))


@account_router.get("/v1/usage/requests")
async def get_requests(
    request: Request, principal: Authenticated, limit: str | None = None, before: str | None = None
) -> JSONResponse:
    page = await services_of(request).reports.requests(
        principal.account_id, limit=parse_limit(limit), before=before
    )
    return _with_balance(
        request, {"object": "list", "data": [request_json(r) for r in page.rows], "next": page.next}
    )


@account_router.post("/v1/account/redeem")
async def redeem(request: Request, principal: Authenticated, body: Redeem) -> JSONResponse:
    done = await services_of(request).codes.redeem(principal.account_id, principal.key_id, body.code)
    request.state.remaining_credits = done.balance
    return _with_balance(
        request,
        {
            "object": "redemption",
            "code_id": done.code_id,
            "credits": format_credits(done.credits),
            "balance": format_credits(done.balance),
        },
    )
