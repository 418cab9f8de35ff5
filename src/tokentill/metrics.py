"""Prometheus metrics (`GET /metrics`): what operators watch — requests, tokens, credits, latency.

Module-level collectors are the prometheus-client convention (one process-wide registry); they hold
counters only, no configuration or connections, so importing this module opens nothing.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from tokentill.billing.records import UsageRecord

__all__ = ["observe_request"]

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


def observe_request(record: UsageRecord, cost: int, seconds: float) -> None:
    """Count one settled request (every status, free failures included)."""
    model = record.model
    REQUESTS.labels(model, str(record.status)).inc()
    LATENCY.labels(model).observe(seconds)
    if cost:
        TOKENS.labels(model, "prompt").inc(record.prompt_tokens)
        TOKENS.labels(model, "completion").inc(record.completion_tokens)
        TOKENS.labels(model, "reasoning").inc(record.reasoning_tokens)
        TOKENS.labels(model, "cached").inc(record.cached_tokens)
        TOKENS.labels(model, "image").inc(record.image_tokens)
        CHARGED.labels(model).inc(cost)
