"""Prometheus metrics (`GET /metrics`): what operators watch — responses, requests, tokens, credits, latency.

Module-level collectors are the prometheus-client convention (one process-wide registry); they hold
counters only, no configuration or connections, so importing this module opens nothing.

With several worker processes (`serve --workers N`) each process writes its counters to files in
prometheus-client's multiprocess folder (`PROMETHEUS_MULTIPROC_DIR`, set by `serve` before any worker
imports prometheus-client) and `registry(folder)` sums them, so every worker answers /metrics with the
whole server's figures. `summary(registry)` reads the same samples for the operator console.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, multiprocess

from tokentill.billing.records import UsageRecord

__all__ = [
    "MetricsSummary",
    "observe_deferred_settlement",
    "observe_group_commit",
    "observe_request",
    "observe_response",
    "registry",
    "summary",
]

RESPONSES = Counter(
    "tokentill_http_responses",
    "HTTP responses sent, every route and status (refusals included), by status and error code "
    "(empty for successes)",
    ["status", "code"],
)
REQUESTS = Counter(
    "tokentill_requests", "Chat completions settled, by model and HTTP status", ["model", "status"]
)
TOKENS = Counter("tokentill_tokens", "Tokens billed, by model and kind", ["model", "kind"])
CHARGED = Counter("tokentill_charged_microcredits", "Micro-credits charged, by model", ["model"])
LATENCY = Histogram(
    "tokentill_request_seconds",
    "Time from admission to settlement, by model",
    ["model"],
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)

SETTLEMENTS_DEFERRED = Counter(
    "tokentill_settlements_deferred",
    "Settlements the database refused (event=spooled), and such settlements that later committed "
    "(event=committed, replays at start-up included); spooled minus committed is what is still owed",
    ["event"],
)


GROUP_COMMIT = Counter(
    "tokentill_group_commit",
    "Group commit (TOKENTILL_GROUP_COMMIT): credit holds, settlements and releases applied (what=ops) "
    "and the database transactions they took (what=batches); ops / batches is the mean batch size",
    ["what"],
)


_M = TypeVar("_M", Counter, Histogram)
_children: dict[tuple[object, ...], Any] = {}


def _child(metric: _M, *values: str) -> _M:
    """`metric.labels(*values)`, made once: prometheus-client checks the values and takes a lock on every
    `labels` call, about a dozen per request. The label values come from small fixed sets (catalogue
    models, statuses, error codes), as prometheus-client's own table of children already assumes."""
    key = (metric, *values)
    child: _M | None = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*values)
    return child


def observe_group_commit(ops: int) -> None:
    """Count one group-commit transaction of `ops` operations."""
    _child(GROUP_COMMIT, "batches").inc()
    _child(GROUP_COMMIT, "ops").inc(ops)


def observe_deferred_settlement(event: str) -> None:
    """Count a settlement spooled during a database outage (`spooled`) or committed later (`committed`)."""
    _child(SETTLEMENTS_DEFERRED, event).inc()


def observe_response(status: int, code: str) -> None:
    """Count one HTTP response (`code` is the error envelope's code, "" for a success)."""
    _child(RESPONSES, str(status), code).inc()


def observe_request(record: UsageRecord, cost: int, seconds: float) -> None:
    """Count one settled request (every status, free failures included)."""
    model = record.model
    _child(REQUESTS, model, str(record.status)).inc()
    _child(LATENCY, model).observe(seconds)
    if cost:
        _child(TOKENS, model, "prompt").inc(record.prompt_tokens)
        _child(TOKENS, model, "completion").inc(record.completion_tokens)
        _child(TOKENS, model, "reasoning").inc(record.reasoning_tokens)
        _child(TOKENS, model, "cached").inc(record.cached_tokens)
        _child(TOKENS, model, "image").inc(record.image_tokens)
        _child(CHARGED, model).inc(cost)


def registry(multiproc_dir: Path | None) -> CollectorRegistry:
    """What /metrics shows: this process's registry, or the sum of every worker's files in
    `multiproc_dir` when the server runs in prometheus-client's multiprocess mode."""
    if multiproc_dir is None:
        return REGISTRY
    combined = CollectorRegistry()
    collector: Callable[..., object] = multiprocess.MultiProcessCollector  # its __init__ is unannotated
    collector(combined, path=str(multiproc_dir))
    return combined


@dataclass(frozen=True)
class MetricsSummary:
    """The counters the operator console shows, read from the registry /metrics renders."""

    responses: dict[tuple[str, str], int] = field(default_factory=dict)  # (status, code) → count
    requests: dict[tuple[str, str], int] = field(default_factory=dict)  # (model, status) → count
    charged: dict[str, int] = field(default_factory=dict)  # model → µcr

    @property
    def total_responses(self) -> int:
        return sum(self.responses.values())


def summary(source: CollectorRegistry) -> MetricsSummary:
    responses: dict[tuple[str, str], int] = defaultdict(int)
    requests: dict[tuple[str, str], int] = defaultdict(int)
    charged: dict[str, int] = defaultdict(int)
    for family in source.collect():
        for sample in family.samples:
            if sample.name == "tokentill_http_responses_total":
                responses[sample.labels["status"], sample.labels["code"]] += int(sample.value)
            elif sample.name == "tokentill_requests_total":
                requests[sample.labels["model"], sample.labels["status"]] += int(sample.value)
            elif sample.name == "tokentill_charged_microcredits_total":
                charged[sample.labels["model"]] += int(sample.value)
    return MetricsSummary(dict(responses), dict(requests), dict(charged))
