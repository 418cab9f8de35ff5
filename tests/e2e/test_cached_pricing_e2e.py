"""Cached-input pricing end to end: prompt tokens served from the prefix cache cost `price_cached_input`.

A `tokentill serve` whose embedded `smol` entry (SmolLM2, no reasoning) charges 100 µcr a prompt token,
10 a cached one, 200 a completion token, and whose `relay` entry fronts the scripted upstream (which
reports 2 cached of 11 prompt tokens). The same long prompt twice: the second reuses the first's KV
cells, is billed less by exactly cached × 90 µcr, and the usage row, `/v1/usage` and `tokentill usage`
show the cached tokens and the saving.
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest
import requests

from tests.e2e.conftest import TokentillServer, llama_available
from tests.e2e.test_upstream_e2e import start_gateway
from tests.engines.upstream_servers import USAGE, ScriptedUpstream

pytestmark = [pytest.mark.e2e, pytest.mark.llama]

PRICE_IN, PRICE_CACHED, PRICE_OUT = 100, 10, 200
LONG_SYSTEM = " ".join(f"Rule {i}: answer politely and briefly, in plain words." for i in range(60))


def _credits(text: str) -> Decimal:
    return Decimal(text)


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, scripted: ScriptedUpstream
) -> Iterator[TokentillServer]:
    llama_available()
    workdir: Path = tmp_path_factory.mktemp("cached")
    prices = {"price_input": PRICE_IN, "price_cached_input": PRICE_CACHED, "price_output": PRICE_OUT}
    server = start_gateway(
        workdir,
        [
            {"id": "smol", "reasoning": "none", "context": 4096, **prices},
            {"id": "relay", "engine": "upstream", "base_url": scripted.url + "/ok/v1", **prices},
        ],
    )
    yield server
    server.stop()


def _ask(client: openai.OpenAI, model: str) -> Any:
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "system", "content": LONG_SYSTEM}, {"role": "user", "content": "Say hi."}],
        max_completion_tokens=3,
        temperature=0,
    )


def _expected_cost(usage: Any) -> int:
    cached = usage.prompt_tokens_details.cached_tokens
    return (
        (usage.prompt_tokens - cached) * PRICE_IN
        + cached * PRICE_CACHED
        + usage.completion_tokens * PRICE_OUT
    )


def test_repeated_long_prompt_is_billed_less_by_exactly_the_discount(gateway: TokentillServer) -> None:
    key = gateway.new_key("cache", credits="10")
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)
    start = _credits(gateway.balance("cache"))
    first = _ask(client, "smol")
    after_first = _credits(gateway.balance("cache"))
    second = _ask(client, "smol")
    after_second = _credits(gateway.balance("cache"))

    assert first.usage.prompt_tokens == second.usage.prompt_tokens > 500
    assert first.usage.completion_tokens == second.usage.completion_tokens  # greedy: the same answer
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached > 500 and cached > first.usage.prompt_tokens_details.cached_tokens
    first_cost, second_cost = start - after_first, after_first - after_second
    assert first_cost * 1_000_000 == _expected_cost(first.usage)
    assert second_cost * 1_000_000 == _expected_cost(second.usage)
    discount = (cached - first.usage.prompt_tokens_details.cached_tokens) * (PRICE_IN - PRICE_CACHED)
    assert (first_cost - second_cost) * 1_000_000 == discount

    # The usage row (CLI), the request log and the /v1/usage report show the cached tokens and the saving.
    rows = gateway.cli_json("usage", "--account", "cache")["usage"]
    assert rows[0]["cached_tokens"] == cached
    assert _credits(rows[0]["cached_saving"]) * 1_000_000 == cached * (PRICE_IN - PRICE_CACHED)
    assert "(cached " in gateway.cli("usage", "--account", "cache").stdout
    headers = {"authorization": f"Bearer {key}"}
    log = requests.get(gateway.url + "/v1/usage/requests", headers=headers, timeout=30).json()["data"]
    assert log[0]["cached_tokens"] == cached and log[0]["cached_saving"] == rows[0]["cached_saving"]
    report = requests.get(gateway.url + "/v1/usage", headers=headers, timeout=30).json()
    total = report["total"]
    assert total["cached_tokens"] == sum(r["cached_tokens"] for r in rows)
    assert _credits(total["cached_saving"]) == sum(_credits(r["cached_saving"]) for r in rows)


def test_upstream_cached_tokens_are_billed_at_the_cached_price(gateway: TokentillServer) -> None:
    key = gateway.new_key("cache-relay", credits="10")
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)
    start = _credits(gateway.balance("cache-relay"))
    answer = _ask(client, "relay")
    assert answer.usage.prompt_tokens_details.cached_tokens == USAGE["prompt_tokens_details"]["cached_tokens"]  # type: ignore[index]
    assert (start - _credits(gateway.balance("cache-relay"))) * 1_000_000 == _expected_cost(answer.usage)
