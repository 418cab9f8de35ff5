"""Cached-input pricing: the credits each usage row saved on prompt tokens served from the prefix cache.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03

Self-contained on purpose (no imports from tokentill), like 0001.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    # µcr not charged because cached prompt tokens cost `price_cached_input` instead of `price_input`.
    for table in ("usage", "usage_hourly"):
        op.add_column(table, sa.Column("cached_saving", sa.BigInteger(), nullable=False, server_default="0"))


def downgrade() -> None:
    for table in ("usage_hourly", "usage"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("cached_saving")
