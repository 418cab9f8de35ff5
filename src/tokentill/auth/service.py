"""API keys in the database: authenticate a request's key, and manage keys for the CLI / admin routes.

Only the key id and sha256(secret) are stored; the full key is returned once by `create_key`. Every
failure to authenticate looks the same to the client (401 `invalid_api_key`, key masked), and the hash
comparison is constant-time and happens even for unknown ids, so timing tells nothing either.

`authenticate(raw_key, cached=True)` (the chat routes) may answer from this process's key cache, whose
entries are at most `cache_s` (≤ 1 s) old, so the hot path reads no table to authenticate. What makes that
exact rather than merely fresh: the credit hold is taken only while the key is still live with the limits
the request was admitted under (`Ledger.reserve(key=...)`, one statement against the shared database, so
a revocation on any replica stops the next hold everywhere), and a chat route that refuses a request with
a cached key reads the key afresh first (api/routes.py), so a refusal never rests on a stale key either.
"""

from __future__ import annotations

import asyncio
import enum
import hmac
import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Row, Select, bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from tokentill.auth.keys import generate_key, hash_secret, mask_key, parse_key
from tokentill.errors import AuthenticationFailed, PermissionDenied
from tokentill.names import check_label, check_lookup, check_models
from tokentill.storage.db import Database
from tokentill.storage.schema import accounts, api_keys, utcnow

__all__ = ["UNSET", "CreatedKey", "KeyInfo", "KeyStore", "Principal"]

logger = logging.getLogger(__name__)

_MISSING_KEY = (
    "You didn't provide an API key. You need to provide your API key in an Authorization header using "
    "Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or as the x-api-key header."
)
_DUMMY_HASH = hash_secret("tokentill-no-such-key")


class _Unset(enum.Enum):
    UNSET = enum.auto()


UNSET = _Unset.UNSET
"""Default of `KeyStore.update_limits` arguments: leave this limit as it is (None removes it)."""


@dataclass(frozen=True)
class Principal:
    """Who is calling: the account and key behind a valid API key, with the key's restrictions.

    `models` None means every catalogue model is allowed; limits None mean unlimited.
    """

    account_id: int
    account_name: str
    key_id: str
    models: frozenset[str] | None
    rpm: int | None
    tpm: int | None
    max_concurrent: int | None
    balance: int  # the account's balance (µcr) when the key was checked, read in the same query

    def check_model(self, model_id: str) -> None:
        """Raise `PermissionDenied` (403 `model_not_permitted`) unless this key may use `model_id`."""
        if self.models is None or model_id in self.models:
            return
        allowed = ", ".join(sorted(self.models)) or "none"
        raise PermissionDenied(
            f"This API key is not permitted to use the model '{model_id}'. Models allowed for this key: "
            f"{allowed}.",
            code="model_not_permitted",
            param="model",
        )


@dataclass(frozen=True)
class CreatedKey:
    """A new key; `key` is the full secret text, shown to the operator once and never stored."""

    key_id: str
    key: str
    account_name: str
    name: str | None
    models: list[str] | None


@dataclass(frozen=True)
class KeyInfo:
    """A stored key as listings show it (never the secret or its hash)."""

    key_id: str
    account_name: str
    name: str | None
    models: list[str] | None
    rpm: int | None
    tpm: int | None
    max_concurrent: int | None
    created_at: datetime
    revoked_at: datetime | None


MAX_CACHED_KEYS = 10_000


async def insert_key(
    conn: AsyncConnection,
    account_id: int,
    *,
    name: str | None,
    models: list[str] | None = None,
    rpm: int | None = None,
    tpm: int | None = None,
    max_concurrent: int | None = None,
) -> tuple[str, str]:
    """Insert a fresh key for `account_id` inside the caller's transaction; (key_id, full key text).

    The arguments are already checked. An id collision raises `IntegrityError` and spoils the transaction.
    """
    key_id, secret, full_key = generate_key()
    await conn.execute(
        insert(api_keys).values(
            id=key_id,
            account_id=account_id,
            secret_sha256=hash_secret(secret),
            name=name,
            models=json.dumps(models) if models is not None else None,
            rpm=rpm,
            tpm=tpm,
            max_concurrent=max_concurrent,
            created_at=utcnow(),
        )
    )
    return key_id, full_key


