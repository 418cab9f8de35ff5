"""All of tokentill's configuration: one typed object read from `TOKENTILL_*` environment variables.

Nothing else reads the environment. The CLI turns its options into overrides of these fields, so every
`--flag` has a `TOKENTILL_FLAG` twin and the descriptions below are the help texts.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import platformdirs
from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from tokentill.billing.money import parse_credits

if TYPE_CHECKING:
    from tokentill.media.service import MediaPolicy

__all__ = ["Settings"]


def _default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("tokentill", appauthor=False))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TOKENTILL_", extra="ignore", frozen=True)

    data_dir: Path = Field(
        default_factory=_default_data_dir,
        description="Folder for the SQLite database and downloaded models (default: the user data folder).",
    )
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL; postgresql://user@host/db switches to PostgreSQL (asyncpg). "
        "Default: SQLite at DATA_DIR/tokentill.db.",
    )
    config: Path | None = Field(
        default=None, description="TOML catalogue of models; default: the built-in o1-preview entry."
    )
    redis_url: str | None = Field(
        default=None, description="Redis URL for shared rate limits across replicas (default: in-process)."
    )
    admin_key: SecretStr | None = Field(
        default=None, description="Key that unlocks /admin/ routes; unset = admin routes refuse everyone."
    )
    host: str = Field(default="127.0.0.1", description="Address to listen on.")
    port: int = Field(default=8000, ge=0, le=65535, description="Port to listen on.")
    workers: int = Field(default=1, ge=1, description="Server worker processes.")
    max_body_bytes: int = Field(
        default=32 * 1024 * 1024,
        ge=1024,
        description="Largest request body accepted (413 above); default fits a 20 MB image as base64.",
    )
    queue_size: int = Field(
        default=32, ge=1, description="Requests that may wait for an engine; more get 503 overloaded."
    )
    request_timeout_s: float = Field(
        default=600.0, gt=0, description="Deadline for one request, queueing included (504 after)."
    )
    hold_ttl_s: int = Field(
        default=1800,
        ge=10,
        description="A credit hold older than this is released by recovery; must be more than "
        "REQUEST_TIMEOUT_S so a live request never loses its hold.",
    )
    hold_sweep_interval_s: float = Field(
        default=60.0, gt=0, description="How often expired holds are looked for."
    )
    rate_limit_lease_ttl_s: float = Field(
        default=900.0,
        gt=0,
        description="How long a concurrency slot survives if its replica dies mid-request (Redis or "
        "in-process); must be at least REQUEST_TIMEOUT_S so a live request never loses its slot.",
    )
    idempotency_ttl_s: int = Field(
        default=86400,
        ge=60,
        description="How long a completed request's response is kept for replay under its Idempotency-Key.",
    )
    n_threads: int | None = Field(
        default=None, ge=1, description="CPU threads for the embedded engine (default: all cores)."
    )
    max_parallel: int = Field(
        default=8,
        ge=1,
        le=256,
        description="Requests the embedded engine decodes together (continuous batching; a catalogue "
        "entry's `parallel` overrides it). Each holds its own `context` of KV cache, so memory grows with "
        "it; 8 measured best on 2 cores (docs/performance.md).",
    )
    initial_credits: str = Field(
        default="10", description="Credits given to the `default` account created on an empty database."
    )
    redeem_attempts_per_minute: int = Field(
        default=10,
        ge=1,
        description="Redemption-code attempts one API key may make per minute (429 past it), across replicas "
        "when Redis is configured.",
    )
    log_level: str = Field(default="info", description="Logging level.")
    media_allow_hosts: str = Field(
        default="",
        description="Comma-separated host:port pairs whose images may be fetched even though they resolve "
        "to private addresses (e.g. images.internal:80). Nothing else private is ever fetched.",
    )
    media_max_bytes: int = Field(
        default=20 * 1024 * 1024, ge=1024, description="Largest image accepted, fetched or inline (bytes)."
    )
    media_max_pixels: int = Field(
        default=50_000_000, ge=1, description="Largest image accepted in pixels, checked before decoding."
    )
    media_max_images: int = Field(default=8, ge=1, description="Images allowed in one request.")
    media_timeout_s: float = Field(default=30.0, gt=0, description="Total time allowed to fetch one image.")
    database_connect_timeout_s: float = Field(
        default=5.0,
        gt=0,
        description="PostgreSQL: how long one connection attempt may take before the request gets 503 "
        "service_unavailable (a server that accepts TCP but never answers).",
    )
    database_pool_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="PostgreSQL: how long a request waits for a free pooled connection before 503.",
    )

    @field_validator("media_allow_hosts")
    @classmethod
    def _host_ports(cls, value: str) -> str:
        # The fetcher's own parser, so that what start-up accepts is exactly what the fetcher matches.
        from tokentill.media.fetch import parse_allow_hosts

        parse_allow_hosts(h for h in value.split(",") if h.strip())  # ValueError names the bad entry
        return value

    @field_validator("initial_credits")
    @classmethod
    def _credits(cls, value: str) -> str:
        parse_credits(value)  # ValueError names what is wrong with it
        return value

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        value = value.lower()
        if value not in {"critical", "error", "warning", "info", "debug"}:
            raise ValueError("must be one of critical, error, warning, info, debug")
        return value

    @field_validator("database_url")
    @classmethod
    def _async_driver(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        for plain, driver in (
            ("postgresql://", "postgresql+asyncpg://"),
            ("postgres://", "postgresql+asyncpg://"),
            ("sqlite:///", "sqlite+aiosqlite:///"),
        ):
            if value.startswith(plain):
                return driver + value[len(plain) :]
        if not value.startswith(("postgresql+asyncpg://", "sqlite+aiosqlite:///")):
            raise ValueError("must be a postgresql:// or sqlite:/// URL")
        return value

    @model_validator(mode="after")
    def _lease_outlives_request(self) -> Settings:
        # A slot that expires while its request still runs would let one more request in than
        # max_concurrent allows: refuse the configuration instead of breaking the limit silently.
        if self.rate_limit_lease_ttl_s < self.request_timeout_s:
            raise ValueError(
                f"TOKENTILL_RATE_LIMIT_LEASE_TTL_S ({self.rate_limit_lease_ttl_s}) must be at least "
                f"TOKENTILL_REQUEST_TIMEOUT_S ({self.request_timeout_s})"
            )
        # A hold released while its request still runs gives the money back before the request settles:
        # the late settle can then charge no more than what is left, and the worst-case reserve is lost.
        if self.hold_ttl_s <= self.request_timeout_s:
            raise ValueError(
                f"TOKENTILL_HOLD_TTL_S ({self.hold_ttl_s}) must be more than TOKENTILL_REQUEST_TIMEOUT_S "
                f"({self.request_timeout_s})"
            )
        return self

    def media_policy(self) -> MediaPolicy:
        from tokentill.media.service import MediaPolicy

        hosts = frozenset(h.strip().lower() for h in self.media_allow_hosts.split(",") if h.strip())
        return MediaPolicy(
            allow_hosts=hosts,
            max_bytes=self.media_max_bytes,
            max_pixels=self.media_max_pixels,
            max_images=self.media_max_images,
            total_timeout_s=self.media_timeout_s,
        )

    @property
    def resolved_database_url(self) -> str:
        """The async SQLAlchemy URL actually used."""
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{self.data_dir / 'tokentill.db'}"
