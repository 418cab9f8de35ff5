"""`/admin/…`: account, credit and key management over HTTP, for operators holding TOKENTILL_ADMIN_KEY.

With no admin key configured every admin route answers 403: nothing is open by default.
"""

from __future__ import annotations

import hmac
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tokentill import errors
from tokentill.api.account import parse_limit, request_json, usage_json
from tokentill.api.routes import presented_key
from tokentill.api.state import services_of
from tokentill.billing.codes import MAX_CODES_PER_BATCH
from tokentill.billing.ledger import AccountExists, BalanceRefused
from tokentill.billing.money import format_credits, parse_credits
from tokentill.billing.records import MAX_NOTE
from tokentill.billing.reports import OPERATOR_GROUPS, parse_usage_query
from tokentill.names import MAX_LABEL_CHARS, MAX_MODELS_PER_KEY, MAX_NAME_CHARS
from tokentill.protocol.chat import find_invalid_unicode

__all__ = ["admin_router"]


async def require_admin(request: Request) -> None:
    configured = services_of(request).settings.admin_key
    given = presented_key(request)
    if given is None:
        raise errors.AuthenticationFailed("Admin routes need the admin key.", code="missing_api_key")
    if configured is None or not hmac.compare_digest(given.encode(), configured.get_secret_value().encode()):
        raise errors.PermissionDenied("This route needs the admin key.", code="admin_required")


admin_router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        if not isinstance(data, dict | list | str):  # a body that is not JSON: pydantic refuses it (400)
            return data
        bad = find_invalid_unicode(data)
        if bad is not None:  # names and labels go to the database, which cannot store lone surrogates
            raise ValueError(f"'{bad or 'body'}' holds a lone UTF-16 surrogate, which is not valid Unicode")
        return data


_LIMIT = Field(default=None, ge=1, le=2**31 - 1)


_NAME_RULE = "printable characters without surrounding whitespace (tokentill.names)"


class NewAccount(_Body):
    # The ledger checks the full rule (`names.check_name`); the schema states what JSON Schema can.
    name: str = Field(min_length=1, max_length=MAX_NAME_CHARS, description=f"1-{MAX_NAME_CHARS} {_NAME_RULE}")
    credits: str = "0"


class Credits(_Body):
    credits: str


class Adjustment(_Body):
    credits: str
    # Why, kept on the ledger row; the ledger checks the full rule (`names.check_name`).
    note: str = Field(min_length=1, max_length=MAX_NOTE, description=f"1-{MAX_NOTE} {_NAME_RULE}")


class NewKey(_Body):
    account: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    models: list[str] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_MODELS_PER_KEY,
        description="Model ids the key may use; null or absent: every model.",
    )
    name: str | None = Field(
        default=None, min_length=1, max_length=MAX_LABEL_CHARS, description=f"A label: {_NAME_RULE}."
    )
    rpm: int | None = _LIMIT
    tpm: int | None = _LIMIT
    max_concurrent: int | None = _LIMIT


class NewCodes(_Body):
    credits: str
    count: int = Field(default=1, ge=1, le=MAX_CODES_PER_BATCH)
    expires_days: int | None = Field(default=None, ge=1, le=36500)


def _ucr(text: str) -> int:
    try:
        return parse_credits(text)
    except ValueError as exc:
        raise errors.InvalidRequest(f"Invalid credits {text!r}: {exc}", param="credits") from exc


@admin_router.get("/accounts")
async def list_accounts(request: Request) -> dict[str, Any]:
    rows = await services_of(request).ledger.list_accounts()
    return {"object": "list", "data": [{"name": a.name, "balance": format_credits(a.balance)} for a in rows]}


@admin_router.post("/accounts", status_code=201)
async def create_account(request: Request, body: NewAccount) -> dict[str, Any]:
    try:
        account = await services_of(request).ledger.create_account(body.name, _ucr(body.credits))
    except AccountExists as exc:
        raise errors.Conflict(f"Account {body.name!r} already exists.", code="account_exists") from exc
    return {"name": account.name, "balance": format_credits(account.balance)}


