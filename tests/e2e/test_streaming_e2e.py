"""SSE streaming and o1-style reasoning on a real server: what the SDK reads, what is hidden, what is
billed."""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest
import requests

from tests.e2e.conftest import DEFAULT_MODEL, TokentillServer

pytestmark = [pytest.mark.e2e, pytest.mark.llama]


@pytest.fixture(scope="module")
def key(sqlite_server: TokentillServer) -> str:
    return sqlite_server.new_key("streamer", credits="5")


def _sse(response: requests.Response) -> tuple[list[dict[str, Any]], list[str]]:
    """Parsed `data:` events and the raw lines; asserts `[DONE]` comes last."""
    events: list[dict[str, Any]] = []
    raw: list[str] = []
    for line in response.iter_lines(decode_unicode=True):
        if not line:
            continue
        raw.append(line)
        if line.startswith(":"):
            continue  # keep-alive comment
        assert line.startswith("data: "), line
        payload = line[len("data: ") :]
        if payload == "[DONE]":
            continue
        events.append(json.loads(payload))
    assert raw[-1] == "data: [DONE]"
    return events, raw


def _charged(server: TokentillServer, account: str, before: Decimal) -> Decimal:
    return before - Decimal(server.balance(account))


def test_sdk_stream_with_usage(sqlite_server: TokentillServer, key: str) -> None:
    client = openai.OpenAI(base_url=sqlite_server.url + "/v1", api_key=key, max_retries=0)
    before = Decimal(sqlite_server.balance("streamer"))
    stream = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=[{"role": "user", "content": "Say hello to the world."}],
        max_completion_tokens=100,
        reasoning_effort="low",
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    *body, last = chunks
    assert all(c.usage is None for c in body)
    assert last.choices == [] and last.usage is not None
    finals = [c for c in body if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0] is body[-1]
    text = "".join(c.choices[0].delta.content or "" for c in body)
    usage = last.usage
    assert text.strip()
    assert usage.completion_tokens_details is not None
    assert 0 < usage.completion_tokens_details.reasoning_tokens <= 64
    assert usage.completion_tokens <= 100
    expected = Decimal(usage.prompt_tokens * 15 + usage.completion_tokens * 60) / 1_000_000
    assert _charged(sqlite_server, "streamer", before) == expected


def test_raw_sse_with_requests(sqlite_server: TokentillServer, key: str) -> None:
    """The chunk invariants, read by a parser nobody here wrote the other end of."""
    response = requests.post(
        sqlite_server.url + "/v1/o1-preview",
        headers={"Authorization": f"Bearer {key}"},
        json={
            "messages": [{"role": "user", "content": "Count to three."}],
            "max_completion_tokens": 90,
            "reasoning_effort": "low",
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        stream=True,
        timeout=300,
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events, raw = _sse(response)  # asserts `[DONE]` is the last line
    assert raw[-2].startswith("data: {")  # the usage chunk comes right before `[DONE]`
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert len({e["id"] for e in events}) == 1 and len({e["created"] for e in events}) == 1
    assert events[0]["id"].startswith("chatcmpl-")
    # The role comes once, in the first delta.
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert not any("role" in e["choices"][0]["delta"] for e in events[1:] if e["choices"])
    # `usage` is null on every chunk but the last, which has no choices and the full usage.
    *body, last = events
    assert all(e["usage"] is None for e in body)
    assert last["choices"] == []
    usage = last["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    reasoning = usage["completion_tokens_details"]["reasoning_tokens"]
    assert 0 < reasoning <= 64 and usage["completion_tokens"] <= 90
    # The one finish_reason chunk comes right before the usage chunk, with an empty delta.
    finals = [e for e in body if e["choices"][0]["finish_reason"] is not None]
    assert finals == [body[-1]]
    assert body[-1]["choices"][0]["finish_reason"] in {"stop", "length"}
    assert body[-1]["choices"][0]["delta"] == {}
    # Hidden by default: no reasoning on the wire, only the answer.
    assert not any("reasoning_content" in e["choices"][0]["delta"] for e in body)
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in body).strip()


def test_reasoning_hidden_by_default_shown_on_request(sqlite_server: TokentillServer, key: str) -> None:
    client = openai.OpenAI(base_url=sqlite_server.url + "/v1", api_key=key, max_retries=0)
    body: dict[str, Any] = {
        "model": DEFAULT_MODEL,
        "messages": [{"role": "user", "content": "Is 7 a prime number?"}],
        "max_completion_tokens": 120,
        "reasoning_effort": "low",
        "temperature": 0,
    }
    hidden = client.chat.completions.create(**body)
    assert hidden.usage is not None and hidden.usage.completion_tokens_details is not None
    assert hidden.usage.completion_tokens_details.reasoning_tokens > 0
    assert "reasoning_content" not in hidden.choices[0].message.model_dump()
    shown = client.chat.completions.create(**body, extra_body={"include_reasoning": True})
    reasoning = shown.choices[0].message.model_dump().get("reasoning_content")
    assert isinstance(reasoning, str) and reasoning.strip()
    # Streamed, the reasoning arrives as delta.reasoning_content before the answer.
    stream = client.chat.completions.create(**body, stream=True, extra_body={"include_reasoning": True})
    deltas = [c.choices[0].delta.model_dump() for c in stream if c.choices]
    assert any(d.get("reasoning_content") for d in deltas)


def test_reasoning_can_use_the_whole_budget(sqlite_server: TokentillServer, key: str) -> None:
    client = openai.OpenAI(base_url=sqlite_server.url + "/v1", api_key=key, max_retries=0)
    reply = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=[{"role": "user", "content": "Explain how rainbows form."}],
        max_completion_tokens=12,
        reasoning_effort="high",
        temperature=0,  # sampled notes can end (EOS) inside 12 tokens and leave room for an answer
    )
    assert reply.choices[0].finish_reason == "length"
    assert reply.choices[0].message.content == ""
    assert reply.usage is not None and reply.usage.completion_tokens_details is not None
    assert reply.usage.completion_tokens == reply.usage.completion_tokens_details.reasoning_tokens == 12
    # Streamed alike: no content at all, the finish chunk says "length", the usage is all reasoning.
    stream = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=[{"role": "user", "content": "Explain how rainbows form."}],
        max_completion_tokens=12,
        reasoning_effort="high",
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    *body, last = list(stream)
    assert not "".join(c.choices[0].delta.content or "" for c in body)
    assert body[-1].choices[0].finish_reason == "length"
    assert last.usage is not None and last.usage.completion_tokens_details is not None
    assert last.usage.completion_tokens == last.usage.completion_tokens_details.reasoning_tokens == 12


def test_effort_sets_budget(sqlite_server: TokentillServer, key: str) -> None:
    client = openai.OpenAI(base_url=sqlite_server.url + "/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=DEFAULT_MODEL,
            messages=[{"role": "user", "content": "x"}],
            reasoning_effort="max",  # type: ignore[arg-type]
        )
    low = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=[{"role": "user", "content": "Write an essay on the history of bridges."}],
        max_completion_tokens=70,
        reasoning_effort="low",
    )
    assert low.usage is not None and low.usage.completion_tokens_details is not None
    assert low.usage.completion_tokens_details.reasoning_tokens <= 64


