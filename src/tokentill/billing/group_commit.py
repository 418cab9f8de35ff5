"""Group commit: one writer task applies the credit holds and settlements of many requests per transaction.

    request tasks                               the writer task (one per process and event loop)
    ─────────────                               ─────────────────
    reserve() / settle() / release()  ──put──►  queue
      await the op's future                     take everything queued (at most MAX_BATCH ops)
                                                one write transaction:
                                                  (PostgreSQL: lock the batch's accounts, id order)
                                                  each op in arrival order, its own statements:
                                                    a hold the balance or key refuses writes nothing
                                                    and is refused alone, the rest goes on
                                                commit, then resolve every op's future
                                                (next batch: what queued meanwhile)

`GroupCommit` has `Ledger`'s `reserve`, `settle` and `release`, with the same results and errors, and the
same guarantee: when the call returns, its rows are committed. What batching changes is the cost: one
commit for N requests instead of one each, and on PostgreSQL a hot account row is locked once per batch
instead of once per request (the 64 concurrent requests of one customer no longer queue one commit
behind the other on its row lock). How a batch runs depends on the database:

  SQLite      one synchronous function (`_sqlite_walk`) run by `Database.run_write` on the database's
              writer thread and its own sqlite3 connection (`sqlite_statements`): one hand-off to the
              thread for the whole batch, so even a batch of one goes this way;
  PostgreSQL  each op's one-statement hold, settlement or release (`pg_statements`, what `Ledger` runs
              for a request alone), one round trip each, in one transaction on a raw asyncpg connection
              (`Database.direct_transaction`); a batch of one is `Ledger`'s single statement in
              autocommit.

Both walk the batch the same way (`_walk`). Through SQLAlchemy, the statements of a batch cost more CPU
than the database took to run them (docs/performance.md, docs/decisions.md "Hot path").

Money rules kept (DESIGN §4): the balance check is per account, in arrival order, inside the transaction
that writes (the account rows are locked for it), so a hold never overdraws; a hold the balance or its key
refuses writes nothing and the rest of the batch goes on.

Failures: an outage (`ServiceUnavailable`) fails every op of the batch with 503, as each would have failed
alone (settlements then go to the spool, `billing.settlement`). Any other error rolls the batch back and
every op is retried alone through `Ledger`, so an op that cannot be applied fails by itself. A settlement
whose hold the batch finds not open (already settled, or expired by the sweeper) is handed to `Ledger`
after the batch commits, which knows those cases.

Cancellation: a settlement or release is applied once queued (callers shield it anyway). A reserve whose
caller is cancelled before the writer takes it is dropped; one cancelled later is released by the writer
once committed, so no hold waits for the sweeper.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Generator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol

from tokentill import metrics
from tokentill.billing import pg_statements, sqlite_statements
from tokentill.billing.ledger import Ledger, hold_refused
from tokentill.billing.records import Hold, KeyChanged, KeyTerms, UsageRecord
from tokentill.errors import ServiceUnavailable
from tokentill.storage.db import Database
from tokentill.storage.pg_direct import BatchSource
from tokentill.storage.schema import utcnow

__all__ = ["MAX_BATCH", "GroupCommit", "HoldBook"]

log = logging.getLogger(__name__)

MAX_BATCH = 256  # ops per transaction: bounds a batch's length and the time it holds its locks


class HoldBook(Protocol):
    """Where requests reserve and settle: `Ledger` (a transaction each) or `GroupCommit` (batched)."""

    async def reserve(
        self,
        *,
        account_id: int,
        key_id: str | None,
        request_id: str,
        amount: int,
        ttl_s: float,
        need_description: str | None = None,
        key: KeyTerms | None = None,
    ) -> Hold: ...

    async def settle(self, hold: Hold, *, cost: int, usage: UsageRecord) -> int: ...

    async def release(self, hold: Hold, *, usage: UsageRecord | None = None) -> int: ...


@dataclass(eq=False)
class _Reserve:
    account_id: int
    key_id: str | None
    request_id: str
    amount: int
    ttl_s: float
    need_description: str | None
    key: KeyTerms | None
    future: asyncio.Future[Any] = field(repr=False)


@dataclass(eq=False)
class _Close:
    hold: Hold
    cost: int | None  # None: a release (charge nothing)
    usage: UsageRecord | None
    future: asyncio.Future[Any] = field(repr=False)
    orphan: bool = False  # the writer's own release of a cancelled reserve: nobody awaits it


_Op = _Reserve | _Close


class GroupCommit:
    """`Ledger`'s request-path money operations, batched by one writer task (see the module docstring)."""

    def __init__(self, ledger: Ledger, db: Database) -> None:
        self._ledger = ledger
        self._db = db
        self._queue: list[_Op] = []
        self._wake: asyncio.Event | None = None
        self._writer: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self.batches = 0  # transactions the writer ran (a batch of one included)
        self.ops = 0  # ops they applied: ops / batches is the mean batch size

    async def reserve(
        self,
        *,
        account_id: int,
        key_id: str | None,
        request_id: str,
        amount: int,
        ttl_s: float,
        need_description: str | None = None,
        key: KeyTerms | None = None,
    ) -> Hold:
        """`Ledger.reserve`, committed in a batch."""
        if amount < 0:
            raise ValueError("a hold cannot be negative")
        op = _Reserve(account_id, key_id, request_id, amount, ttl_s, need_description, key, self._future())
        result: Hold = await self._submit(op)
        return result

    async def settle(self, hold: Hold, *, cost: int, usage: UsageRecord) -> int:
        """`Ledger.settle`, committed in a batch."""
        if cost < 0:
            raise ValueError("cost cannot be negative")
        result: int = await self._submit(_Close(hold, cost, usage, self._future()))
        return result

    async def release(self, hold: Hold, *, usage: UsageRecord | None = None) -> int:
        """`Ledger.release`, committed in a batch."""
        result: int = await self._submit(_Close(hold, None, usage, self._future()))
        return result

    async def aclose(self) -> None:
        """Apply what is queued, then stop the writer; later calls go straight to `Ledger`."""
        self._closing = True
        if self._writer is not None and self._loop is asyncio.get_running_loop():
            assert self._wake is not None
            self._wake.set()
            await self._writer
        self._writer = None

    # ----------------------------------------------------------------- the queue

    def _future(self) -> asyncio.Future[Any]:
        return asyncio.get_running_loop().create_future()

    async def _submit(self, op: _Op) -> Any:
        if self._closing:
            return await self._alone(op)
        self._start()
        assert self._wake is not None
        self._queue.append(op)
        self._wake.set()
        # Cancelling this await cancels the future: the writer then drops or releases the hold.
        return await op.future

    def _start(self) -> None:
        loop = asyncio.get_running_loop()
        if self._writer is None or self._loop is not loop or self._writer.done():
            if self._loop is not loop:
                self._queue.clear()  # ops of a closed event loop (tests that run one loop each)
            self._loop, self._wake = loop, asyncio.Event()
            self._writer = loop.create_task(self._write(), name="tokentill-group-commit")

    async def _write(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                batch, self._queue[:] = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
                # A reserve whose caller left before the batch began is not made at all.
                batch = [op for op in batch if not (isinstance(op, _Reserve) and op.future.cancelled())]
                if batch:
                    await self._run(batch)
            if self._closing:
                return

    async def _run(self, batch: list[_Op]) -> None:
        """Apply `batch` and resolve its futures; never raises (the writer must live on)."""
        self.batches += 1
        self.ops += len(batch)
        metrics.observe_group_commit(len(batch))
        try:
            if len(batch) == 1 and self._db.dialect != "sqlite":
                # PostgreSQL: `Ledger`'s one statement in autocommit, one round trip. (SQLite: the
                # batch, one hand-off to the writer thread, costs less even for one op.)
                outcomes = [await self._outcome(batch[0])]
            else:
                outcomes = await self._batch(batch)
        except ServiceUnavailable as exc:
            outcomes = [_outage(exc) for _ in batch]
        except Exception:
            log.exception("a group commit of %d ops failed; applying each alone", len(batch))
            outcomes = [await self._outcome(op) for op in batch]
        for op, outcome in zip(batch, outcomes, strict=True):
            self._resolve(op, outcome)

    def _resolve(self, op: _Op, outcome: object) -> None:
        if op.future.cancelled():
            if isinstance(op, _Reserve) and isinstance(outcome, Hold):
                # Its caller is gone: give the hold back now instead of leaving it to the sweeper.
                self._queue.append(_Close(outcome, None, None, self._future(), orphan=True))
                assert self._wake is not None
                self._wake.set()
            return
        if isinstance(op, _Close) and op.orphan:
            if isinstance(outcome, BaseException):
                log.warning("releasing the hold %s of a cancelled request failed: %r", op.hold.id, outcome)
            return
        if isinstance(outcome, BaseException):
            op.future.set_exception(outcome)
        else:
            op.future.set_result(outcome)

    async def _outcome(self, op: _Op) -> object:
        """`op` applied alone through `Ledger`: its result, or the exception it raised."""
        try:
            return await self._alone(op)
        except Exception as exc:
            return exc

    async def _alone(self, op: _Op) -> Any:
        if isinstance(op, _Reserve):
            return await self._ledger.reserve(
                account_id=op.account_id,
                key_id=op.key_id,
                request_id=op.request_id,
                amount=op.amount,
                ttl_s=op.ttl_s,
                need_description=op.need_description,
                key=op.key,
            )
        if op.cost is None:
            return await self._ledger.release(op.hold, usage=op.usage)
        assert op.usage is not None  # a settlement always carries its usage
        return await self._ledger.settle(op.hold, cost=op.cost, usage=op.usage)

    # ----------------------------------------------------------------- one batch, one transaction

    async def _batch(self, batch: list[_Op]) -> list[object]:
        """The batch in one transaction (see the module docstring), then what it left to `Ledger`."""
        now = utcnow()
        if self._db.dialect == "sqlite":
            outcomes, late = await self._db.run_write(lambda raw: _sqlite_walk(raw, batch, now))
        else:
            outcomes, late = await self._pg_walk(batch, now)
        for i in late:
            outcomes[i] = await self._outcome(batch[i])
        return outcomes

    async def _pg_walk(self, batch: list[_Op], now: datetime) -> tuple[list[object], list[int]]:
        accounts = {op.account_id if isinstance(op, _Reserve) else op.hold.account_id for op in batch}
        async with self._db.direct_transaction() as transaction:
            # Its statements lock accounts in arrival order; another replica's batch could take the same
            # two in the other order and both would wait for PostgreSQL's deadlock timeout: lock first.
            await pg_statements.lock_accounts(transaction, accounts)
            walk = _walk(batch)
            try:
                step, ops = next(walk)
                while True:
                    step, ops = walk.send(await _pg_run(transaction, step, ops, now))
            except StopIteration as walked:
                return walked.value  # type: ignore[no-any-return]  # _walk's return value


_Step = Literal["reserve", "why_refused", "settle", "release"]
_Run = tuple[_Step, list["_Op"]]
# Yields runs, is sent each run's results, returns (outcomes, late): see `_walk`.
_Walk = Generator[_Run, list[Any], tuple[list[object], list[int]]]


def _step(op: _Op) -> _Step:
    if isinstance(op, _Reserve):
        return "reserve"
    return "release" if op.cost is None else "settle"


def _walk(batch: list[_Op]) -> _Walk:
    """The ops of `batch` in arrival order, as the statements to run: yields each run of consecutive
    ops of one kind as (step, ops), to be sent back what that step's statement returned for each op, in
    order (`pg_statements` / `sqlite_statements`: `reserve` gives (balance after, hold time) or None,
    `why_refused` (balance or None, key live), `settle` (balance after, held, charge) or None, `release`
    the balance after or None). A run is one pipelined round trip on PostgreSQL. Returns each op's
    outcome (its result, or the refusal to raise) and the indexes of those left to `Ledger` after the
    commit: settlements and releases whose hold was not open (expired by the sweeper, or closed
    before), which `Ledger` knows."""
    outcomes: list[object] = [None] * len(batch)
    late: list[int] = []
    start = 0
    while start < len(batch):
        step = _step(batch[start])
        end = start + 1
        while end < len(batch) and _step(batch[end]) == step:
            end += 1
        run = range(start, end)
        results = yield step, batch[start:end]
        refused = [i for i, result in zip(run, results, strict=True) if result is None]
        if step == "reserve":
            # Refused in arrival order, as one request at a time would be; explained after the run.
            explained = (yield "why_refused", [batch[i] for i in refused]) if refused else []
            for i, (balance, key_live) in zip(refused, explained, strict=True):
                outcomes[i] = _explained(batch[i], balance, key_live)
        else:
            late += refused
        for i, result in zip(run, results, strict=True):
            if result is not None:
                outcomes[i] = _outcome_of(batch[i], result)
        start = end
    return outcomes, late


def _explained(op: _Op, balance: int | None, key_live: bool) -> object:
    """The refusal of hold `op`, from its account's balance and whether its key is live."""
    assert isinstance(op, _Reserve)
    balances = {} if balance is None else {op.account_id: balance}
    live = {op.key.key_id: op.key} if op.key is not None and key_live else {}
    return _refusal(op, balances, live)


def _outcome_of(op: _Op, result: Any) -> object:
    """What `op`'s caller gets for a statement that wrote: a `Hold`, or the balance after."""
    if isinstance(op, _Reserve):
        balance_after, held_at = result
        expires_at = held_at.astimezone(UTC) + timedelta(seconds=op.ttl_s)
        return Hold(
            op.request_id, op.account_id, op.key_id, op.amount, expires_at, balance_after=balance_after
        )
    if op.cost is None:  # a release
        return result
    balance, amount, _charge = result
    if op.cost > amount:
        log.warning("request %s cost %d µcr but held only %d", op.hold.id, op.cost, amount)
    return balance


async def _pg_run(transaction: BatchSource, step: _Step, ops: list[_Op], now: datetime) -> list[Any]:
    """The statements of one run on PostgreSQL: pipelined, one round trip (a refusal's: one each)."""
    if step == "why_refused":  # rare (a refused hold)
        return [await pg_statements.why_refused(transaction, op.account_id, op.key) for op in _reserves(ops)]
    if step == "reserve":
        holds = [
            pg_statements.reserve_values(
                account_id=op.account_id,
                key_id=op.key_id,
                request_id=op.request_id,
                amount=op.amount,
                ttl=timedelta(seconds=op.ttl_s),
                key=op.key,
            )
            for op in _reserves(ops)
        ]
        return list(await pg_statements.reserve_many(transaction, holds))
    closes = _closes(ops)
    if step == "release":
        releases = [(op.hold.id, op.usage) for op in closes]
        return list(await pg_statements.release_many(transaction, releases, now))
    settlements = [(op.hold.id, op.cost, op.usage) for op in closes if op.cost is not None and op.usage]
    assert len(settlements) == len(closes)  # a settlement always carries its usage
    return list(await pg_statements.settle_many(transaction, settlements, now))


def _sqlite_walk(raw: sqlite3.Connection, batch: list[_Op], now: datetime) -> tuple[list[object], list[int]]:
    """`_walk` on the writer thread's sqlite3 connection, inside its transaction. The holds' times are
    this process's clock, as `Ledger`'s on SQLite (`Database.now`)."""
    walk = _walk(batch)
    try:
        step, ops = next(walk)
        while True:
            step, ops = walk.send([_sqlite_step(raw, step, op, now) for op in ops])
    except StopIteration as walked:
        return walked.value  # type: ignore[no-any-return]  # _walk's return value


def _sqlite_step(raw: sqlite3.Connection, step: _Step, op: _Op, now: datetime) -> object:
    if isinstance(op, _Close):
        if op.cost is None:
            return sqlite_statements.release_open(raw, op.hold.id, op.usage, now)
        assert op.usage is not None  # a settlement always carries its usage
        return sqlite_statements.settle_open(raw, op.hold.id, op.cost, op.usage, now)
    if step == "why_refused":
        return sqlite_statements.why_refused(raw, op.account_id, op.key)
    balance = sqlite_statements.reserve(
        raw,
        account_id=op.account_id,
        key_id=op.key_id,
        request_id=op.request_id,
        amount=op.amount,
        now=now,
        expires_at=now + timedelta(seconds=op.ttl_s),
        key=op.key,
    )
    return None if balance is None else (balance, now)


def _reserves(ops: list[_Op]) -> list[_Reserve]:
    return [op for op in ops if isinstance(op, _Reserve)]


def _closes(ops: list[_Op]) -> list[_Close]:
    return [op for op in ops if isinstance(op, _Close)]


def _refusal(op: _Reserve, balances: dict[int, int], live: dict[str, KeyTerms]) -> Exception | None:
    """Why the batch cannot take hold `op` now (what `Ledger.reserve` raises), or None."""
    if op.key is not None and live.get(op.key.key_id) != op.key:
        return KeyChanged(f"key {op.key.key_id} was revoked or its limits changed")
    balance = balances.get(op.account_id)
    if balance is None:
        return LookupError(f"no account with id {op.account_id}")
    if balance >= op.amount:
        return None
    return hold_refused(op.amount, balance, op.need_description)


def _outage(exc: ServiceUnavailable) -> ServiceUnavailable:
    """A 503 of its own for each op of a batch the database refused (one exception, one waiter)."""
    copy = ServiceUnavailable(exc.message, retry_after_s=_retry_after(exc))
    copy.__cause__ = exc.__cause__
    return copy


def _retry_after(exc: ServiceUnavailable) -> float:
    return float(exc.headers.get("Retry-After", 1))
