"""Storage: the schema (`schema`) and the migrated async engine (`db.open_database`)."""

from __future__ import annotations

from tokentill.storage.db import Database, open_database

__all__ = ["Database", "open_database"]
