"""`create_app(settings)`: the ASGI application. Nothing is opened at import time.

The lifespan builds every service onto `app.state.services` — database, ledger, keys, catalogue, engines,
limiter, media — starts the expired-hold sweeper, and closes all of them on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, cast

from fastapi import FastAPI

from tokentill.api import build_api
from tokentill.api.connections import GuardedHttpProtocol
from tokentill.auth.service import KeyStore
from tokentill.billing.codes import RedemptionCodes
from tokentill.billing.group_commit import GroupCommit, HoldBook
from tokentill.billing.ledger import Ledger
from tokentill.billing.reports import UsageReports
from tokentill.billing.settlement import Settlements
from tokentill.catalog import Catalog, load_catalog
from tokentill.chat import ChatService
from tokentill.engines import create_engine
from tokentill.engines.base import Engine
from tokentill.engines.reasoning import with_reasoning
from tokentill.errors import ServiceUnavailable
from tokentill.idempotency import IdempotencyStore
from tokentill.lifecycle import Lifecycle
from tokentill.limits import create_limiter
from tokentill.media.service import MediaPolicy, MediaService
from tokentill.redact import Redactor, redacted_logs, settings_secrets
from tokentill.services import Services
from tokentill.settings import Settings
from tokentill.storage.db import open_database
from tokentill.storage.spool import Spool
from tokentill.stored_responses import ResponseStore

__all__ = ["create_app", "create_app_from_env", "http_protocol", "log_config"]

log = logging.getLogger(__name__)


# No request outlives its deadline plus this: an idempotency claim's heartbeat stops there.
_IDEMPOTENCY_GRACE_S = 30.0


async def _sweep_holds(
    ledger: Ledger, settlements: Settlements, idempotency: IdempotencyStore, interval_s: float
) -> None:
    """Release holds whose request died with its process (crash, SIGKILL), now and then periodically,
    except those whose settlement this process still owes; drop idempotency rows past their expiry on
    the same beat (any replica may do either, safely)."""
    while True:
        try:
            released = await ledger.release_expired(skip=settlements.pending)
            if released:
                log.warning("released %d expired credit hold(s)", released)
            await idempotency.purge_expired()
        except ServiceUnavailable:
            pass  # the database is out (storage logged it once); the next beat tries again
        except Exception:
            log.exception("expired-hold sweep failed; will retry")
        await asyncio.sleep(interval_s)


def _upstream_secrets(catalog: Catalog) -> list[str]:
    """The API keys and header values of the catalogue's upstream entries (imported only when used)."""
    found: list[str] = []
    for spec in catalog:
        if spec.engine == "upstream":
            from tokentill.engines.upstream_config import secrets

            found.extend(secrets(spec))
    return found


@contextlib.asynccontextmanager
async def _services(settings: Settings) -> AsyncIterator[Services]:
    catalog = load_catalog(settings.config)
    async with contextlib.AsyncExitStack() as stack:
        db = await open_database(
            settings.resolved_database_url,
            connect_timeout_s=settings.database_connect_timeout_s,
            pool_timeout_s=settings.database_pool_timeout_s,
            statement_timeout_s=settings.database_statement_timeout_s,
        )
        stack.push_async_callback(db.aclose)
        ledger = Ledger(db)
        redact = Redactor([*settings_secrets(settings), *_upstream_secrets(catalog)])
        stack.enter_context(redacted_logs(redact))
        settings.apply_native_environment()  # before any engine imports llama_cpp
        engines: dict[str, Engine] = {}
        for spec in catalog:
            engine = with_reasoning(
                create_engine(
                    spec,
                    queue_size=settings.queue_size,
                    n_threads=settings.n_threads,
                    max_parallel=settings.max_parallel,
                    adapt_threads=settings.llama_adapt_threads,
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
        spool = Spool(settings.data_dir / "spool")
        spool.open()
        stack.callback(spool.close)
        holds: HoldBook = ledger
        if settings.group_commit:
            group = GroupCommit(ledger, db)
            stack.push_async_callback(group.aclose)  # after the settlements (LIFO): applies what is queued
            holds = group
        settlements = Settlements(holds, spool, retry_s=settings.settlement_retry_s)
        stack.push_async_callback(settlements.aclose)
        # Before the sweeper first runs: a hold whose answer was delivered before a crash is billed, not
        # handed back.
        await settlements.replay()
        chat = ChatService(
            catalog=catalog,
            engines=engines,
            ledger=ledger,
            limiter=limiter,
            media=media,
            request_timeout_s=settings.request_timeout_s,
            hold_ttl_s=settings.hold_ttl_s,
            settlements=settlements,
            holds=holds,
        )
        idempotency = IdempotencyStore(
            db,
            ttl_s=settings.idempotency_ttl_s,
            abandon_after_s=settings.idempotency_lease_s,
            max_claim_s=settings.request_timeout_s + _IDEMPOTENCY_GRACE_S,
        )
        stack.push_async_callback(idempotency.aclose)
        sweeper = asyncio.create_task(
            _sweep_holds(ledger, settlements, idempotency, settings.hold_sweep_interval_s)
        )
        try:
            yield Services(
                settings=settings,
                db=db,
                ledger=ledger,
                settlements=settlements,
                keys=KeyStore(db, cache_s=settings.key_cache_s),
                catalog=catalog,
                engines=engines,
                limiter=limiter,
                media=media,
                chat=chat,
                idempotency=idempotency,
                reports=UsageReports(db),
                codes=RedemptionCodes(db, limiter, settings.redeem_attempts_per_minute),
                lifecycle=Lifecycle(chat, idempotency),
                responses=ResponseStore(db),
                started=int(time.time()),
                ready=True,
                redact=redact,
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


def http_protocol(settings: Settings) -> type[asyncio.Protocol]:
    """uvicorn's `http` option: its httptools protocol with our read timeouts and connection cap.

    uvicorn builds each connection's protocol by calling this with its config; a partial carries the
    limits, and it pickles, so worker processes get them too. (Typed as the class uvicorn's signature
    names; any callable that returns a protocol is what it really needs.)
    """
    protocol = functools.partial(
        GuardedHttpProtocol, read_timeout_s=settings.read_timeout_s, max_connections=settings.max_connections
    )
    return cast("type[asyncio.Protocol]", protocol)


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
