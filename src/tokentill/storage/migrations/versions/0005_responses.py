"""Responses API: the `responses` table of objects kept with `store: true`.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03

Self-contained on purpose (no imports from tokentill), like 0001.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "responses",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("account_id", sa.Integer(), nullable=False),
        sa.Column("key_id", sa.String(8), nullable=True),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("conversation", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], name="fk_responses_account_id_accounts"),
        sa.PrimaryKeyConstraint("id", name="pk_responses"),
    )
    op.create_index("ix_responses_account_id_created_at", "responses", ["account_id", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_responses_account_id_created_at", table_name="responses")
    op.drop_table("responses")