def test_disconnect_mid_stream_charges_generated_tokens(sqlite_server: TokentillServer) -> None:
    """The client leaves during the answer: it pays for the notes and the answer so far, to the
    micro-credit, the usage row says 499, no hold stays open, and the generation stopped."""
    key = sqlite_server.new_key("leaver", credits="1")
    response = requests.post(
        sqlite_server.url + "/v1/o1-preview",
        headers={"Authorization": f"Bearer {key}"},
        json={
            "messages": [{"role": "user", "content": "Write a very long story about a lighthouse keeper."}],
            "max_completion_tokens": 2000,
            "reasoning_effort": "low",
            "stream": True,
            "include_reasoning": True,
        },
        stream=True,
        timeout=300,
    )
    assert response.status_code == 200
    reasoning_chunks = content_chunks = 0
    for line in response.iter_lines():
        if not line.startswith(b"data: {"):
            continue
        delta = json.loads(line[len(b"data: ") :])["choices"][0]["delta"]
        reasoning_chunks += bool(delta.get("reasoning_content"))
        content_chunks += bool(delta.get("content"))
        if content_chunks >= 5:
            break
    response.close()  # the client goes away in the middle of the answer
    assert reasoning_chunks > 0
    deadline = time.monotonic() + 30
    rows: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        rows = sqlite_server.cli_json("usage", "--account", "leaver")["usage"]
        if rows:
            break
        time.sleep(0.5)
    assert len(rows) == 1, "the interrupted request was never settled"
    row = rows[0]
    assert row["status"] == 499
    # Every token generated is billed, reasoning included: at least one per chunk the client read.
    assert 0 < row["reasoning_tokens"] <= 64
    assert row["reasoning_tokens"] >= reasoning_chunks
    assert row["completion_tokens"] >= row["reasoning_tokens"] + content_chunks
    # It stopped at once: a few hundred tokens at most were in flight, nowhere near the 2000 asked.
    assert row["completion_tokens"] < row["reasoning_tokens"] + content_chunks + 300
    cost = Decimal(row["cost"])
    assert cost == Decimal(row["prompt_tokens"] * 15 + row["completion_tokens"] * 60) / 10**6
    assert sqlite_server.hold_statuses("leaver") == ["settled"]  # its one hold, closed
    balance = Decimal(sqlite_server.balance("leaver"))
    assert balance == Decimal(1) - cost  # charged what was generated, the rest of the hold released


