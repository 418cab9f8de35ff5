"""Settlements that survive a database outage: an answer delivered is billed exactly once.

`Settlements.settle` / `release` write the settlement to the local spool (`storage.spool`,
DATA_DIR/spool: a plain write, which survives a SIGKILL) and mark it pending (`pending`: the hold ids
this process still owes a settlement), then try the ledger at once (the normal case: one transaction, or
with `GroupCommit` one batch's, the balance after it returned; the spool line is then marked done). When
the database is unreachable (`ServiceUnavailable`), the settlement is

    1. fsynced in the spool before returning (it now survives a power cut too),
    2. retried in the background with exponential backoff (0.2 s doubling to 5 s) for `retry_s`;
       when it commits, it is marked done in the spool and leaves `pending`.

A process that dies with settlements still spooled replays them at its next start (`replay`, before the
hold sweeper first runs). The sweeper skips `pending` holds, so it never hands back money that an answer
already delivered still owes.

Never twice: `Ledger.settle` and `Ledger.release` close the hold with one conditional UPDATE (`WHERE status
IN ('open','expired')`), so a retry of a settlement that did commit (its acknowledgement was lost with the
connection), a replay of one that a live retry also finishes, or two processes replaying the same file
all change the books once. If another replica's sweeper expired the hold first, the late settlement still
charges the answer, from the balance (never below zero), as `Ledger.settle` does for any late settlement.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import fields
from datetime import datetime
from typing import Any

from tokentill import metrics
from tokentill.billing.group_commit import HoldBook
from tokentill.billing.records import Hold, UsageRecord
from tokentill.errors import ServiceUnavailable
from tokentill.storage.spool import Spool

__all__ = ["Settlements"]

log = logging.getLogger(__name__)

_FIRST_DELAY_S = 0.2
_MAX_DELAY_S = 5.0
_USAGE_FIELDS = tuple(f.name for f in fields(UsageRecord))  # flat: no asdict deep copy per request


class Settlements:
    """Settle or release holds through `ledger` (a `Ledger`, or a `GroupCommit` that batches them),
    keeping what the database refused in `spool`."""

    def __init__(self, ledger: HoldBook, spool: Spool, *, retry_s: float) -> None:
        self._ledger = ledger
        self._spool = spool
        self._retry_s = retry_s
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.pending: set[str] = set()  # hold ids whose settlement has not committed yet

    async def settle(self, hold: Hold, *, cost: int, usage: UsageRecord) -> int | None:
        """`Ledger.settle`, or, while the database is out, spooled and retried (then None: no balance)."""
        return await self._apply({"op": "settle", "cost": cost, **_fields(hold, usage)})

    async def release(self, hold: Hold, *, usage: UsageRecord | None = None) -> int | None:
        """`Ledger.release`, or spooled and retried like `settle`."""
        return await self._apply({"op": "release", **_fields(hold, usage)})

    async def replay(self) -> int:
        """Settle what dead processes (this one before a restart) left in the spool; returns how many
        records were adopted. Those that still fail are retried in the background."""
        records = await asyncio.to_thread(self._spool.adopt)
        for record in records:
            self.pending.add(str(record["id"]))
        for record in records:
            try:
                await self._commit(record)
            except ServiceUnavailable:
                self._retry_later(record)
            except Exception:
                # Cannot apply here (say, a spool from another database): keep the start-up going and
                # leave the whole record in the log for the operator.
                log.exception("spooled settlement cannot be applied and is dropped: %s", record)
                self._finished(str(record["id"]))
        if records:
            log.warning("replayed %d spooled settlement(s) at start-up", len(records))
        return len(records)

    async def aclose(self) -> None:
        """Stop retrying; what is still pending stays in the spool for the next start."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        if self.pending:
            log.warning("%d settlement(s) still pending at shutdown; kept in the spool", len(self.pending))

    async def _apply(self, record: dict[str, Any]) -> int | None:
        hold_id = str(record["id"])
        # Written before the first attempt: a process killed while that attempt waits on the database
        # (up to the connect timeout) leaves the settlement for the next start to replay.
        self._spool.append(record)
        self.pending.add(hold_id)
        try:
            balance = await self._run(record)
        except ServiceUnavailable:
            await asyncio.to_thread(self._spool.sync)
            log.warning("settlement of %s spooled while the database is out; retrying", hold_id)
            metrics.observe_deferred_settlement("spooled")
            self._retry_later(record)
            return None
        except Exception:
            # Not an outage (a bug): retrying cannot help; the caller logs it, the hold expires. (A
            # cancellation leaves it pending in the spool: the next start replays it.)
            self._finished(hold_id)
            raise
        self._finished(hold_id)
        return balance

    def _finished(self, hold_id: str) -> None:
        self.pending.discard(hold_id)
        self._spool.done(hold_id)

    def _retry_later(self, record: dict[str, Any]) -> None:
        hold_id = str(record["id"])
        if hold_id not in self._tasks:
            self._tasks[hold_id] = asyncio.create_task(self._retry(record), name=f"settle-{hold_id}")

    async def _retry(self, record: dict[str, Any]) -> None:
        hold_id = str(record["id"])
        deadline = time.monotonic() + self._retry_s
        delay = _FIRST_DELAY_S
        try:
            while True:
                await asyncio.sleep(delay)
                try:
                    await self._commit(record)
                except ServiceUnavailable:
                    if time.monotonic() >= deadline:
                        log.error("settlement of %s still failing; kept in the spool for a restart", hold_id)
                        return
                    delay = min(delay * 2, _MAX_DELAY_S)
                    continue
                except Exception:
                    log.exception("settlement of %s failed; kept in the spool for a restart", hold_id)
                    return
                log.info("spooled settlement of %s committed", hold_id)
                return
        finally:
            self._tasks.pop(hold_id, None)

    async def _commit(self, record: dict[str, Any]) -> None:
        await self._run(record)
        self._finished(str(record["id"]))
        metrics.observe_deferred_settlement("committed")

    async def _run(self, record: dict[str, Any]) -> int:
        hold = Hold(
            id=str(record["id"]),
            account_id=int(record["account_id"]),
            key_id=record["key_id"],
            amount=int(record["amount"]),
            expires_at=datetime.fromisoformat(record["expires_at"]),
        )
        usage = UsageRecord(**record["usage"]) if record["usage"] is not None else None
        if record["op"] == "settle":
            assert usage is not None  # a settle record always carries its usage
            return await self._ledger.settle(hold, cost=int(record["cost"]), usage=usage)
        return await self._ledger.release(hold, usage=usage)


def _fields(hold: Hold, usage: UsageRecord | None) -> dict[str, Any]:
    return {
        "id": hold.id,
        "account_id": hold.account_id,
        "key_id": hold.key_id,
        "amount": hold.amount,
        "expires_at": hold.expires_at.isoformat(),
        "usage": {name: getattr(usage, name) for name in _USAGE_FIELDS} if usage is not None else None,
    }
