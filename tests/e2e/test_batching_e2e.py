"""Continuous batching through the real HTTP server: 16 concurrent SSE streams on 8 parallel slots."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.e2e.conftest import TokentillServer, llama_available

pytestmark = pytest.mark.llama

TOPICS = [
    "apples", "boats", "clocks", "deserts", "eagles", "forests", "glaciers", "harbours",
    "islands", "jungles", "kites", "lanterns", "mountains", "nests", "oceans", "pianos",
]  # fmt: skip


@pytest.fixture(scope="module")
def batching_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokentillServer]:
    llama_available()
    workdir = tmp_path_factory.mktemp("batching")
    catalogue = workdir / "models.toml"
    catalogue.write_text(
        '[[models]]\nid = "plain"\nengine = "llamacpp"\ncontext = 1024\nreasoning = "none"\n'
    )
    # One thread: llama.cpp's worker threads spin at barriers, which collapses on a busy 2-core box.
    server = TokentillServer(
        Path(workdir),
        None,
        TOKENTILL_CONFIG=str(catalogue),
        TOKENTILL_MAX_PARALLEL="8",
        TOKENTILL_N_THREADS="1",
    ).start()
    yield server
    server.stop()


def _body(topic: str, stream: bool) -> dict[str, Any]:
    return {
        "model": "plain",
        "messages": [{"role": "user", "content": f"Write one sentence about {topic}."}],
        "max_completion_tokens": 40,
        "temperature": 0,
        "stream": stream,
    }


def test_sixteen_concurrent_streams_finish_with_their_own_text(batching_server: TokentillServer) -> None:
    key = batching_server.new_key("batch", credits="100")
    url = batching_server.url + "/v1/chat/completions"
    headers = {"Authorization": f"Bearer {key}"}

    def streamed(topic: str) -> str:
        with requests.post(url, headers=headers, json=_body(topic, True), stream=True, timeout=300) as r:
            assert r.status_code == 200, r.text
            lines = [line for line in r.iter_lines() if line.startswith(b"data: ")]
        assert lines[-1] == b"data: [DONE]"
        events = [json.loads(line[6:]) for line in lines[:-1]]
        assert len({e["id"] for e in events}) == 1  # one completion per stream, nothing from another
        return "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])

    with ThreadPoolExecutor(max_workers=len(TOPICS)) as pool:
        texts = dict(zip(TOPICS, pool.map(streamed, TOPICS), strict=True))
    assert all(texts.values())
    assert len(set(texts.values())) == len(TOPICS)
    for topic in TOPICS[::5]:  # greedy: the same text as the prompt gives alone
        alone = requests.post(url, headers=headers, json=_body(topic, False), timeout=300).json()
        assert texts[topic] == alone["choices"][0]["message"]["content"]
