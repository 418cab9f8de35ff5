"""Settings refuse configurations that would break a promise silently."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from tokentill.settings import Settings


def test_hold_must_outlive_the_request_deadline() -> None:
    with pytest.raises(ValidationError, match="TOKENTILL_HOLD_TTL_S .* must be more than TOKENTILL_REQUEST"):
        Settings(request_timeout_s=1800, hold_ttl_s=1800, rate_limit_lease_ttl_s=1800)
    with pytest.raises(ValidationError, match="TOKENTILL_HOLD_TTL_S"):
        Settings(request_timeout_s=3600, rate_limit_lease_ttl_s=3600)  # the default hold TTL is 1800
    ok = Settings(request_timeout_s=9, hold_ttl_s=10)
    assert ok.hold_ttl_s > ok.request_timeout_s


def test_initial_credits_are_checked_up_front() -> None:
    with pytest.raises(ValidationError, match="too many credits"):
        Settings(initial_credits="1e999999")
    with pytest.raises(ValidationError, match="not a number"):
        Settings(initial_credits="ten")
    assert Settings(initial_credits="0.25").initial_credits == "0.25"


@pytest.mark.parametrize("entry", ["::1:80", "images.internal", "images.internal:0", "images.internal:65536"])
def test_media_allow_hosts_are_checked_as_the_fetcher_reads_them(entry: str) -> None:
    with pytest.raises(ValidationError, match="host:port|\\[addr\\]:port"):
        Settings(media_allow_hosts=entry)


def test_media_allow_hosts_accepts_what_the_fetcher_matches() -> None:
    value = "images.internal:80, [::1]:8080,127.0.0.1:9000"
    assert Settings(media_allow_hosts=value).media_allow_hosts == value


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        # the default: spin briefly, then sleep (ACTIVE only raises libgomp's throttled spin count)
        ("adaptive", {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "3000"}),
        ("passive", {"OMP_WAIT_POLICY": "PASSIVE"}),
        ("active", {"OMP_WAIT_POLICY": "ACTIVE"}),
    ],
)
def test_llama_wait_policy_sets_openmp_unless_the_operator_did(
    monkeypatch: pytest.MonkeyPatch, policy: str, expected: dict[str, str]
) -> None:
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        monkeypatch.delenv(name, raising=False)
    Settings(llama_wait_policy=policy).apply_native_environment()
    assert {k: os.environ.get(k) for k in expected} == expected
    assert {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & set(os.environ) == set(expected)
    for name, value in (("OMP_WAIT_POLICY", "ACTIVE"), ("GOMP_SPINCOUNT", "10")):
        for other in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
            monkeypatch.delenv(other, raising=False)
        monkeypatch.setenv(name, value)
        Settings(llama_wait_policy=policy).apply_native_environment()
        assert set(os.environ) & {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} == {name}  # the operator's wins
        assert os.environ[name] == value


def test_llama_wait_policy_defaults_to_adaptive_and_refuses_others() -> None:
    assert Settings().llama_wait_policy == "adaptive"
    assert Settings().llama_adapt_threads is True
    with pytest.raises(ValidationError, match="llama_wait_policy"):
        Settings(llama_wait_policy="spin")
