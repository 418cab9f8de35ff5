"""The running service objects, built by the app lifespan and shared by every request."""

from __future__ import annotations

from dataclasses import dataclass, field

from tokentill.auth.service import KeyStore
from tokentill.billing.codes import RedemptionCodes
from tokentill.billing.ledger import Ledger
from tokentill.billing.reports import UsageReports
from tokentill.billing.settlement import Settlements
from tokentill.catalog import Catalog
from tokentill.chat import ChatService
from tokentill.engines.base import Engine
from tokentill.idempotency import IdempotencyStore
from tokentill.lifecycle import Lifecycle
from tokentill.limits import RateLimiter
from tokentill.media.service import MediaService
from tokentill.redact import Redactor
from tokentill.settings import Settings
from tokentill.storage.db import Database
from tokentill.stored_responses import ResponseStore

__all__ = ["Services"]


@dataclass
class Services:
    settings: Settings
    db: Database
    ledger: Ledger
    settlements: Settlements
    keys: KeyStore
    catalog: Catalog
    engines: dict[str, Engine]
    limiter: RateLimiter
    media: MediaService
    chat: ChatService
    idempotency: IdempotencyStore
    reports: UsageReports
    codes: RedemptionCodes
    lifecycle: Lifecycle  # admits, runs, settles and releases billable requests
    responses: ResponseStore
    started: int  # unix time the service started; `created` of every model object
    ready: bool = False
    redact: Redactor = field(default_factory=Redactor)  # every configured secret; see tokentill.redact
