"""The console: redemption codes, an hourly usage rollup (filled from existing usage), server secrets.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02

Self-contained on purpose (no imports from tokentill), like 0001.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None

_COUNTERS = (
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "reasoning_tokens",
    "cached_tokens",
    "image_tokens",
    "cost",
)


def _ts(name: str, *, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "redemption_codes",
        sa.Column("id", sa.String(8), nullable=False),
        sa.Column("code_sha256", sa.String(64), nullable=False),
        sa.Column("credits", sa.BigInteger(), nullable=False),
        _ts("created_at"),
        _ts("expires_at", nullable=True),
        _ts("redeemed_at", nullable=True),
        sa.Column("redeemed_by", sa.Integer(), nullable=True),
        sa.Column("redeemed_key_id", sa.String(8), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_redemption_codes"),
        sa.ForeignKeyConstraint(
            ["redeemed_by"], ["accounts.id"], name="fk_redemption_codes_redeemed_by_accounts"
        ),
        sa.CheckConstraint("credits > 0", name="ck_redemption_codes_credits_positive"),
    )
    op.create_index("ix_redemption_codes_created_at", "redemption_codes", ["created_at"])
    op.create_table(
        "usage_hourly",
        sa.Column("account_id", sa.Integer(), nullable=False),
        _ts("hour"),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("key_id", sa.String(8), nullable=False),
        *(sa.Column(name, sa.BigInteger(), nullable=False, server_default="0") for name in _COUNTERS),
        sa.PrimaryKeyConstraint("account_id", "hour", "model", "key_id", name="pk_usage_hourly"),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], name="fk_usage_hourly_account_id_accounts"),
    )
    op.create_index("ix_usage_hourly_hour", "usage_hourly", ["hour"])
    op.create_table(
        "server_secrets",
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        _ts("created_at"),
        sa.PrimaryKeyConstraint("name", name="pk_server_secrets"),
    )
    _backfill_rollup()


def _backfill_rollup() -> None:
    """Sum the usage rows written before this revision into `usage_hourly` (one statement)."""
    if op.get_bind().dialect.name == "postgresql":
        hour = "date_trunc('hour', created_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'"
    else:  # SQLAlchemy's SQLite text form: 'YYYY-MM-DD HH:MM:SS.ffffff', UTC
        hour = "strftime('%Y-%m-%d %H:00:00.000000', created_at)"
    op.execute(
        "INSERT INTO usage_hourly (account_id, hour, model, key_id, requests, prompt_tokens, "
        "completion_tokens, reasoning_tokens, cached_tokens, image_tokens, cost) "
        f"SELECT account_id, {hour}, model, coalesce(key_id, ''), count(*), sum(prompt_tokens), "
        "sum(completion_tokens), sum(reasoning_tokens), sum(cached_tokens), sum(image_tokens), sum(cost) "
        f"FROM usage GROUP BY account_id, {hour}, model, coalesce(key_id, '')"
    )


def downgrade() -> None:
    op.drop_table("server_secrets")
    op.drop_table("usage_hourly")
    op.drop_table("redemption_codes")
