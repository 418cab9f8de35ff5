"""`create_app(settings)`: the ASGI application. Nothing is opened at import time.

The lifespan builds every service onto `app.state.services` — database, ledger, keys, catalogue, engines,
limiter, media — starts the expired-hold sweeper, and closes all of them on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI

from tokentill.api import build_api
from tokentill.auth.service import KeyStore
from tokentill.billing.codes import RedemptionCodes
from tokentill.billing.ledger import Ledger
from tokentill.billing.reports import UsageReports
from tokentill.catalog import load_catalog
from tokentill.chat import ChatService
from tokentill.engines import create_engine
from tokentill.engines.base import Engine
from tokentill.engines.reasoning import with_reasoning
from tokentill.idempotency import IdempotencyStore
from tokentill.lifecycle import Lifecycle
from tokentill.limits import create_limiter
from tokentill.media.service import MediaPolicy, MediaService
from tokentill.services import Services
from tokentill.settings import Settings
from tokentill.storage.db import open_database

__all__ = ["create_app", "create_app_from_env", "log_config"]

log = logging.getLogger(__name__)


# An in-progress idempotency claim older than the request deadline plus this is presumed dead.
_IDEMPOTENCY_GRACE_S = 30.0


async def _sweep_holds(ledger: Ledger, idempotency: IdempotencyStore, interval_s: float) -> None:
    """Release holds whose request died with its process (crash, SIGKILL), now and then periodically;
    drop idempotency rows past their expiry on the same beat (any replica may do either, safely)."""
    while True:
        try:
            released = await ledger.release_expired()
            if released:
                log.warning("released %d expired credit hold(s)", released)
            await idempotency.purge_expired()
        except Exception:
            log.exception("expired-hold sweep failed; will retry")
        await asyncio.sleep(interval_s)


@contextlib.asynccontextmanager
async def _services(settings: Settings) -> AsyncIterator[Services]:
    catalog = load_catalog(settings.config)
    async with contextlib.AsyncExitStack() as stack:
        db = await open_database(settings.resolved_database_url)
        stack.push_async_callback(db.aclose)
        ledger = Ledger(db)
        engines: dict[str, Engine] = {}
        for spec in catalog:
            engine = with_reasoning(
                create_engine(
                    spec,
                    queue_size=settings.queue_size,
                    n_threads=settings.n_threads,
                    max_parallel=settings.max_parallel,
                ),
                spec.reasoning,
            )
            await engine.start()
            stack.push_async_callback(engine.aclose)
            engines[spec.id] = engine
        limiter = create_limiter(settings.redis_url, lease_ttl_s=settings.rate_limit_lease_ttl_s)
        stack.push_async_callback(limiter.aclose)
        media = MediaService(MediaPolicy.from_settings(settings))
        await media.start()
        stack.push_async_callback(media.aclose)
        chat = ChatService(
            catalog=catalog,
            engines=engines,
            ledger=ledger,
            limiter=limiter,
            media=media,
            request_timeout_s=settings.request_timeout_s,
            hold_ttl_s=settings.hold_ttl_s,
        )
        idempotency = IdempotencyStore(
            db,
            ttl_s=settings.idempotency_ttl_s,
            abandon_after_s=settings.request_timeout_s + _IDEMPOTENCY_GRACE_S,
        )
        sweeper = asyncio.create_task(_sweep_holds(ledger, idempotency, settings.hold_sweep_interval_s))
        try:
            yield Services(
                settings=settings,
                db=db,
                ledger=ledger,
                keys=KeyStore(db),
                catalog=catalog,
                engines=engines,
                limiter=limiter,
                media=media,
                chat=chat,
                idempotency=idempotency,
                reports=UsageReports(db),
                codes=RedemptionCodes(db, limiter, settings.redeem_attempts_per_minute),
                lifecycle=Lifecycle(chat, idempotency),
                started=int(time.time()),
                ready=True,
            )
        finally:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper


def log_config(level: str) -> dict[str, Any]:
    """`logging.config.dictConfig` for the server: one stderr handler whose lines carry the request id
    (`[req_…]`, `[-]` outside a request), for tokentill's loggers and uvicorn's alike."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": "tokentill.api.middleware.RequestIdFilter"}},
        "formatters": {
            "default": {"format": "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"}
        },
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": "default",
                "filters": ["request_id"],
            }
        },
        "root": {"level": level.upper(), "handlers": ["stderr"]},
        "loggers": {
            name: {"level": level.upper(), "handlers": [], "propagate": True}
            for name in ("uvicorn", "uvicorn.error", "uvicorn.access")
        },
    }


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with _services(settings) as services:
            app.state.services = services
            log.info("tokentill ready: models %s", ", ".join(services.engines))
            yield
            services.ready = False

    return build_api(settings, lifespan)


def create_app_from_env() -> FastAPI:
    """Factory for `uvicorn --factory` and worker processes: settings come from TOKENTILL_* variables."""
    return create_app(Settings())
