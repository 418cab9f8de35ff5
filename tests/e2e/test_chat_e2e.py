"""The contract as users meet it: the official openai SDK (sync and async) and the seed's requests snippet,
against a real `tokentill serve` on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
from decimal import Decimal

import openai
import pytest
import requests

from tests.e2e.conftest import DEFAULT_MODEL, TokentillServer

pytestmark = [pytest.mark.e2e, pytest.mark.llama]


@pytest.fixture(scope="module")
def key(server: TokentillServer) -> str:
    return server.new_key("sdk-user", credits="5")


def _assert_usage_shape(usage: dict[str, object]) -> None:
    assert set(usage) >= {"prompt_tokens", "completion_tokens", "total_tokens"}
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]  # type: ignore[operator]
    assert "cached_tokens" in usage["prompt_tokens_details"]  # type: ignore[operator]
    assert "reasoning_tokens" in usage["completion_tokens_details"]  # type: ignore[operator]


def test_seed_requests_snippet(server: TokentillServer) -> None:
    """The seed's own code, text part only, at the seed's URL shape.

    It asks for no budget, so the answer may run to the rest of the context; the key's tokens-per-minute
    limit caps that default budget (as it would for a user's key) to keep the request short on a busy
    machine, and the client waits as long as the server's own deadline allows.
    """
    key = server.new_key("seed-user", credits="5", tpm="600")
    url = server.url + "/v1/o1-preview"
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    data = {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is 2 + 2?"}]}]}
    response = requests.post(url, json=data, headers=headers, timeout=server.request_timeout_s + 30)
    body = response.json()
    assert response.status_code == 200, body
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == DEFAULT_MODEL
    choice = body["choices"][0]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str) and choice["message"]["content"].strip()
    assert choice["finish_reason"] in {"stop", "length"}
    _assert_usage_shape(body["usage"])
    assert response.headers["x-request-id"].startswith("req_")
    assert Decimal(response.headers["x-remaining-credits"]) < Decimal("5")


def test_openai_sdk_sync(server: TokentillServer, key: str) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
    before = Decimal(server.balance("sdk-user"))
    completion = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=[{"role": "user", "content": "Name a colour."}],
        max_completion_tokens=90,
        reasoning_effort="low",
        temperature=0,
    )
    assert completion.choices[0].message.content
    usage = completion.usage
    assert usage is not None and usage.completion_tokens <= 90
    assert usage.prompt_tokens_details is not None and usage.prompt_tokens_details.cached_tokens is not None
    assert usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens is not None
    # Billing to the micro-credit: 15 µcr per prompt token, 60 per completion token.
    charged = before - Decimal(server.balance("sdk-user"))
    assert charged == Decimal(usage.prompt_tokens * 15 + usage.completion_tokens * 60) / 1_000_000


def test_openai_sdk_async_concurrent(server: TokentillServer, key: str) -> None:
    async def main() -> list[str]:
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0) as client:
            calls = [
                client.chat.completions.create(
                    model=DEFAULT_MODEL,
                    messages=[{"role": "user", "content": f"Count from {i} to {i + 3}."}],
                    max_completion_tokens=80,
                    reasoning_effort="low",
                    temperature=0,
                    seed=i,
                )
                for i in range(4)
            ]
            results = await asyncio.gather(*calls)
        return [r.choices[0].message.content or "" for r in results]

    answers = asyncio.run(main())
    assert len(answers) == 4 and all(a.strip() for a in answers)


def test_greedy_is_deterministic_and_alone_equals_concurrent(server: TokentillServer, key: str) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)

    def ask(topic: str) -> str:
        r = client.chat.completions.create(
            model=DEFAULT_MODEL,
            messages=[{"role": "user", "content": f"Write one sentence about {topic}."}],
            max_completion_tokens=84,
            reasoning_effort="low",
            temperature=0,
        )
        return r.choices[0].message.content or ""

    alone = {t: ask(t) for t in ("cats", "rivers")}

    async def together() -> dict[str, str]:
        loop = asyncio.get_running_loop()
        results = await asyncio.gather(*(loop.run_in_executor(None, ask, t) for t in ("cats", "rivers")))
        return dict(zip(("cats", "rivers"), results, strict=True))

    assert asyncio.run(together()) == alone


def test_chat_completions_route_and_models(server: TokentillServer, key: str) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
    models = client.models.list()
    assert DEFAULT_MODEL in [m.id for m in models.data]
    assert client.models.retrieve(DEFAULT_MODEL).id == DEFAULT_MODEL
    r = requests.post(
        server.url + "/v1/chat/completions",
        headers={"x-api-key": key},
        json={"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 4


def test_stop_and_length(server: TokentillServer, key: str) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
    r = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=[{"role": "user", "content": "Write a long story about a dragon."}],
        max_completion_tokens=5,
        temperature=0,
    )
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 5


def test_health_and_ready(server: TokentillServer) -> None:
    assert requests.get(server.url + "/healthz", timeout=5).json() == {"status": "ok"}
    assert requests.get(server.url + "/readyz", timeout=5).status_code == 200
    metrics = requests.get(server.url + "/metrics", timeout=5)
    assert metrics.status_code == 200 and "python_info" in metrics.text


def test_logit_bias_and_penalties_reach_the_model(server: TokentillServer, key: str) -> None:
    import llama_cpp

    from tokentill.catalog import default_weights_path

    vocab = llama_cpp.Llama(model_path=str(default_weights_path()), vocab_only=True, verbose=False)
    try:
        (seven,) = vocab.tokenize(b"7", add_bos=False, special=True)
    finally:
        vocab.close()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
    completion = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=[{"role": "user", "content": "Name a colour."}],
        max_completion_tokens=72,
        reasoning_effort="low",  # 64 hidden tokens, then 8 visible ones
        temperature=0,
        logit_bias={str(seven): 100},
        frequency_penalty=0,
        presence_penalty=0,
    )
    assert completion.choices[0].message.content == "7" * 8
    assert completion.choices[0].finish_reason == "length"


def test_models_carry_the_balance(server: TokentillServer, key: str) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
    listed = client.models.with_raw_response.list()
    assert listed.headers["x-remaining-credits"] == server.balance("sdk-user")
    assert DEFAULT_MODEL in [m.id for m in listed.parse().data]
    one = client.models.with_raw_response.retrieve(DEFAULT_MODEL)
    assert one.headers["x-remaining-credits"] == server.balance("sdk-user")
    assert one.parse().id == DEFAULT_MODEL


def test_user_and_metadata_are_accepted(server: TokentillServer, key: str) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
    completion = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        max_completion_tokens=4,
        user="end-user-42",
        metadata={"k" * 64: "v" * 512, **{f"tag{i}": str(i) for i in range(15)}},  # OpenAI's limits, exactly
    )
    assert completion.usage is not None and completion.usage.completion_tokens <= 4


def _answer(client: openai.OpenAI, **options: object) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(  # type: ignore[call-overload, no-any-return]
        model=DEFAULT_MODEL,
        messages=[{"role": "user", "content": "Write two sentences about the sea."}],
        **{"max_completion_tokens": 96, "reasoning_effort": "low", **options},  # 64 hidden tokens, ≤ 32 shown
    )


def test_same_seed_same_text(server: TokentillServer, key: str) -> None:
    """Sampled (temperature 0.9) yet repeatable with a seed. llama.cpp's arithmetic depends on how a prompt
    is batched, and a prompt that reuses another request's cached prefix is batched differently, so the
    first run warms the cache; the two that follow meet the same cache and must agree to the token."""
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
    _answer(client, temperature=0.9, seed=1234)
    first = _answer(client, temperature=0.9, seed=1234)
    second = _answer(client, temperature=0.9, seed=1234)
    assert first.choices[0].message.content
    assert first.choices[0].message.content == second.choices[0].message.content
    assert first.usage is not None and second.usage is not None
    assert first.usage.completion_tokens == second.usage.completion_tokens


def test_what_langchain_sends_is_sampled_in_the_batch(server: TokentillServer, key: str) -> None:
    """top_p, both penalties, a logit bias and a temperature together (the vectorised sampler's rows): a
    +100 bias still forces its token, and a seed still repeats the text (after a run that warms the cache,
    as in test_same_seed_same_text)."""
    import llama_cpp

    from tokentill.catalog import default_weights_path

    vocab = llama_cpp.Llama(model_path=str(default_weights_path()), vocab_only=True, verbose=False)
    try:
        (seven,) = vocab.tokenize(b"7", add_bos=False, special=True)
    finally:
        vocab.close()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
    sampling: dict[str, object] = {
        "temperature": 1.3,
        "top_p": 0.9,
        "frequency_penalty": 0.5,
        "presence_penalty": 0.4,
    }
    forced = _answer(client, logit_bias={str(seven): 100}, max_completion_tokens=72, **sampling)
    assert forced.choices[0].message.content == "7" * 8
    _answer(client, seed=77, **sampling)
    first = _answer(client, seed=77, **sampling)
    second = _answer(client, seed=77, **sampling)
    assert first.choices[0].message.content
    assert first.choices[0].message.content == second.choices[0].message.content


def test_stop_cuts_the_answer(server: TokentillServer, key: str) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
    _answer(client, temperature=0)  # warms the cache, as in test_same_seed_same_text
    whole = _answer(client, temperature=0)
    full = whole.choices[0].message.content or ""
    words = full.split()
    assert len(words) >= 3, full
    stop = " " + words[2]
    stopped = _answer(client, temperature=0, stop=[stop, "no such text"])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == full[: full.index(stop)]
    assert stopped.usage is not None and whole.usage is not None
    assert stopped.usage.completion_tokens < whole.usage.completion_tokens  # generation stopped there
