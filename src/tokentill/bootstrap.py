"""The first start on an empty database: account `default` with the starting credits, and one key.

Replicas may start together on one empty database, so the whole step is one write transaction that runs
alone (`Database.serialize`): the first replica creates the account, its credit row and its key, and every
other replica, finding them, does nothing. An account `default` that an operator created before the first
start (`tokentill accounts create default`) and that is still the only account, with no key, gets its
key the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select

from tokentill.auth.service import insert_key
from tokentill.billing.statements import insert_account
from tokentill.storage.db import Database
from tokentill.storage.schema import accounts, api_keys, utcnow

ACCOUNT = "default"
_LOCK_KEY = 0x746F6B656E626F6F  # "tokenboo": any fixed 64-bit number only this step takes


@dataclass(frozen=True, slots=True)
class Bootstrapped:
    """What the first start created: the key's full text (shown once) and the account's balance, µcr."""

    key: str
    balance: int


async def bootstrap(db: Database, credits: int) -> Bootstrapped | None:
    """Give an empty database its `default` account holding `credits` µcr and a key; None if not empty."""
    async with db.begin() as conn:
        await db.serialize(conn, _LOCK_KEY)
        rows = (await conn.execute(select(accounts.c.id, accounts.c.name, accounts.c.balance).limit(2))).all()
        if not rows:
            account_id = await insert_account(conn, ACCOUNT, credits, now=utcnow())
        elif [r.name for r in rows] == [ACCOUNT]:
            account_id, credits = rows[0].id, rows[0].balance
            keys = select(func.count()).select_from(api_keys).where(api_keys.c.account_id == account_id)
            if (await conn.execute(keys)).scalar_one():
                return None
        else:
            return None
        _key_id, key = await insert_key(conn, account_id, name="bootstrap")
    return Bootstrapped(key=key, balance=credits)
