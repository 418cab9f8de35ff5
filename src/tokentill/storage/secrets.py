"""Named random secrets that every replica shares, kept in the `server_secrets` table.

`get_or_create_secret(db, name)` returns the one value stored under `name`, creating it on first use.
Race-safe across processes and replicas: each caller tries `INSERT ... ON CONFLICT DO NOTHING` with a
fresh random value, then reads the row back, so whoever inserted first wins and everyone returns the
winner's value.
"""

from __future__ import annotations

import secrets
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite

from tokentill.storage.db import Database
from tokentill.storage.schema import server_secrets, utcnow

__all__ = ["get_or_create_secret"]


async def get_or_create_secret(db: Database, name: str, *, nbytes: int = 32) -> str:
    """The secret stored as `name` (URL-safe text of `nbytes` random bytes when created here)."""
    if not name or len(name) > 64:
        raise ValueError(f"secret names are 1-64 characters: {name!r}")
    values = {"name": name, "value": secrets.token_urlsafe(nbytes), "created_at": utcnow()}
    insert: Any = postgresql.insert if db.dialect == "postgresql" else sqlite.insert
    async with db.begin() as conn:
        await conn.execute(
            insert(server_secrets).values(values).on_conflict_do_nothing(index_elements=["name"])
        )
        value = (
            await conn.execute(select(server_secrets.c.value).where(server_secrets.c.name == name))
        ).scalar_one()
    return str(value)
