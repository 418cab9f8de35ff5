"""The database schema as SQLAlchemy Core tables: one `MetaData`, the same on SQLite and PostgreSQL.

Money columns are `BigInteger` micro-credits (µcr). Timestamps are `UTCDateTime`: Python always sees
timezone-aware UTC datetimes; PostgreSQL stores `timestamptz`, SQLite stores naive UTC text in ISO order,
so `<` / `>` comparisons in SQL are correct on both.

Tables:
    accounts   one row per prepaid account; `balance >= 0` is enforced by a CHECK constraint as well
    api_keys   `tt-<id>-<secret>` keys: only the id and sha256(secret) are stored
    ledger     append-only: every balance change is one row, `amount` is the signed balance delta
    holds      credit reserved for one in-flight request (id = request id), released or settled once
    usage      one row per finished request (tokens by kind, cost charged, HTTP status)
    idempotency_keys  one row per (account, Idempotency-Key): claimed, then the stored response
    redemption_codes  prepaid credit codes `ttc-<id>-<secret>`: the id and sha256(secret), redeemed once
    usage_hourly  the usage rows summed per (account, UTC hour, model, key), written in the same
                  transaction as each usage row, so it always equals the raw rows summed
    server_secrets  named random secrets shared by every replica (e.g. the console's cookie key)
    responses  Responses API objects kept with `store: true`: the object, and the conversation (chat
               messages) that a later `previous_response_id` continues

The Alembic revisions `0001_initial`, `0002_idempotency`, `0003_console`, `0004_cached_pricing` and
`0005_responses` create exactly these tables;
change both together.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)
from sqlalchemy.types import TypeDecorator

__all__ = [
    "HOLD_STATUSES",
    "IDEMPOTENCY_STATUSES",
    "LEDGER_KINDS",
    "BigId",
    "UTCDateTime",
    "accounts",
    "api_keys",
    "holds",
    "idempotency_keys",
    "ledger",
    "metadata",
    "redemption_codes",
    "responses",
    "server_secrets",
    "usage",
    "usage_hourly",
    "utcnow",
    "USAGE_COUNTERS",
]

LEDGER_KINDS = ("credit", "hold", "release", "charge", "adjust")
HOLD_STATUSES = ("open", "settled", "released", "expired")
IDEMPOTENCY_STATUSES = ("in_progress", "completed", "streamed")
# The summed columns of `usage_hourly`; `requests` counts usage rows, the others sum the same-named column.
USAGE_COUNTERS = (
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "reasoning_tokens",
    "cached_tokens",
    "image_tokens",
    "cost",
    "cached_saving",
)

# BIGINT on PostgreSQL; on SQLite only `INTEGER PRIMARY KEY` autoincrements (it is 64-bit there anyway).
BigId = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A datetime that is always timezone-aware UTC in Python, whatever the dialect stores.

    Binding a naive datetime is a bug (its zone is unknown) and raises `ValueError`.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTCDateTime column")
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if not isinstance(value, datetime):  # pragma: no cover - drivers always give datetimes
            raise TypeError(f"unexpected timestamp value {value!r}")
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

accounts = Table(
    "accounts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("balance", BigInteger, nullable=False, server_default="0"),
    Column("created_at", UTCDateTime, nullable=False, default=utcnow),
    CheckConstraint("balance >= 0", name="balance_nonnegative"),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(8), primary_key=True),
    Column("account_id", Integer, ForeignKey("accounts.id"), nullable=False, index=True),
    Column("secret_sha256", String(64), nullable=False),
    Column("name", String(128), nullable=True),
    Column("models", Text, nullable=True),  # JSON list of model ids; NULL = every model
    Column("rpm", Integer, nullable=True),
    Column("tpm", Integer, nullable=True),
    Column("max_concurrent", Integer, nullable=True),
    Column("created_at", UTCDateTime, nullable=False, default=utcnow),
    Column("revoked_at", UTCDateTime, nullable=True),
)

ledger = Table(
    "ledger",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("account_id", Integer, ForeignKey("accounts.id"), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("amount", BigInteger, nullable=False),  # signed balance delta
    Column("balance_after", BigInteger, nullable=False),
    Column("ref", String(64), nullable=True),  # hold / request id
    Column("note", Text, nullable=False, server_default=""),
    Column("created_at", UTCDateTime, nullable=False, default=utcnow),
    CheckConstraint("kind IN ('credit', 'hold', 'release', 'charge', 'adjust')", name="kind"),
    Index(None, "account_id", "id"),
)

holds = Table(
    "holds",
    metadata,
    Column("id", String(64), primary_key=True),  # the request id
    Column("account_id", Integer, ForeignKey("accounts.id"), nullable=False),
    Column("key_id", String(8), nullable=True),
    Column("amount", BigInteger, nullable=False),
    Column("status", String(16), nullable=False),
    Column("created_at", UTCDateTime, nullable=False, default=utcnow),
    Column("expires_at", UTCDateTime, nullable=False),
    Column("closed_at", UTCDateTime, nullable=True),
    CheckConstraint("status IN ('open', 'settled', 'released', 'expired')", name="status"),
    CheckConstraint("amount >= 0", name="amount_nonnegative"),
    Index(None, "status", "expires_at"),
    Index(None, "account_id", "status"),
)

usage = Table(
    "usage",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("request_id", String(64), nullable=False, unique=True),
    Column("account_id", Integer, ForeignKey("accounts.id"), nullable=False),
    Column("key_id", String(8), nullable=True),
    Column("model", String(128), nullable=False),
    Column("prompt_tokens", Integer, nullable=False, server_default="0"),
    Column("completion_tokens", Integer, nullable=False, server_default="0"),
    Column("reasoning_tokens", Integer, nullable=False, server_default="0"),
    Column("cached_tokens", Integer, nullable=False, server_default="0"),
    Column("image_tokens", Integer, nullable=False, server_default="0"),
    Column("cost", BigInteger, nullable=False),
    # µcr the cached prompt tokens saved (price_input − price_cached_input each); `cost` is after it.
    Column("cached_saving", BigInteger, nullable=False, server_default="0"),
    Column("status", Integer, nullable=False),  # HTTP status; 499 = client disconnected
    Column("latency_ms", Integer, nullable=False, server_default="0"),
    Column("estimated", Boolean, nullable=False),
    Column("created_at", UTCDateTime, nullable=False, default=utcnow),
    Index(None, "account_id", "id"),
    Index(None, "created_at"),
)

# The primary key (account_id, key) is the claim: two replicas inserting the same key race on it, and
# exactly one INSERT wins on either dialect. `expires_at` is when the row may be reclaimed: for an
# in-progress claim, when its request must have died; for a stored response, when replay ends.
idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("account_id", Integer, ForeignKey("accounts.id"), primary_key=True),
    Column("key", String(255), primary_key=True),
    Column("fingerprint", String(64), nullable=False),  # sha256 of route + model + canonical JSON body
    Column("status", String(16), nullable=False),
    Column("claim_token", String(32), nullable=False),  # fences a reclaimed row from its old owner
    Column("request_id", String(64), nullable=True),
    Column("response_status", Integer, nullable=True),
    Column("response_body", Text, nullable=True),  # JSON text
    Column("response_headers", Text, nullable=True),  # JSON object text
    Column("created_at", UTCDateTime, nullable=False, default=utcnow),
    Column("expires_at", UTCDateTime, nullable=False),
    CheckConstraint("status IN ('in_progress', 'completed', 'streamed')", name="status"),
    Index(None, "expires_at"),
)

# A code is `ttc-<id>-<secret>`; only the id and sha256(secret) are stored. Redeeming is one conditional
# UPDATE ... WHERE redeemed_at IS NULL, so of two concurrent redeemers exactly one sees its row.
redemption_codes = Table(
    "redemption_codes",
    metadata,
    Column("id", String(8), primary_key=True),
    Column("code_sha256", String(64), nullable=False),
    Column("credits", BigInteger, nullable=False),  # µcr
    Column("created_at", UTCDateTime, nullable=False, default=utcnow),
    Column("expires_at", UTCDateTime, nullable=True),  # NULL = never
    Column("redeemed_at", UTCDateTime, nullable=True),
    Column("redeemed_by", Integer, ForeignKey("accounts.id"), nullable=True),
    Column("redeemed_key_id", String(8), nullable=True),
    CheckConstraint("credits > 0", name="credits_positive"),
    Index(None, "created_at"),
)

# `hour` is the UTC hour the usage rows were written in; `key_id` is '' for a row without a key (a
# primary-key column cannot be NULL).
usage_hourly = Table(
    "usage_hourly",
    metadata,
    Column("account_id", Integer, ForeignKey("accounts.id"), primary_key=True),
    Column("hour", UTCDateTime, primary_key=True),
    Column("model", String(128), primary_key=True),
    Column("key_id", String(8), primary_key=True),
    *(Column(name, BigInteger, nullable=False, server_default="0") for name in USAGE_COUNTERS),
    Index(None, "hour"),
)

server_secrets = Table(
    "server_secrets",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", Text, nullable=False),
    Column("created_at", UTCDateTime, nullable=False, default=utcnow),
)

# One row per stored Responses API object. `body` is the `response` JSON as the client got it;
# `conversation` the chat messages it ended with (input, then the answer), which `previous_response_id`
# puts before a new request's input. Reads always name the account: another account's id is not found.
responses = Table(
    "responses",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("account_id", Integer, ForeignKey("accounts.id"), nullable=False),
    Column("key_id", String(8), nullable=True),
    Column("model", String(128), nullable=False),
    Column("body", Text, nullable=False),  # JSON object text
    Column("conversation", Text, nullable=False),  # JSON list text
    Column("created_at", UTCDateTime, nullable=False, default=utcnow),
    Index(None, "account_id", "created_at"),
)