@admin_router.post("/accounts/{name}/credits")
async def add_credits(request: Request, name: str, body: Credits) -> dict[str, Any]:
    amount = _ucr(body.credits)
    if amount <= 0:
        raise errors.InvalidRequest("credits must be more than 0.", param="credits")
    try:
        balance = await services_of(request).ledger.add_credits(name, amount, note="admin api")
    except LookupError as exc:
        raise errors.NotFound(f"No account named {name!r}.", code="account_not_found") from exc
    return {"name": name, "balance": format_credits(balance)}


@admin_router.post("/accounts/{name}/refunds")
async def refund_credits(request: Request, name: str, body: Adjustment) -> dict[str, Any]:
    return await _adjust(request, name, body, "refunded")


@admin_router.post("/accounts/{name}/debits")
async def debit_credits(request: Request, name: str, body: Adjustment) -> dict[str, Any]:
    return await _adjust(request, name, body, "debited")


async def _adjust(request: Request, name: str, body: Adjustment, done: str) -> dict[str, Any]:
    amount = _ucr(body.credits)
    if amount <= 0:
        raise errors.InvalidRequest("credits must be more than 0.", param="credits")
    ledger = services_of(request).ledger
    try:
        change = ledger.refund if done == "refunded" else ledger.debit
        balance = await change(name, amount, note=body.note)
    except LookupError as exc:
        raise errors.NotFound(f"No account named {name!r}.", code="account_not_found") from exc
    except BalanceRefused as exc:
        if done == "debited":  # the account's state refuses it, not the request's form
            raise errors.Conflict(f"{exc}.", code="insufficient_balance") from exc
        raise errors.InvalidRequest(f"{exc}.", param="credits") from exc
    return {"name": name, done: format_credits(amount), "balance": format_credits(balance), "note": body.note}


@admin_router.post("/keys", status_code=201)
async def create_key(request: Request, body: NewKey) -> dict[str, Any]:
    try:
        created = await services_of(request).keys.create_key(
            body.account,
            models=body.models,
            name=body.name,
            rpm=body.rpm,
            tpm=body.tpm,
            max_concurrent=body.max_concurrent,
        )
    except LookupError as exc:
        raise errors.NotFound(f"No account named {body.account!r}.", code="account_not_found") from exc
    return {"id": created.key_id, "key": created.key, "account": body.account, "models": created.models}


@admin_router.delete("/keys/{key_id}")
async def revoke_key(request: Request, key_id: str) -> dict[str, Any]:
    if not await services_of(request).keys.revoke(key_id):
        raise errors.NotFound(f"No active key with id {key_id!r}.", code="key_not_found")
    return {"id": key_id, "revoked": True}


@admin_router.post("/codes", status_code=201)
async def create_codes(request: Request, body: NewCodes) -> dict[str, Any]:
    amount = _ucr(body.credits)
    if amount <= 0:
        raise errors.InvalidRequest("credits must be more than 0.", param="credits")
    created = await services_of(request).codes.create_codes(amount, body.count, body.expires_days)
    return {"object": "list", "data": [c.to_dict() for c in created]}


@admin_router.get("/codes")
async def list_codes(request: Request) -> dict[str, Any]:
    codes = await services_of(request).codes.list_codes()
    return {"object": "list", "data": [c.to_dict() for c in codes]}


@admin_router.get("/usage")
async def operator_usage(
    request: Request, start: str | None = None, end: str | None = None, group_by: str | None = None
) -> dict[str, Any]:
    query = parse_usage_query(start, end, group_by, today=datetime.now(UTC).date(), allowed=OPERATOR_GROUPS)
    buckets, total = await services_of(request).reports.operator_usage(query)
    return usage_json(query, buckets, total)


@admin_router.get("/usage/requests")
async def operator_requests(
    request: Request, limit: str | None = None, before: str | None = None, failed: bool = False
) -> dict[str, Any]:
    page = await services_of(request).reports.operator_requests(
        limit=parse_limit(limit), before=before, failed_only=failed
    )
    return {
        "object": "list",
        "data": [{**request_json(r), "account": r.account_name} for r in page.rows],
        "next": page.next,
    }
