"""`Idempotency-Key` on billable requests: a retried request is answered once and charged once.

Per account; a key is 1-255 printable ASCII characters. The request's *fingerprint* is the sha256 of the
route, the model and the canonical JSON body (keys sorted, no whitespace), so the same JSON written
differently is the same request. One row in `idempotency_keys` per (account, key):

    first request              claim() inserts the row 'in_progress' → `Claim`; the request runs
      answered (200, JSON)     complete(): the status, JSON body and selected headers are kept ttl_s
      answered (streamed)      complete(streamed=True): the final `chat.completion` built from the
                               stream is kept ttl_s (status 'streamed'), to be replayed as a stream
      error / stream cut off   release(): the row is deleted, nothing is stored, the client may retry
    repeat, same fingerprint   stored response → `Replay` (no hold, no limiter, no charge); the body
                               fixes `stream`, so a streamed answer is replayed as a stream;
                               still running → 409 with Retry-After
    repeat, other fingerprint  409, and `x-should-retry: false` (retrying cannot help)

Atomicity: the claim is a plain INSERT on the primary key (account_id, key), which exactly one of any
number of concurrent requests wins, on SQLite and PostgreSQL alike and across replicas. A row whose
`expires_at` has passed may be taken over: a stored response after `ttl_s`, an in-progress claim after
its lease `abandon_after_s` (seconds, `TOKENTILL_IDEMPOTENCY_LEASE_S`). A running request renews its
lease every third of it (a heartbeat task, from `claim` until `complete`/`release`, at most
`max_claim_s`), so a claim outlives its lease only while its process is alive; one whose process died
(SIGKILL, a lost database connection that never came back) is taken over a lease later. Expiries are set and
compared by the database's clock (`Database.now`), never a replica's own, so a replica whose clock runs
ahead cannot take over a live claim. Take-over is an UPDATE
fenced by the old `claim_token`, so two requests reclaiming the same row cannot both win, and a request
that was presumed dead and comes back later cannot overwrite or delete its successor's row (every write
names its own token).

The official openai SDK retries a 409 by itself (honouring `Retry-After` and `x-should-retry`), so a
client whose retry overlaps the still-running first attempt simply waits for its stored answer.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from tokentill import errors
from tokentill.storage.db import Database
from tokentill.storage.schema import idempotency_keys

__all__ = ["Claim", "IdempotencyStore", "Replay", "check_key", "fingerprint"]

log = logging.getLogger(__name__)

MAX_KEY_LENGTH = 255
IN_PROGRESS_RETRY_S = 1


@dataclass(frozen=True)
class Claim:
    """This request owns the key until it calls exactly one of complete / release."""

    account_id: int
    key: str
    token: str


@dataclass(frozen=True)
class Replay:
    """The stored answer of the first request with this key; `streamed`: `body` is the `chat.completion`
    that the first request's stream added up to, to be replayed as a stream."""

    status: int
    body: Any
    headers: dict[str, str]
    streamed: bool = False


def check_key(key: str) -> str:
    """The key itself, or `InvalidRequest` (400) when it is empty, too long or not printable ASCII."""
    if not 1 <= len(key) <= MAX_KEY_LENGTH or not all(33 <= ord(c) <= 126 for c in key):
        raise errors.InvalidRequest(
            f"Invalid Idempotency-Key header: use 1 to {MAX_KEY_LENGTH} printable ASCII characters "
            "without spaces (a UUID is a good choice).",
            code="invalid_value",
        )
    return key


