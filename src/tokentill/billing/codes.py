"""Redemption codes: prepaid credits an operator sells without a payment provider (one-api's model).

A code is `ttc-<8 char id>-<32 char secret>`: the id (lowercase letters and digits) names it in listings
and in the ledger; the secret is 20 random bytes in lowercase base32 (160 bits), stored only as its
sha256 and shown once, by `create_codes`. Codes are case-insensitive and surrounding blanks are ignored.

`redeem` is one transaction: lock the code's row (`FOR UPDATE` on PostgreSQL, `BEGIN IMMEDIATE` on
SQLite), check it, mark it redeemed with a conditional `UPDATE ... WHERE redeemed_at IS NULL`, add the
credits to the account and append one 'credit' ledger row whose ref is `code:<id>` (never the code). Two
replicas redeeming one code at once: one commits, the other then finds it redeemed (409). Each key may
try `attempts_per_minute` redeems per minute (all attempts count), through the shared rate limiter, so
guessing is throttled across replicas too, on top of the 160-bit secret.
"""

from __future__ import annotations

import base64
import hmac
import logging
import secrets
import string
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError

from tokentill.auth.keys import hash_secret
from tokentill.billing.money import format_credits
from tokentill.billing.statements import add_to_balance, append_ledger
from tokentill.errors import CodeAlreadyRedeemed, CodeNotFound, RateLimited
from tokentill.limits import KeyLimits, RateLimiter
from tokentill.storage.db import Database
from tokentill.storage.schema import accounts, redemption_codes

__all__ = [
    "CODE_PREFIX",
    "MAX_CODES_PER_BATCH",
    "CodeInfo",
    "CreatedCode",
    "Redemption",
    "RedemptionCodes",
    "generate_code",
    "parse_code",
]

logger = logging.getLogger(__name__)

CODE_PREFIX = "ttc"
MAX_CODES_PER_BATCH = 1000
_ID_LENGTH = 8
_SECRET_LENGTH = 32  # base32 of 20 bytes, no padding
_ID_ALPHABET = frozenset(string.ascii_lowercase + string.digits)
_SECRET_ALPHABET = frozenset("abcdefghijklmnopqrstuvwxyz234567")
_DUMMY_HASH = hash_secret("tokentill-no-such-code")


def generate_code() -> tuple[str, str, str]:
    """A fresh code as (code_id, secret, full_code); store only `hash_secret(secret)`."""
    code_id = "".join(secrets.choice(sorted(_ID_ALPHABET)) for _ in range(_ID_LENGTH))
    secret = base64.b32encode(secrets.token_bytes(20)).decode("ascii").lower()
    return code_id, secret, f"{CODE_PREFIX}-{code_id}-{secret}"


def parse_code(raw: str) -> tuple[str, str] | None:
    """(code_id, secret) from a code's text (any case, blanks around ignored), or None if malformed."""
    parts = raw.strip().lower().split("-")
    if len(parts) != 3 or parts[0] != CODE_PREFIX:
        return None
    _, code_id, secret = parts
    if len(code_id) != _ID_LENGTH or not _ID_ALPHABET.issuperset(code_id):
        return None
    if len(secret) != _SECRET_LENGTH or not _SECRET_ALPHABET.issuperset(secret):
        return None
    return code_id, secret


@dataclass(frozen=True)
class CreatedCode:
    """A new code; `code` is the full text, shown once and never stored."""

    id: str
    code: str
    credits: int  # µcr
    expires_at: datetime | None

    def to_dict(self) -> dict[str, Any]:
        """As the admin API and `tokentill codes create --json` show it (the only time `code` is shown)."""
        return {
            "id": self.id,
            "code": self.code,
            "credits": format_credits(self.credits),
            "expires_at": _iso(self.expires_at),
        }


@dataclass(frozen=True)
class CodeInfo:
    """A stored code as listings show it (never the secret or its hash); `status` is `active`,
    `redeemed` or `expired` by the database's clock when listed."""

    id: str
    credits: int
    created_at: datetime
    expires_at: datetime | None
    redeemed_at: datetime | None
    redeemed_by: str | None  # account name
    redeemed_key_id: str | None
    status: str

    def to_dict(self) -> dict[str, Any]:
        """As the admin API and `tokentill codes list --json` show it: credits as a decimal string,
        times as ISO 8601."""
        return {
            "id": self.id,
            "credits": format_credits(self.credits),
            "status": self.status,
            "created_at": self.created_at.isoformat(),
            "expires_at": _iso(self.expires_at),
            "redeemed_at": _iso(self.redeemed_at),
            "redeemed_by": self.redeemed_by,
            "redeemed_key_id": self.redeemed_key_id,
        }


@dataclass(frozen=True)
class Redemption:
    code_id: str
    credits: int
    balance: int  # the account's balance right after