def test_streaming_client_gone_before_the_first_token_pays_nothing(tmp_path: Path) -> None:
    """A streaming request still queued behind another when its client hangs up costs nothing."""
    catalogue = tmp_path / "models.toml"  # one pass per request: the slot is never free in between
    catalogue.write_text('[[models]]\nid = "plain"\nengine = "llamacpp"\ncontext = 2048\n')
    server = TokentillServer(
        tmp_path, None, TOKENTILL_MAX_PARALLEL="1", TOKENTILL_CONFIG=str(catalogue)
    ).start()
    try:
        hog_key = server.new_key("hog", credits="1")
        early_key = server.new_key("early", credits="1")

        def hog() -> None:  # holds the only decode slot for a few seconds
            requests.post(
                server.url + "/v1/plain",
                headers={"Authorization": f"Bearer {hog_key}"},
                json={
                    "messages": [{"role": "user", "content": "Write a long story about a ship."}],
                    "max_completion_tokens": 300,
                    "temperature": 1.0,
                    "logit_bias": {"0": -100, "2": -100},  # no end token: it decodes its whole budget
                },
                timeout=300,
            )

        with ThreadPoolExecutor(max_workers=1) as pool:
            hogging = pool.submit(hog)
            deadline = time.monotonic() + 30
            while Decimal(server.balance("hog")) == 1:  # its hold is taken: it is generating
                assert time.monotonic() < deadline, "the first request never started"
                time.sleep(0.1)
            body = json.dumps(
                {
                    "messages": [{"role": "user", "content": "Say hi."}],
                    "max_completion_tokens": 50,
                    "stream": True,
                }
            ).encode()
            head = (
                "POST /v1/plain HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Authorization: Bearer {early_key}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            ).encode()
            # Plain socket: requests would block until the response headers, which wait for a token.
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn:
                conn.sendall(head + body)
                time.sleep(1.0)  # queued behind the first request (its hold is taken meanwhile)
            assert not hogging.done(), "the first request ended before the second one left"
            hogging.result(timeout=300)
        deadline = time.monotonic() + 30
        rows: list[dict[str, Any]] = []
        while not rows and time.monotonic() < deadline:
            rows = server.cli_json("usage", "--account", "early")["usage"]
            time.sleep(0.2)
        assert len(rows) == 1, "the abandoned request was never settled"
        assert rows[0]["status"] == 499
        assert rows[0]["completion_tokens"] == 0 and Decimal(rows[0]["cost"]) == 0
        assert Decimal(server.balance("early")) == 1
    finally:
        server.stop()


def test_effort_orders_reasoning_tokens(sqlite_server: TokentillServer, key: str) -> None:
    client = openai.OpenAI(base_url=sqlite_server.url + "/v1", api_key=key, max_retries=0)
    used = {}
    for effort in ("low", "medium", "high"):
        reply = client.chat.completions.create(
            model=DEFAULT_MODEL,
            messages=[{"role": "user", "content": "Plan a three-day trip to Rome, day by day."}],
            max_completion_tokens=600,
            reasoning_effort=effort,  # type: ignore[arg-type]
            temperature=0,
        )
        assert reply.usage is not None and reply.usage.completion_tokens_details is not None
        used[effort] = reply.usage.completion_tokens_details.reasoning_tokens
    assert 0 < used["low"] <= used["medium"] <= used["high"] <= 512
    assert used["low"] <= 64 and used["medium"] <= 192


def test_many_concurrent_streams_finish_uninterleaved(sqlite_server: TokentillServer, key: str) -> None:
    # Unrelated topics: a stream that received another stream's tokens would name the other's topic.
    stems = ["apple", "violin", "glacier", "bicycle", "owl", "volcano", "chess", "pyramid"]

    def streamed(stem: str) -> str:
        with requests.post(
            sqlite_server.url + "/v1/o1-preview",
            headers={"Authorization": f"Bearer {key}"},
            json={
                "messages": [{"role": "user", "content": f"Write one sentence about the {stem}."}],
                "max_completion_tokens": 100,
                "reasoning_effort": "low",
                "temperature": 0,
                "stream": True,
            },
            stream=True,
            timeout=600,
        ) as response:
            assert response.status_code == 200, response.text
            events, _ = _sse(response)  # asserts [DONE] came last
        assert len({e["id"] for e in events}) == 1
        return "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])

    with ThreadPoolExecutor(max_workers=len(stems)) as pool:
        texts = dict(zip(stems, pool.map(streamed, stems), strict=True))
    assert all(text.strip() for text in texts.values()), texts
    own = [stem for stem, text in texts.items() if stem in text.lower()]
    foreign = [
        (stem, other)
        for stem, text in texts.items()
        for other in stems
        if other != stem and other in text.lower()
    ]
    assert len(own) >= 6, texts  # a 135M model mostly stays on topic
    assert not foreign, texts
