"""IdempotencyStore on a real SQLite file and a real PostgreSQL database: claim, replay, conflicts,
expiry and take-over, and concurrent claims of which exactly one wins."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

import pytest

from tests._services import run, run_with_db
from tokentill import errors
from tokentill.billing.ledger import Ledger
from tokentill.idempotency import Claim, IdempotencyStore, Replay, check_key, fingerprint
from tokentill.storage.db import Database, open_database
from tokentill.storage.schema import utcnow

TTL_S = 100.0
ABANDON_S = 10.0


class Clock:
    def __init__(self) -> None:
        self.now = utcnow()

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


async def _account(db: Database) -> int:
    return (await Ledger(db).create_account("idem", 1000)).id


def _store(db: Database, clock: Clock) -> IdempotencyStore:
    return IdempotencyStore(db, ttl_s=TTL_S, abandon_after_s=ABANDON_S, clock=clock)


async def _conflict(store: IdempotencyStore, account: int, key: str, fp: str) -> errors.Conflict:
    with pytest.raises(errors.Conflict) as info:
        await store.claim(account, key, fp, "req_x")
    return info.value


def test_fingerprint_is_canonical_and_covers_route_and_model() -> None:
    a = fingerprint("chat", "m", {"b": 1, "a": [1, {"y": 2, "x": "é"}]})
    assert a == fingerprint("chat", "m", {"a": [1, {"x": "é", "y": 2}], "b": 1})
    assert a != fingerprint("model", "m", {"b": 1, "a": [1, {"y": 2, "x": "é"}]})
    assert a != fingerprint("chat", "m2", {"b": 1, "a": [1, {"y": 2, "x": "é"}]})
    assert a != fingerprint("chat", "m", {"b": 2, "a": [1, {"y": 2, "x": "é"}]})


@pytest.mark.parametrize("key", ["", "a b", "x" * 256, "ключ"])
def test_bad_keys_are_400(key: str) -> None:
    with pytest.raises(errors.InvalidRequest):
        check_key(key)
    assert check_key("3f2c-UUID_like.key:1") == "3f2c-UUID_like.key:1"


def test_claim_complete_replay_and_conflicts(database_url: str) -> None:
    async def body(db: Database) -> None:
        clock = Clock()
        store = _store(db, clock)
        account = await _account(db)
        claim = await store.claim(account, "k1", "fp", "req_1")
        assert isinstance(claim, Claim)

        running = await _conflict(store, account, "k1", "fp")
        assert "still in progress" in running.message
        assert running.headers["Retry-After"] == "1" and running.headers["x-should-retry"] == "true"
        other = await _conflict(store, account, "k1", "other")
        assert "different request" in other.message and other.headers["x-should-retry"] == "false"
        assert "Retry-After" not in other.headers

        await store.complete(claim, status=200, body={"id": "chatcmpl-1", "n": [1]}, headers={"h": "v"})
        replay = await store.claim(account, "k1", "fp", "req_2")
        assert replay == Replay(status=200, body={"id": "chatcmpl-1", "n": [1]}, headers={"h": "v"})
        assert (await _conflict(store, account, "k1", "other")).headers["x-should-retry"] == "false"

        # The same key on another account is another key.
        other_account = (await Ledger(db).create_account("idem2", 0)).id
        assert isinstance(await store.claim(other_account, "k1", "other", "req_3"), Claim)

    run_with_db(database_url, body)


def test_release_frees_the_key_and_a_stored_stream_replays(database_url: str) -> None:
    async def body(db: Database) -> None:
        store = _store(db, Clock())
        account = await _account(db)
        first = await store.claim(account, "k", "fp", "req_1")
        assert isinstance(first, Claim)
        await store.release(first)
        second = await store.claim(account, "k", "fp2", "req_2")  # released: any body may use it now
        assert isinstance(second, Claim)
        await store.complete(second, status=200, body={"id": "chatcmpl-1"}, headers={}, streamed=True)
        replay = await store.claim(account, "k", "fp2", "req_3")
        assert replay == Replay(status=200, body={"id": "chatcmpl-1"}, headers={}, streamed=True)
        await store.release(second)  # a late release after the answer changes nothing
        assert isinstance(await store.claim(account, "k", "fp2", "req_4"), Replay)
        assert "different request" in (await _conflict(store, account, "k", "fp3")).message

    run_with_db(database_url, body)


def test_expiry_and_abandoned_claims_are_reclaimed_and_fenced(database_url: str) -> None:
    async def body(db: Database) -> None:
        clock = Clock()
        store = _store(db, clock)
        account = await _account(db)
        done = await store.claim(account, "old", "fp", "req_1")
        assert isinstance(done, Claim)
        await store.complete(done, status=200, body={"a": 1}, headers={})
        clock.advance(TTL_S - 1)
        assert isinstance(await store.claim(account, "old", "fp", "req_2"), Replay)
        clock.advance(2)  # past the replay window: the key is free again, for any body
        assert isinstance(await store.claim(account, "old", "new-fp", "req_3"), Claim)

        dead = await store.claim(account, "crash", "fp", "req_4")
        assert isinstance(dead, Claim)
        clock.advance(ABANDON_S - 1)
        await _conflict(store, account, "crash", "fp")
        clock.advance(2)  # its request must have died: reclaimable
        heir = await store.claim(account, "crash", "fp", "req_5")
        assert isinstance(heir, Claim) and heir.token != dead.token
        # The presumed-dead request comes back: it can neither overwrite nor delete its heir's row.
        await store.complete(dead, status=200, body={"stale": True}, headers={})
        await store.release(dead)
        await _conflict(store, account, "crash", "fp")  # the heir's claim still stands
        await store.complete(heir, status=200, body={"fresh": True}, headers={})
        replay = await store.claim(account, "crash", "fp", "req_6")
        assert isinstance(replay, Replay) and replay.body == {"fresh": True}

        clock.advance(TTL_S + 1)
        assert await store.purge_expired() == 2  # "old" (in progress, abandoned) and "crash" (expired)

    run_with_db(database_url, body)


def test_concurrent_claims_exactly_one_wins(database_url: str) -> None:
    """Four connection pools (as four replicas would have), 24 simultaneous claims of one key."""

    async def main() -> None:
        dbs = [await open_database(database_url) for _ in range(4)]
        try:
            account = await _account(dbs[0])
            stores = [IdempotencyStore(db, ttl_s=TTL_S, abandon_after_s=ABANDON_S) for db in dbs]

            async def attempt(i: int) -> Claim | Replay | errors.Conflict:
                try:
                    return await stores[i % 4].claim(account, "race", "fp", f"req_{i}")
                except errors.Conflict as exc:
                    return exc

            outcomes = await asyncio.gather(*(attempt(i) for i in range(24)))
            assert sum(isinstance(o, Claim) for o in outcomes) == 1
            assert sum(isinstance(o, errors.Conflict) for o in outcomes) == 23
        finally:
            for db in dbs:
                await db.aclose()

    run(main())
