"""All of tokentill's configuration: one typed object read from `TOKENTILL_*` environment variables.

Nothing else reads the environment. The CLI turns its options into overrides of these fields, so every
`--flag` has a `TOKENTILL_FLAG` twin and the descriptions below are the help texts.

This module is a leaf (it imports no tokentill module but `errors`), so every layer may import it. The two
value formats an operator writes here and elsewhere are parsed here too, so start-up refuses exactly what
their users would: `parse_credits` (decimal credits → µcr; `billing.money` re-exports it) and
`parse_allow_hosts` (the image fetcher's `host:port` list; `media.fetch` re-exports it).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from decimal import Decimal, Inexact, InvalidOperation, localcontext
from pathlib import Path

import httpx2
import platformdirs
from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = [
    "MAX_UCR",
    "UCR_PER_CREDIT",
    "Settings",
    "llama_wait_environment",
    "parse_allow_hosts",
    "parse_credits",
]

UCR_PER_CREDIT = 1_000_000
MAX_UCR = 2**63 - 1  # the BIGINT column's limit
# libgomp's spins before a waiting worker sleeps (its default is 300000, about 3 ms; ACTIVE is minutes)
LLAMA_SPIN_COUNT = "3000"


def llama_wait_environment(policy: str, environ: Mapping[str, str]) -> dict[str, str]:
    """The OpenMP variables that give llama.cpp's workers the wait `policy` (`adaptive`, `passive`,
    `active`; see `Settings.llama_wait_policy`); none when `environ` already has the operator's own
    OMP_WAIT_POLICY or GOMP_SPINCOUNT.

    `adaptive` (a short spin, then sleep) is GOMP_SPINCOUNT, which libgomp lets override the policy's own
    spin count, with OMP_WAIT_POLICY=ACTIVE beside it for one reason: once libgomp manages more threads
    than there are cores it spins only its "throttled" count, 100 without a policy and 1000 with ACTIVE
    (never more than GOMP_SPINCOUNT). Every engine that has decoded keeps a pool of workers, so on 2 cores
    a second model serving once was enough: 100 spins behave like sleeping at once, and workload (i) of
    bench/batching.py ran 30 % slower (8-row steps 189 ms at 2 threads against 117 ms with ACTIVE beside;
    docs/performance.md, "Engine, fourth pass")."""
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return {}
    if policy == "adaptive":
        return {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": LLAMA_SPIN_COUNT}
    return {"OMP_WAIT_POLICY": policy.upper()}


def parse_credits(text: str) -> int:
    """Decimal credits → µcr, exactly: "0.25" → 250000, "10" → 10000000.

    Raises `ValueError` for text that is not a finite decimal number, a negative amount, more precision
    than one µcr (trailing zeros are fine: "1.50000000" is exact), or more than a BIGINT holds.
    """
    try:
        value = Decimal(text.strip())
    except InvalidOperation:
        raise ValueError(f"not a number of credits: {_shown(text)}") from None
    if not value.is_finite():
        raise ValueError(f"not a number of credits: {_shown(text)}")
    if value < 0:
        raise ValueError(f"credits cannot be negative: {_shown(text)}")
    if value.adjusted() > 18:  # over 10**18 credits: past any BIGINT of µcr (also keeps 1e999999 cheap)
        raise ValueError(f"too many credits: {_shown(text)}")
    too_fine = ValueError(f"credits have at most 6 decimals (1 µcr = 0.000001): {_shown(text)}")
    with localcontext() as ctx:
        ctx.prec = 60  # room for every amount that passed the check above, with 6 decimals to spare
        ctx.traps[Inexact] = True  # more significant digits than that can only be a too-fine fraction
        try:
            ucr = value * UCR_PER_CREDIT
        except Inexact:
            raise too_fine from None
    if ucr != ucr.to_integral_value():
        raise too_fine
    if ucr > MAX_UCR:
        raise ValueError(f"too many credits: {_shown(text)}")
    return int(ucr)


def _shown(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:40] + "…")


def parse_allow_hosts(entries: Iterable[str]) -> frozenset[tuple[str, int]]:
    """Parse "host:port" entries ("[::1]:8080" for IPv6) into (lowercased host, port) pairs.

    Raises ValueError on an entry without a valid port: this is a configuration error, caught at start-up.
    """
    parsed: set[tuple[str, int]] = set()
    for raw in entries:
        entry = raw.strip().lower()
        host, sep, port_text = entry.rpartition(":")
        if not sep or not host or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ValueError(f"media allow_hosts entry {raw!r} must be host:port, e.g. images.internal:80")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        elif ":" in host:
            raise ValueError(f"media allow_hosts entry {raw!r}: write IPv6 addresses as [addr]:port")
        elif not host.isascii():
            host = _idna(host, raw)  # compared with the URL's ASCII host, as httpx2 encodes it
        parsed.add((host.rstrip("."), int(port_text)))
    return frozenset(parsed)


def _idna(host: str, raw: str) -> str:
    try:
        return httpx2.URL(f"http://{host}/").raw_host.decode("ascii").lower()
    except (httpx2.InvalidURL, UnicodeError) as exc:
        raise ValueError(f"media allow_hosts entry {raw!r}: not a valid host name ({exc})") from None


def _default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("tokentill", appauthor=False))


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TOKENTILL_", extra="ignore", frozen=True)

    data_dir: Path = Field(
        default_factory=_default_data_dir,
        description="Folder for the SQLite database, downloaded models and the settlement spool (keep it on "
        "persistent storage; default: the user data folder).",
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
    worker_healthcheck_s: int = Field(
        default=5,
        ge=1,
        description="With several workers: how long the supervisor waits for a worker to answer its health "
        "ping before it restarts that worker (uvicorn's --timeout-worker-healthcheck).",
    )
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
        default=None,
        ge=1,
        description="CPU threads for the embedded engine, at most (default: all cores); a catalogue "
        "entry's `n_threads` overrides it. With LLAMA_ADAPT_THREADS the engine uses fewer while fewer "
        "decode faster.",
    )
    llama_adapt_threads: bool = Field(
        default=True,
        description="Let the embedded engine's decode loop measure, every few seconds of decoding, "
        "whether one thread fewer (or, after that, one more, up to N_THREADS) decodes faster, and switch "
        "when it is more than 15% faster: on a quiet machine all cores win, beside a CPU hog fewer do "
        "(docs/performance.md, 'Busy machine'). `false` keeps N_THREADS fixed.",
    )
    llama_wait_policy: str = Field(
        default="adaptive",
        pattern="^(adaptive|passive|active)$",
        description="How llama.cpp's worker threads wait at their barriers, set before llama.cpp loads "
        "unless OMP_WAIT_POLICY or GOMP_SPINCOUNT is already set. `adaptive`: spin briefly, then sleep "
        f"(GOMP_SPINCOUNT={LLAMA_SPIN_COUNT} with OMP_WAIT_POLICY=ACTIVE, which keeps 1000 spins rather "
        "than 100 once libgomp manages more threads than there are cores); fast on a quiet machine, and "
        "with LLAMA_ADAPT_THREADS safe beside other work. `passive` (OMP_WAIT_POLICY=PASSIVE): sleep at "
        "once; a third of the quiet speed, but spinning never stalls the other threads. `active` "
        "(OMP_WAIT_POLICY=ACTIVE): spin; fastest on an idle machine, collapses when anything else needs "
        "a core (docs/performance.md).",
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
    metrics_key: SecretStr | None = Field(
        default=None,
        description="Bearer token GET /metrics requires (the admin key opens it too); unset = /metrics is "
        "open to anyone who can reach the server.",
    )
    docs_enabled: bool = Field(
        default=True, description="Serve the API docs: /docs and /openapi.json (false: both answer 404)."
    )
    metrics_multiproc_dir: Path | None = Field(
        default=None,
        validation_alias=AliasChoices("metrics_multiproc_dir", "prometheus_multiproc_dir"),
        description="prometheus-client's multiprocess folder (PROMETHEUS_MULTIPROC_DIR); `serve --workers N` "
        "sets it to a fresh folder under DATA_DIR so /metrics sums every worker.",
    )
    console_session_ttl_s: int = Field(
        default=12 * 3600, ge=60, description="How long a console sign-in lasts (seconds)."
    )
    console_login_attempts_per_minute: int = Field(
        default=10,
        ge=1,
        description="Console sign-in attempts one client address may make per minute (429 past it), across "
        "replicas when Redis is configured.",
    )
    log_level: str = Field(default="info", description="Logging level.")
    access_log: bool = Field(
        default=True,
        description="One log line per HTTP response (uvicorn's access log: client, method, path, status); "
        "false leaves it to a proxy in front.",
    )
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
    database_statement_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="PostgreSQL: longest a statement may take (the pool's liveness ping included) before "
        "503; a connection cut off without a reset (a partition) would otherwise hang its request forever.",
    )
    settlement_retry_s: float = Field(
        default=3600.0,
        gt=0,
        description="How long a settlement the database refused (outage) is retried, with backoff, by the "
        "process that delivered the answer; it is also kept in DATA_DIR/spool and replayed at start-up, "
        "so an answer delivered is billed once even past this.",
    )
    idempotency_lease_s: float = Field(
        default=10.0,
        ge=1,
        description="An Idempotency-Key claim lives this long unless its running request renews it (it does, "
        "every third of it); a claim whose process died is taken over after it, not after the deadline.",
    )
    read_timeout_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="A client must send a request's headers within this many seconds of its first byte, "
        "and its body within this many seconds of the headers; else 408 request_timeout and the "
        "connection is closed (slow or stalled clients cannot hold a connection open).",
    )
    keepalive_timeout_s: float = Field(
        default=5.0,
        gt=0,
        le=3600,
        description="An open connection with no request in progress (a new one that sends nothing, or "
        "one kept alive after a response) is closed after this many idle seconds.",
    )
    key_cache_s: float = Field(
        default=1.0,
        ge=0,
        le=1.0,
        description="The chat routes may authenticate a key from this process's cache of keys read at most "
        "this many seconds ago (0: read the key on every request). A revoked key still takes no credit "
        "anywhere after the revocation commits: every credit hold checks the key in the database.",
    )
    group_commit: bool = Field(
        default=True,
        description="Apply the credit holds and settlements of concurrent requests in one database "
        "transaction per batch (one writer task per process) instead of one transaction each. Same money "
        "rules and the same guarantee: a request's hold, and its usage and ledger rows, are committed "
        "before it goes on or its response completes.",
    )
    max_connections: int = Field(
        default=512,
        ge=1,
        description="Open client connections per worker process; one more is answered 503 overloaded and "
        "closed. Keep it well under the process's open-file limit (ulimit -n).",
    )

    @field_validator("media_allow_hosts")
    @classmethod
    def _host_ports(cls, value: str) -> str:
        # The fetcher's own parser, so that what start-up accepts is exactly what the fetcher matches.
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

    @property
    def resolved_database_url(self) -> str:
        """The async SQLAlchemy URL actually used."""
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{self.data_dir / 'tokentill.db'}"

    def apply_native_environment(self) -> None:
        """Hand llama.cpp's OpenMP runtime its wait policy; call before the first `import llama_cpp` (libgomp
        reads it once, when it loads). An operator's own OMP_WAIT_POLICY or GOMP_SPINCOUNT wins."""
        os.environ.update(llama_wait_environment(self.llama_wait_policy, os.environ))