class RedemptionCodes:
    """Create, list and redeem codes on one `Database`; `limiter` throttles redeem attempts per key."""

    def __init__(
        self, db: Database, limiter: RateLimiter | None = None, attempts_per_minute: int = 10
    ) -> None:
        self._db = db
        self._limiter = limiter
        self._attempts = KeyLimits(rpm=attempts_per_minute)

    async def create_codes(
        self, credits: int, count: int = 1, expires_days: int | None = None
    ) -> list[CreatedCode]:
        """`count` new codes worth `credits` µcr each, valid for `expires_days` days (None: forever).

        `ValueError` for credits below 1 µcr, a count outside 1..MAX_CODES_PER_BATCH or expires_days < 1.
        """
        if credits < 1:
            raise ValueError("a code must be worth at least 1 µcr")
        if not 1 <= count <= MAX_CODES_PER_BATCH:
            raise ValueError(f"count must be 1 to {MAX_CODES_PER_BATCH}")
        if expires_days is not None and expires_days < 1:
            raise ValueError("expires_days must be at least 1, or None for codes that never expire")
        for _attempt in range(5):
            drawn = [generate_code() for _ in range(count)]
            try:
                async with self._db.begin() as conn:
                    now = await self._db.now(conn)
                    expires_at = now + timedelta(days=expires_days) if expires_days is not None else None
                    await conn.execute(
                        insert(redemption_codes),
                        [
                            {
                                "id": code_id,
                                "code_sha256": hash_secret(secret),
                                "credits": credits,
                                "created_at": now,
                                "expires_at": expires_at,
                            }
                            for code_id, secret, _ in drawn
                        ],
                    )
            except IntegrityError:  # an id collision (36^8 ids): draw the batch again
                logger.warning("redemption code id collision, drawing again")
                continue
            logger.info("created %d redemption code(s) of %s credits", count, format_credits(credits))
            return [
                CreatedCode(id=i, code=full, credits=credits, expires_at=expires_at) for i, _, full in drawn
            ]
        raise RuntimeError("could not draw unused code ids")

    async def list_codes(self, limit: int = 1000) -> list[CodeInfo]:
        """The newest `limit` codes, newest first, redeemed and expired ones included."""
        statement = (
            select(redemption_codes, accounts.c.name.label("account_name"))
            .outerjoin(accounts, accounts.c.id == redemption_codes.c.redeemed_by)
            .order_by(redemption_codes.c.created_at.desc(), redemption_codes.c.id)
            .limit(limit)
        )
        async with self._db.read() as conn:
            now = await self._db.now(conn)
            rows = (await conn.execute(statement)).all()
        return [
            CodeInfo(
                id=r.id,
                credits=int(r.credits),
                created_at=r.created_at,
                expires_at=r.expires_at,
                redeemed_at=r.redeemed_at,
                redeemed_by=r.account_name,
                redeemed_key_id=r.redeemed_key_id,
                status=_status(r.redeemed_at, r.expires_at, now),
            )
            for r in rows
        ]

    async def redeem(self, account_id: int, key_id: str, code: str) -> Redemption:
        """Add the code's credits to account `account_id` (on behalf of key `key_id`), once.

        Raises `RateLimited` (429) past the key's attempts per minute, `CodeNotFound` (404) for a
        malformed, unknown, wrong or expired code, `CodeAlreadyRedeemed` (409) for a used one.
        """
        if self._limiter is not None:
            try:
                lease = await self._limiter.acquire(f"redeem:{key_id}", self._attempts, 0)
            except RateLimited as exc:
                wait = exc.headers.get("Retry-After", "60")
                raise RateLimited(
                    f"Too many redemption attempts with this key: {self._attempts.rpm} per minute are "
                    f"allowed. Try again in {wait}s.",
                    limit_type="requests",
                    retry_after_s=float(wait),
                ) from None
            await lease.release()  # only the attempt counts (rpm); nothing stays in flight
        parsed = parse_code(code)
        not_found = CodeNotFound("No such redemption code, or it has expired.", param="code")
        async with self._db.begin() as conn:
            now = await self._db.now(conn)
            row = None
            if parsed is not None:
                row = (
                    await conn.execute(
                        select(redemption_codes).where(redemption_codes.c.id == parsed[0]).with_for_update()
                    )
                ).first()
            stored = row.code_sha256 if row is not None else _DUMMY_HASH
            given = hash_secret(parsed[1] if parsed is not None else code)
            if row is None or not hmac.compare_digest(stored, given):
                raise not_found
            if row.redeemed_at is not None:
                raise CodeAlreadyRedeemed("This redemption code has already been redeemed.", param="code")
            if row.expires_at is not None and row.expires_at <= now:
                raise not_found
            taken = (
                await conn.execute(
                    update(redemption_codes)
                    .where(redemption_codes.c.id == row.id, redemption_codes.c.redeemed_at.is_(None))
                    .values(redeemed_at=now, redeemed_by=account_id, redeemed_key_id=key_id)
                    .returning(redemption_codes.c.credits)
                )
            ).first()
            if taken is None:  # pragma: no cover - the row lock above makes this unreachable
                raise CodeAlreadyRedeemed("This redemption code has already been redeemed.", param="code")
            credits = int(taken.credits)
            balance = await add_to_balance(conn, account_id, credits)
            await append_ledger(
                conn,
                account_id,
                "credit",
                credits,
                balance,
                ref=f"code:{row.id}",
                note=f"redeemed code {row.id} with key {key_id}",
                now=now,
            )
        logger.info("account %d redeemed code %s for %s credits", account_id, row.id, format_credits(credits))
        return Redemption(code_id=row.id, credits=credits, balance=balance)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _status(redeemed_at: datetime | None, expires_at: datetime | None, now: datetime) -> str:
    if redeemed_at is not None:
        return "redeemed"
    if expires_at is not None and expires_at <= now:
        return "expired"
    return "active"
