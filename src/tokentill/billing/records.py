"""The plain records the ledger takes and returns. Amounts are µcr (see `billing.money`)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

__all__ = [
    "Account",
    "AccountExists",
    "Audit",
    "BalanceRefused",
    "Hold",
    "KeyChanged",
    "KeyTerms",
    "UsageRecord",
    "UsageRow",
]

MAX_NOTE = 500  # characters in the note of a refund or a debit


class AccountExists(Exception):
    """`create_account` was given a name that is taken (an operator error, not an API error)."""


class BalanceRefused(Exception):
    """A refund or debit the balance cannot take (an operator error): a debit past zero, or a refund past
    what the balance column holds. `balance` is the balance that refused it."""

    def __init__(self, message: str, balance: int) -> None:
        super().__init__(message)
        self.balance = balance


class KeyChanged(Exception):
    """`Ledger.reserve` refused: the key it was given `KeyTerms` of is revoked, gone, or has other limits
    now. Nothing was reserved."""


@dataclass(frozen=True)
class KeyTerms:
    """A key as the request was admitted under it: a reservation with these terms is made only while the
    key is live with exactly these limits (None: no limit), checked in the reserving statement itself."""

    key_id: str
    rpm: int | None
    tpm: int | None
    max_concurrent: int | None


@dataclass(frozen=True)
class Account:
    id: int
    name: str
    balance: int
    created_at: datetime


@dataclass(frozen=True)
class Hold:
    """Credit reserved for one request; `id` is the request id. Settle or release it exactly once."""

    id: str
    account_id: int
    key_id: str | None
    amount: int
    expires_at: datetime
    balance_after: int = 0  # the account's balance right after this hold was placed


@dataclass(frozen=True)
class UsageRecord:
    """What a finished request used; `completion_tokens` includes `reasoning_tokens` (o1 billing).

    `status` is the HTTP status sent (499 when the client went away); `estimated` is true when token
    counts were estimated rather than reported by the engine.
    """

    request_id: str
    key_id: str | None
    model: str
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int = 0
    cached_tokens: int = 0
    image_tokens: int = 0
    cached_saving: int = 0  # µcr not charged: cached prompt tokens at the cached price
    status: int = 200
    latency_ms: int = 0
    estimated: bool = False


@dataclass(frozen=True)
class UsageRow:
    """One stored usage row, as `Ledger.usage()` lists it."""

    request_id: str
    account_name: str
    key_id: str | None
    model: str
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    cached_tokens: int
    image_tokens: int
    cost: int
    status: int
    latency_ms: int
    estimated: bool
    created_at: datetime
    cached_saving: int = 0


@dataclass(frozen=True)
class Audit:
    """One account's books. `consistent` is the invariant of DESIGN §4.

    `credits_added` sums 'credit' rows, `settled_charges` is minus the sum of 'charge' rows,
    `adjustments` sums the signed 'adjust' rows (operator refunds and debits), `open_holds` sums holds
    still open, `ledger_sum` sums every ledger row.
    """

    account_id: int
    balance: int
    credits_added: int
    settled_charges: int
    open_holds: int
    ledger_sum: int
    adjustments: int = 0

    @property
    def consistent(self) -> bool:
        expected = self.credits_added + self.adjustments - self.settled_charges - self.open_holds
        return self.balance >= 0 and self.balance == expected == self.ledger_sum
