"""Billing: integer money (`money`), token prices (`pricing`) and the atomic account ledger (`ledger`)."""

from __future__ import annotations

from tokentill.billing.ledger import Ledger
from tokentill.billing.money import format_credits, parse_credits
from tokentill.billing.pricing import affordable_completion_tokens, cost
from tokentill.billing.records import (
    Account,
    AccountExists,
    Audit,
    BalanceRefused,
    Hold,
    UsageRecord,
    UsageRow,
)

__all__ = [
    "Account",
    "AccountExists",
    "Audit",
    "BalanceRefused",
    "Hold",
    "Ledger",
    "UsageRecord",
    "UsageRow",
    "affordable_completion_tokens",
    "cost",
    "format_credits",
    "parse_credits",
]
