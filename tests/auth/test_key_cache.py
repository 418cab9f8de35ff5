"""The key cache of two replicas sharing one database: a cached key never outlives its revocation where
money moves, because every credit hold checks the key as the request was admitted under it."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import func, select

from tests._services import run_with_db
from tokentill.auth.service import KeyStore, Principal
from tokentill.billing.ledger import KeyChanged, KeyTerms, Ledger
from tokentill.errors import AuthenticationFailed
from tokentill.storage import Database
from tokentill.storage.schema import holds


def _terms(principal: Principal) -> KeyTerms:
    return KeyTerms(principal.key_id, principal.rpm, principal.tpm, principal.max_concurrent)


async def _open_holds(db: Database) -> int:
    async with db.read() as conn:
        return int((await conn.execute(select(func.count()).select_from(holds))).scalar_one())


def test_revocation_on_one_replica_stops_the_holds_of_the_other_at_once(database_url: str) -> None:
    async def body(db: Database) -> None:
        ledger = Ledger(db)
        await ledger.create_account("acme", 10_000)
        replica_a, replica_b = KeyStore(db, cache_s=1.0), KeyStore(db, cache_s=1.0)
        created = await replica_a.create_key("acme", rpm=60)
        cached = await replica_b.authenticate(created.key, cached=True)
        hold = await ledger.reserve(
            account_id=cached.account_id,
            key_id=cached.key_id,
            request_id="req-before",
            amount=100,
            ttl_s=60,
            key=_terms(cached),
        )
        assert hold.balance_after == 9_900

        assert await replica_a.revoke(created.key_id)
        # B's cache still answers for up to cache_s (no table read), but no credit moves for the key:
        assert await replica_b.authenticate(created.key, cached=True) == cached
        with pytest.raises(KeyChanged):
            await ledger.reserve(
                account_id=cached.account_id,
                key_id=cached.key_id,
                request_id="req-after",
                amount=100,
                ttl_s=60,
                key=_terms(cached),
            )
        assert await ledger.balance(cached.account_id) == 9_900 and await _open_holds(db) == 1
        # and a fresh read (what a chat route does before any refusal) is the 401
        with pytest.raises(AuthenticationFailed):
            await replica_b.authenticate(created.key)
        with pytest.raises(AuthenticationFailed):  # the 401 also dropped B's cached entry
            await replica_b.authenticate(created.key, cached=True)

    run_with_db(database_url, body)


def test_changed_limits_refuse_holds_under_the_old_ones(database_url: str) -> None:
    async def body(db: Database) -> None:
        ledger = Ledger(db)
        await ledger.create_account("acme", 10_000)
        replica_a, replica_b = KeyStore(db, cache_s=1.0), KeyStore(db, cache_s=1.0)
        created = await replica_a.create_key("acme")  # no limits: NULLs compare equal
        cached = await replica_b.authenticate(created.key, cached=True)
        assert await replica_a.update_limits(created.key_id, rpm=5)
        with pytest.raises(KeyChanged):
            await ledger.reserve(
                account_id=cached.account_id,
                key_id=cached.key_id,
                request_id="req-old-limits",
                amount=100,
                ttl_s=60,
                key=_terms(cached),
            )
        fresh = await replica_b.authenticate(created.key)
        assert fresh.rpm == 5
        hold = await ledger.reserve(
            account_id=fresh.account_id,
            key_id=fresh.key_id,
            request_id="req-new-limits",
            amount=100,
            ttl_s=60,
            key=_terms(fresh),
        )
        assert hold.balance_after == 9_900

    run_with_db(database_url, body)


def test_the_cache_checks_the_secret_and_forgets_what_its_own_store_revokes(database_url: str) -> None:
    async def body(db: Database) -> None:
        await Ledger(db).create_account("acme", 10_000)
        store = KeyStore(db, cache_s=1.0)
        created = await store.create_key("acme")
        await store.authenticate(created.key, cached=True)
        with pytest.raises(AuthenticationFailed):  # the id is cached, the secret is wrong
            await store.authenticate(f"tt-{created.key_id}-{'A' * 43}", cached=True)
        assert await store.revoke(created.key_id)
        with pytest.raises(AuthenticationFailed):
            await store.authenticate(created.key, cached=True)

    run_with_db(database_url, body)


def test_cached_authentications_that_miss_together_read_the_key_once(database_url: str) -> None:
    """A busy key's entry expiring sends the requests that arrive during its re-read to that one read,
    not each to the database; each still has its own secret checked, and one that gives up (its client
    left) leaves the read to the others."""

    async def body(db: Database) -> None:
        await Ledger(db).create_account("acme", 10_000)
        created = await KeyStore(db).create_key("acme")
        wrong = created.key[:-1] + ("A" if created.key[-1] != "A" else "B")
        store = KeyStore(db, cache_s=1.0)  # nothing cached yet: every call below misses

        async def refused() -> None:
            with pytest.raises(AuthenticationFailed):
                await store.authenticate(wrong, cached=True)

        results = await asyncio.gather(
            *(store.authenticate(created.key, cached=True) for _ in range(20)), refused()
        )
        assert store.reads == 1
        assert {principal.key_id for principal in results[:20]} == {created.key_id}

        fresh = KeyStore(db, cache_s=1.0)
        leaving = asyncio.ensure_future(fresh.authenticate(created.key, cached=True))
        staying = asyncio.ensure_future(fresh.authenticate(created.key, cached=True))
        await asyncio.sleep(0)  # both wait on the one read now
        leaving.cancel()
        assert (await staying).key_id == created.key_id
        assert leaving.cancelled() and fresh.reads == 1

    run_with_db(database_url, body)