class KeyStore:
    """Keys of one `Database`, with a small cache of recently seen live keys (see the module docstring)."""

    def __init__(self, db: Database, *, cache_s: float = 0.0) -> None:
        """`cache_s`: how long a key read from the database may answer `authenticate(cached=True)`
        (0: never)."""
        self._db = db
        self._cache_s = cache_s
        # key id -> (when read, monotonic; sha256 of its secret; its principal); oldest first
        self._cache: dict[str, tuple[float, str, Principal]] = {}
        self._reading: dict[str, asyncio.Future[Row[Any] | None]] = {}  # key id -> its read in flight
        self.reads = 0  # the key table reads `authenticate` made

    async def authenticate(self, raw_key: str | None, *, cached: bool = False) -> Principal:
        """The `Principal` for `raw_key`, the text after `Bearer ` or of `x-api-key`; with `cached`, one
        read at most `cache_s` ago will do (its `balance` is as old).

        Raises `AuthenticationFailed`: code `missing_api_key` for None/empty, `invalid_api_key` for a
        malformed, unknown, revoked or wrong key (the message shows only the masked key).
        """
        if raw_key is None or not raw_key.strip():
            raise AuthenticationFailed(_MISSING_KEY, code="missing_api_key")
        raw_key = raw_key.strip()
        parsed = parse_key(raw_key)
        if cached and parsed is not None:
            entry = self._cache.get(parsed[0])
            if entry is not None and time.monotonic() - entry[0] < self._cache_s:
                if hmac.compare_digest(entry[1], hash_secret(parsed[1])):
                    return entry[2]
        row = None
        if parsed is not None:
            row = await (self._read_shared(parsed[0]) if cached else self._read(parsed[0]))
        stored = row.secret_sha256 if row is not None else _DUMMY_HASH
        given = hash_secret(parsed[1] if parsed is not None else raw_key)
        if row is None or not hmac.compare_digest(stored, given) or row.revoked_at is not None:
            if parsed is not None:
                self._cache.pop(parsed[0], None)
            raise AuthenticationFailed(
                f"Incorrect API key provided: {mask_key(raw_key)}. Check the key you are using, or ask "
                "the operator of this server for a new one.",
                code="invalid_api_key",
            )
        principal = _principal(row)
        if self._cache_s > 0:
            self._remember(principal, stored)
        return principal

    async def _read(self, key_id: str) -> Row[Any] | None:
        self.reads += 1
        async with self._db.read() as conn:
            row: Row[Any] | None = (await conn.execute(_PRINCIPAL_BY_ID, {"b_key": key_id})).first()
        return row

    async def _read_shared(self, key_id: str) -> Row[Any] | None:
        """The key's row, read once for every cached authentication of it that misses meanwhile: when a
        busy key's entry expires, the requests arriving during the read would each read it again. A
        caller that is cancelled leaves the read to the others."""
        reading = self._reading.get(key_id)
        if reading is None or reading.get_loop() is not asyncio.get_running_loop():  # (a closed loop's)
            reading = self._reading[key_id] = asyncio.ensure_future(self._read(key_id))
            reading.add_done_callback(lambda done: self._read_done(key_id, done))
        return await asyncio.shield(reading)

    def _read_done(self, key_id: str, done: asyncio.Future[Row[Any] | None]) -> None:
        if self._reading.get(key_id) is done:
            del self._reading[key_id]
        if not done.cancelled():
            done.exception()  # retrieved here too: its waiters may all have been cancelled

    def _remember(self, principal: Principal, secret_sha256: str) -> None:
        self._cache.pop(principal.key_id, None)  # re-inserted last: the dict stays oldest first
        if len(self._cache) >= MAX_CACHED_KEYS:
            del self._cache[next(iter(self._cache))]
        self._cache[principal.key_id] = (time.monotonic(), secret_sha256, principal)

    async def principal_for(self, key_id: str) -> Principal | None:
        """The `Principal` of the live key `key_id`, or None if it does not exist or is revoked.

        For sessions that proved the key's secret when they began (the console) and check the key again
        on every request, so that revoking the key ends them.
        """
        live = _principal_query().where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
        async with self._db.read() as conn:
            row = (await conn.execute(live)).first()
        return _principal(row) if row is not None else None

    async def create_key(
        self,
        account_name: str,
        *,
        models: list[str] | None = None,
        name: str | None = None,
        rpm: int | None = None,
        tpm: int | None = None,
        max_concurrent: int | None = None,
    ) -> CreatedKey:
        """Create a key for `account_name`; `models` None allows every model.

        Raises `LookupError` for an unknown account, `InvalidRequest` for an empty `models` list or a
        label, model id or account name that `tokentill.names` refuses, `ValueError` for a limit below 1.
        """
        check_lookup(account_name, param="account")
        name = check_label(name)
        models = check_models(models)
        _check_limits(rpm=rpm, tpm=tpm, max_concurrent=max_concurrent)
        for _attempt in range(5):
            try:
                async with self._db.begin() as conn:
                    account_id = (
                        await conn.execute(select(accounts.c.id).where(accounts.c.name == account_name))
                    ).scalar_one_or_none()
                    if account_id is None:
                        raise LookupError(f"no account named {account_name!r}")
                    key_id, full_key = await insert_key(
                        conn,
                        account_id,
                        name=name,
                        models=models,
                        rpm=rpm,
                        tpm=tpm,
                        max_concurrent=max_concurrent,
                    )
            except IntegrityError:  # an id collision (36^8 ids): draw again
                logger.warning("key id collision, drawing another")
                continue
            logger.info("created key %s for account %s", key_id, account_name)
            return CreatedKey(
                key_id=key_id, key=full_key, account_name=account_name, name=name, models=models
            )
        raise RuntimeError("could not draw an unused key id")

    async def list_keys(self, account_name: str | None = None) -> list[KeyInfo]:
        """Keys, oldest first, optionally of one account; revoked keys included."""
        query = (
            select(api_keys, accounts.c.name.label("account_name"))
            .join(accounts, accounts.c.id == api_keys.c.account_id)
            .order_by(api_keys.c.created_at, api_keys.c.id)
        )
        if account_name is not None:
            query = query.where(accounts.c.name == account_name)
        async with self._db.read() as conn:
            rows = (await conn.execute(query)).all()
        return [_key_info(r) for r in rows]

    async def get_key(self, key_id: str) -> KeyInfo | None:
        """One key by id (revoked or not), or None."""
        query = (
            select(api_keys, accounts.c.name.label("account_name"))
            .join(accounts, accounts.c.id == api_keys.c.account_id)
            .where(api_keys.c.id == key_id)
        )
        async with self._db.read() as conn:
            row = (await conn.execute(query)).first()
        return _key_info(row) if row is not None else None

    async def revoke(self, key_id: str, *, account_name: str | None = None) -> bool:
        """Revoke the key; False if there is no such key, it was already revoked, or (with
        `account_name`, as a customer revoking its own keys) it belongs to another account.
        `InvalidRequest` for an id that cannot exist (`names.check_lookup`)."""
        check_lookup(key_id, param="key_id")
        statement = update(api_keys).where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
        if account_name is not None:
            owner = select(accounts.c.id).where(accounts.c.name == account_name).scalar_subquery()
            statement = statement.where(api_keys.c.account_id == owner)
        async with self._db.begin() as conn:
            result = await conn.execute(statement.values(revoked_at=utcnow()).returning(api_keys.c.id))
            done = result.first() is not None
        self._cache.pop(key_id, None)
        if done:
            logger.info("revoked key %s", key_id)
        return done

    async def update_limits(
        self,
        key_id: str,
        *,
        rpm: int | None | _Unset = UNSET,
        tpm: int | None | _Unset = UNSET,
        max_concurrent: int | None | _Unset = UNSET,
    ) -> bool:
        """Change a live key's limits: an omitted argument stays, None removes the limit.

        False if there is no such live (unrevoked) key; `ValueError` for a limit below 1.
        """
        changes: dict[str, int | None] = {
            column: value
            for column, value in (("rpm", rpm), ("tpm", tpm), ("max_concurrent", max_concurrent))
            if not isinstance(value, _Unset)
        }
        _check_limits(**changes)
        check_lookup(key_id, param="key_id")
        self._cache.pop(key_id, None)
        async with self._db.begin() as conn:
            live = api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None)
            if changes:
                statement: Any = update(api_keys).where(*live).values(**changes).returning(api_keys.c.id)
            else:
                statement = select(api_keys.c.id).where(*live)
            return (await conn.execute(statement)).first() is not None