def fingerprint(route: str, model: str, body: Any) -> str:
    """sha256 hex of the route, the model and the canonical JSON of `body`."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(f"{route}\n{model}\n{canonical}".encode()).hexdigest()


def _conflict(message: str, *, retry: bool) -> errors.Conflict:
    headers = {"x-should-retry": "true" if retry else "false"}
    if retry:
        headers["Retry-After"] = str(IN_PROGRESS_RETRY_S)
    return errors.Conflict(message, code="idempotency_key_reused", headers=headers)


class IdempotencyStore:
    """Claims and stored responses in one `Database`; see the module docstring for the contract.

    `complete` and `release` never raise (they run in `finally:` blocks): a failure is
    logged and the row then simply stays 'in_progress' until its lease runs out (`abandon_after_s`
    after the last heartbeat).
    """

    def __init__(
        self,
        db: Database,
        *,
        ttl_s: float,
        abandon_after_s: float,
        max_claim_s: float = 3600.0,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        """`abandon_after_s` is the claim's lease; `max_claim_s` bounds its heartbeat (a request never
        runs longer: its deadline plus a grace). `clock` replaces the database's clock (tests move time)."""
        self._db = db
        self._ttl = timedelta(seconds=ttl_s)
        self._abandon = timedelta(seconds=abandon_after_s)
        self._max_claim_s = max_claim_s
        self._clock = clock
        self._heartbeats: dict[str, asyncio.Task[None]] = {}  # by claim token

    async def aclose(self) -> None:
        """Stop every heartbeat (shutdown); the claims then expire a lease later unless closed."""
        tasks = list(self._heartbeats.values())
        self._heartbeats.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _start_heartbeat(self, claim: Claim) -> Claim:
        self._heartbeats[claim.token] = asyncio.create_task(self._heartbeat(claim), name="idempotency-lease")
        return claim

    def _stop_heartbeat(self, claim: Claim) -> None:
        task = self._heartbeats.pop(claim.token, None)
        if task is not None:
            task.cancel()

    async def _heartbeat(self, claim: Claim) -> None:
        """Renew the claim's lease every third of it while its request runs."""
        interval = self._abandon.total_seconds() / 3
        deadline = time.monotonic() + self._max_claim_s
        try:
            while time.monotonic() < deadline:
                await asyncio.sleep(interval)
                try:
                    async with self._db.begin() as conn:
                        now = await self._now(conn)
                        renewed = await conn.execute(
                            update(idempotency_keys)
                            .where(*self._running(claim))
                            .values(expires_at=now + self._abandon)
                        )
                    if renewed.rowcount != 1:
                        return  # closed, or taken over after the lease ran out during an outage
                except errors.ServiceUnavailable:
                    continue  # the database is out: try again on the next beat
                except Exception:
                    log.exception("renewing an idempotency claim failed; will retry")
        finally:
            if self._heartbeats.get(claim.token) is asyncio.current_task():
                del self._heartbeats[claim.token]

    async def claim(self, account_id: int, key: str, fingerprint: str, request_id: str) -> Claim | Replay:
        """Own `key` for this request (`Claim`), or get the first request's stored answer (`Replay`).

        Raises `Conflict` (409) for another body under the same key, a first request still running
        (with Retry-After) or one that was streamed.
        """
        for _attempt in range(5):
            token = secrets.token_hex(16)
            fresh = {
                "fingerprint": fingerprint,
                "status": "in_progress",
                "claim_token": token,
                "request_id": request_id,
                "response_status": None,
                "response_body": None,
                "response_headers": None,
            }
            try:
                async with self._db.begin() as conn:
                    now = await self._now(conn)
                    await conn.execute(
                        insert(idempotency_keys).values(
                            account_id=account_id, key=key, **fresh, **self._times(now)
                        )
                    )
                return self._start_heartbeat(Claim(account_id, key, token))
            except IntegrityError:
                pass  # the key exists: look at it (in a new transaction: PostgreSQL aborted this one)
            async with self._db.begin() as conn:
                now = await self._now(conn)
                row = (await conn.execute(select(idempotency_keys).where(*self._pk(account_id, key)))).first()
                if row is None:
                    continue  # released between our INSERT and SELECT: try to insert again
                if row.expires_at > now:
                    return self._answer(row, fingerprint)
                # Expired (replay window over, or its request died): take it over, fenced by the old
                # token so that of two reclaimers only one wins.
                taken = await conn.execute(
                    update(idempotency_keys)
                    .where(*self._pk(account_id, key), idempotency_keys.c.claim_token == row.claim_token)
                    .values(**fresh, **self._times(now))
                )
                if taken.rowcount == 1:
                    log.info("idempotency key of account %d reclaimed from status %s", account_id, row.status)
                    return self._start_heartbeat(Claim(account_id, key, token))
        raise errors.Overloaded("Could not claim the Idempotency-Key under contention; please retry.")

    async def complete(
        self, claim: Claim, *, status: int, body: Any, headers: dict[str, str], streamed: bool = False
    ) -> None:
        """Store the answer for replay during `ttl_s` (`streamed`: replay it as a stream)."""
        await self._close(
            claim,
            status="streamed" if streamed else "completed",
            response_status=status,
            response_body=json.dumps(body, separators=(",", ":")),
            response_headers=json.dumps(headers),
        )

    async def release(self, claim: Claim) -> None:
        """Forget the claim: nothing is stored and the same key may be used again at once."""
        self._stop_heartbeat(claim)
        try:
            async with self._db.begin() as conn:
                await conn.execute(delete(idempotency_keys).where(*self._running(claim)))
        except errors.ServiceUnavailable:
            log.warning("could not release an idempotency key (database unavailable); its lease runs out")
        except Exception:
            log.exception("could not release an idempotency key; it frees itself when abandoned")

    async def purge_expired(self) -> int:
        """Delete rows whose `expires_at` has passed; returns how many. Safe on any number of replicas."""
        async with self._db.begin() as conn:
            now = await self._now(conn)
            result = await conn.execute(delete(idempotency_keys).where(idempotency_keys.c.expires_at <= now))
        return int(result.rowcount)

    async def _close(self, claim: Claim, **values: Any) -> None:
        self._stop_heartbeat(claim)
        try:
            await self._store(claim, values)
        except errors.ServiceUnavailable:
            # The answer was given (and billed): keep trying to store it, so that the client's retry
            # finds it rather than running again once the lease has run out.
            log.warning(
                "could not store the answer of an idempotent request (database unavailable); retrying"
            )
            task = asyncio.create_task(self._store_later(claim, values), name="idempotency-store")
            self._heartbeats[claim.token] = task
        except Exception:
            log.exception("could not store the answer of an idempotent request")

    async def _store(self, claim: Claim, values: dict[str, Any]) -> None:
        async with self._db.begin() as conn:
            now = await self._now(conn)
            result = await conn.execute(
                update(idempotency_keys)
                .where(*self._running(claim))
                .values(expires_at=now + self._ttl, **values)
            )
        if result.rowcount != 1:
            log.warning("idempotency claim was taken over before it finished; its answer is not kept")

    async def _store_later(self, claim: Claim, values: dict[str, Any]) -> None:
        """Retry `_store` every second at most (the lease is running out) until `max_claim_s`."""
        deadline = time.monotonic() + self._max_claim_s
        delay = 0.2
        try:
            while time.monotonic() < deadline:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                try:
                    await self._store(claim, values)
                except errors.ServiceUnavailable:
                    continue
                except Exception:
                    log.exception("could not store the answer of an idempotent request")
                return
        finally:
            if self._heartbeats.get(claim.token) is asyncio.current_task():
                del self._heartbeats[claim.token]

    def _times(self, now: datetime) -> dict[str, datetime]:
        return {"created_at": now, "expires_at": now + self._abandon}

    async def _now(self, conn: AsyncConnection) -> datetime:
        return self._clock() if self._clock is not None else await self._db.now(conn)

    @staticmethod
    def _pk(account_id: int, key: str) -> tuple[Any, Any]:
        return idempotency_keys.c.account_id == account_id, idempotency_keys.c.key == key

    @classmethod
    def _running(cls, claim: Claim) -> tuple[Any, ...]:
        """The claim's row, only while it is still this claim's and in progress (fenced by its token)."""
        return (
            *cls._pk(claim.account_id, claim.key),
            idempotency_keys.c.claim_token == claim.token,
            idempotency_keys.c.status == "in_progress",
        )

    @staticmethod
    def _answer(row: Any, fingerprint: str) -> Replay:
        if row.fingerprint != fingerprint:
            raise _conflict(
                "This Idempotency-Key was already used with a different request (body, model or route). "
                "Use a new key for a new request.",
                retry=False,
            )
        if row.status == "in_progress":
            raise _conflict(
                "A request with this Idempotency-Key is still in progress. Retry after it finishes to "
                "receive its response.",
                retry=True,
            )
        if row.response_body is None:  # a stream recorded by an earlier version, which kept no answer
            raise _conflict(
                "The request with this Idempotency-Key was streamed; it was answered and charged once, "
                "and a streamed response cannot be replayed. Use a new key for a new request.",
                retry=False,
            )
        return Replay(
            status=int(row.response_status),
            body=json.loads(row.response_body),
            headers=dict(json.loads(row.response_headers or "{}")),
            streamed=row.status == "streamed",
        )
