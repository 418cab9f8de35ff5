"""Replicas whose own clocks disagree: hold and idempotency expiries follow the database's clock.

A "replica" here is this process with its Python clock moved an hour ahead (`utcnow` wherever tokentill
reads it itself), while the database keeps its own time. On PostgreSQL that is exactly a replica on a
host whose clock runs ahead; on SQLite (one machine, one clock, see `Database.now`) it checks that no
expiry decision reads the replica's clock either.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from tests._services import run_with_db
from tokentill import errors
from tokentill.billing.ledger import Ledger
from tokentill.idempotency import Claim, IdempotencyStore
from tokentill.storage import Database
from tokentill.storage.schema import utcnow

AHEAD = timedelta(hours=1)


def _run_ahead(monkeypatch: pytest.MonkeyPatch) -> None:
    def ahead() -> datetime:
        return utcnow() + AHEAD

    for module in ("tokentill.billing.ledger", "tokentill.storage.schema"):
        monkeypatch.setattr(f"{module}.utcnow", ahead)


def test_a_replica_ahead_cannot_expire_live_holds(database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(db: Database) -> None:
        book = Ledger(db)
        account = await book.create_account("skew", 10_000)
        await book.reserve(account_id=account.id, key_id=None, request_id="live", amount=4_000, ttl_s=600)
        _run_ahead(monkeypatch)
        ahead = Ledger(db)
        assert await ahead.release_expired() == 0  # the hold has ten minutes to go by the database
        assert await ahead.balance(account.id) == 6_000
        hold = await ahead.reserve(account_id=account.id, key_id=None, request_id="b", amount=1, ttl_s=600)
        now = utcnow()  # the database's time here is the real one (the patch moved the replica's)
        assert now < hold.expires_at <= now + timedelta(seconds=601)

    run_with_db(database_url, body)


def test_a_replica_ahead_cannot_take_over_a_live_claim(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def body(db: Database) -> None:
        account = (await Ledger(db).create_account("skew", 10)).id
        first = IdempotencyStore(db, ttl_s=3600, abandon_after_s=60)
        assert isinstance(await first.claim(account, "k", "fp", "req_a"), Claim)
        _run_ahead(monkeypatch)
        ahead = IdempotencyStore(db, ttl_s=3600, abandon_after_s=60)
        with pytest.raises(errors.Conflict) as info:  # still running by the database's clock
            await ahead.claim(account, "k", "fp", "req_b")
        assert "still in progress" in info.value.message
        assert await ahead.purge_expired() == 0

    run_with_db(database_url, body)