def _principal_query() -> Select[Any]:
    """Keys joined with their account's name and balance: what a `Principal` is made of."""
    return select(
        api_keys, accounts.c.name.label("account_name"), accounts.c.balance.label("account_balance")
    ).join(accounts, accounts.c.id == api_keys.c.account_id)


# Built once: the statement every request runs (see billing/statements.py on why).
_PRINCIPAL_BY_ID = _principal_query().where(api_keys.c.id == bindparam("b_key"))


def _principal(row: Any) -> Principal:
    models = _load_models(row.models)
    return Principal(
        account_id=row.account_id,
        account_name=row.account_name,
        key_id=row.id,
        models=frozenset(models) if models is not None else None,
        rpm=row.rpm,
        tpm=row.tpm,
        max_concurrent=row.max_concurrent,
        balance=int(row.account_balance),
    )


def _key_info(r: Any) -> KeyInfo:
    return KeyInfo(
        key_id=r.id,
        account_name=r.account_name,
        name=r.name,
        models=_load_models(r.models),
        rpm=r.rpm,
        tpm=r.tpm,
        max_concurrent=r.max_concurrent,
        created_at=r.created_at,
        revoked_at=r.revoked_at,
    )


def _check_limits(**limits: int | None) -> None:
    for name, value in limits.items():
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1, or None for no limit")


def _load_models(text: str | None) -> list[str] | None:
    if text is None:
        return None
    value = json.loads(text)
    if not isinstance(value, list) or not all(isinstance(m, str) for m in value):
        raise ValueError(f"api_keys.models is not a JSON list of strings: {text!r}")
    return value
