"""tokentill as a gateway in front of real OpenAI-compatible servers it did not start in-process.

Upstreams: (a) a second `tokentill serve` (embedded SmolLM2), behind a replica that dies after the
gateway saw it healthy, (b) llama-cpp-python's own `python -m llama_cpp.server` (a server nobody here
wrote), (c) dead ports, a wrong upstream key and a socket that accepts and never answers, (d) a scripted
server that streams forever (the gateway cuts it at the budget, and closes it when the client leaves) or
breaks off mid-stream (the delivered part is billed, marked estimated).
The gateway bills its own account at its own prices from the upstream's usage; failures charge nothing.
Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest
import requests

from tests._services import require
from tests.e2e.conftest import TokentillServer, free_port, llama_available
from tests.engines.upstream_servers import ScriptedUpstream, SilentServer

pytestmark = [pytest.mark.e2e, pytest.mark.llama]

PRICE_IN, PRICE_OUT = 100, 200
REPO = Path(__file__).resolve().parents[2]


def _toml_value(value: Any) -> str:
    return json.dumps(value)  # TOML basic strings, numbers and arrays of them read like JSON


def start_gateway(workdir: Path, models: list[dict[str, Any]], **env: str) -> TokentillServer:
    """`tokentill serve` with a catalogue of `models` (tables of scalar / list values)."""
    workdir.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    for model in models:
        lines.append("[[models]]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in model.items()]
    config = workdir / "catalogue.toml"
    config.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return TokentillServer(workdir, None, TOKENTILL_CONFIG=str(config), **env).start()


def _usage_rows(server: TokentillServer, account: str) -> list[dict[str, Any]]:
    return list(server.cli_json("usage", "--account", account, "--limit", "1000")["usage"])


def _estimated(server: TokentillServer) -> list[bool]:
    """The usage rows' `estimated` flags, read from the server's SQLite file (the CLI does not show them)."""
    with contextlib.closing(sqlite3.connect(server.workdir / "data" / "tokentill.db")) as db:
        return [bool(row[0]) for row in db.execute("SELECT estimated FROM usage ORDER BY created_at")]


def _cost(prompt: int, completion: int) -> Decimal:
    return Decimal(prompt * PRICE_IN + completion * PRICE_OUT) / 1_000_000


@pytest.fixture(scope="module")
def tokentill_a(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokentillServer]:
    llama_available()
    server = TokentillServer(tmp_path_factory.mktemp("upstream-a"), None).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gateway_key_on_a(tokentill_a: TokentillServer) -> str:
    return tokentill_a.new_key("gateway", credits="100")


def _fronted(base_url: list[str] | str, **fields: Any) -> dict[str, Any]:
    return {
        "id": "fronted",
        "engine": "upstream",
        "base_url": base_url,
        "price_input": PRICE_IN,
        "price_output": PRICE_OUT,
        **fields,
    }


@contextlib.contextmanager
def scripted_replica() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A `ScriptedUpstream` in its own process (so the test can kill it): its `ok` base_url and process."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tests.engines.upstream_servers", str(port)], cwd=REPO)
    url = f"http://127.0.0.1:{port}/ok/v1"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, "scripted replica did not start"
            try:
                if requests.get(url + "/models", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(0.1)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def test_second_tokentill_as_upstream(
    tokentill_a: TokentillServer, gateway_key_on_a: str, tmp_path: Path
) -> None:
    with scripted_replica() as (dying_url, dying):
        _second_tokentill_as_upstream(tokentill_a, gateway_key_on_a, tmp_path, dying_url, dying)


def _second_tokentill_as_upstream(
    tokentill_a: TokentillServer,
    gateway_key_on_a: str,
    tmp_path: Path,
    dying_url: str,
    dying: subprocess.Popen[bytes],
) -> None:
    # The same id as A's embedded model: clients of either cannot tell which engine answers.
    model = _fronted(
        [dying_url, tokentill_a.url + "/v1"],
        api_key=gateway_key_on_a,
        upstream_model="o1-preview",
        reasoning="native",  # the upstream reasons itself; we forward reasoning_effort
        context=8192,
    ) | {"id": "o1-preview"}
    gateway = start_gateway(tmp_path / "b", [model])
    try:
        key = gateway.new_key("client", credits="10")
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)
        # The first replica passed the gateway's start-up health check; it dies now, so the first request
        # meets a real connection error there and must move to the live replica.
        assert "is down" not in gateway.log()
        dying.kill()
        dying.wait(timeout=10)
        messages: Any = [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name a colour."},
        ]
        options: Any = {"max_completion_tokens": 128, "reasoning_effort": "low", "temperature": 0}

        plain = client.chat.completions.create(model="o1-preview", messages=messages, **options)
        assert plain.model == "o1-preview"
        assert plain.choices[0].message.content
        usage = plain.usage
        assert usage is not None and usage.prompt_tokens > 0 and usage.completion_tokens > 0
        assert usage.completion_tokens_details is not None
        assert usage.completion_tokens_details.reasoning_tokens  # A's scratchpad, reported through

        chunks = list(
            client.chat.completions.create(
                model="o1-preview",
                messages=messages,
                stream=True,
                stream_options={"include_usage": True},
                **options,
            )
        )
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed
        stream_usage = chunks[-1].usage
        assert stream_usage is not None and stream_usage.completion_tokens > 0

        # B billed its own prices on A's usage, to the micro-credit; A billed B's key the same tokens.
        rows = _usage_rows(gateway, "client")
        assert len(rows) == 2 and all(r["status"] == 200 for r in rows)
        assert _estimated(gateway) == [False, False]
        charged = sum((Decimal(r["cost"]) for r in rows), Decimal(0))
        expected = _cost(usage.prompt_tokens, usage.completion_tokens) + _cost(
            stream_usage.prompt_tokens, stream_usage.completion_tokens
        )
        assert charged == expected
        assert Decimal(gateway.balance("client")) == Decimal(10) - expected
        upstream_rows = _usage_rows(tokentill_a, "gateway")
        assert sorted(r["prompt_tokens"] for r in upstream_rows[-2:]) == sorted(
            [usage.prompt_tokens, stream_usage.prompt_tokens]
        )
        # Marked down by the request itself ("is down: health check: …" would be the background check).
        down = re.search(re.escape(dying_url) + r" for model o1-preview is down: (.*)", gateway.log())
        assert down is not None and not down.group(1).startswith("health check"), gateway.log()
    finally:
        gateway.stop()


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    llama_available()
    try:
        import sse_starlette  # noqa: F401
        import starlette_context  # noqa: F401
    except ImportError as exc:
        require("llama-cpp-python[server]", f"the server extra is missing: {exc}")
    from tokentill.catalog import default_weights_path

    port = free_port()
    log_path = tmp_path_factory.mktemp("llama-server") / "server.log"
    command = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(default_weights_path()),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        "2048",
        "--n_threads",
        "2",
    ]
    with log_path.open("ab") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log_path.read_text(errors="replace")[-4000:]
            assert time.monotonic() < deadline, "llama_cpp.server did not come up"
            try:
                if requests.get(url + "/models", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def test_llama_cpp_server_as_upstream(llama_server: str, tmp_path: Path) -> None:
    gateway = start_gateway(tmp_path / "b", [_fronted(llama_server, upstream_model="smollm2", context=2048)])
    try:
        key = gateway.new_key("client", credits="10")
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)
        messages: Any = [{"role": "user", "content": "What is the capital of France?"}]
        plain = client.chat.completions.create(
            model="fronted", messages=messages, max_completion_tokens=24, temperature=0
        )
        assert plain.choices[0].message.content
        assert plain.usage is not None and 0 < plain.usage.completion_tokens <= 24
        chunks = list(
            client.chat.completions.create(
                model="fronted",
                messages=messages,
                max_completion_tokens=24,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        stream_usage = chunks[-1].usage
        assert stream_usage is not None and 0 < stream_usage.completion_tokens <= 24
        # llama-cpp-python's server streams no usage: counted by the gateway and marked estimated
        rows = _usage_rows(gateway, "client")
        assert len(rows) == 2 and all(r["status"] == 200 for r in rows)
        assert _estimated(gateway) == [True, True]
        expected = _cost(plain.usage.prompt_tokens, plain.usage.completion_tokens) + _cost(
            stream_usage.prompt_tokens, stream_usage.completion_tokens
        )
        assert sum((Decimal(r["cost"]) for r in rows), Decimal(0)) == expected
        assert Decimal(gateway.balance("client")) == Decimal(10) - expected
    finally:
        gateway.stop()


def test_failures_charge_nothing(tokentill_a: TokentillServer, tmp_path: Path) -> None:
    silent = SilentServer()
    dead = [f"http://127.0.0.1:{free_port()}/v1", f"http://127.0.0.1:{free_port()}/v1"]
    wrong_key = "tt-AAAAAAAA-" + "B" * 43
    models = [
        {**_fronted(dead), "id": "all-down"},
        {
            **_fronted(tokentill_a.url + "/v1", api_key=wrong_key, upstream_model="o1-preview"),
            "id": "bad-key",
        },
        {**_fronted(silent.url + "/v1", timeout_s=2), "id": "silent"},
    ]
    gateway = start_gateway(tmp_path / "b", models)
    try:
        key = gateway.new_key("client", credits="10")
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)
        messages: Any = [{"role": "user", "content": "Hi"}]
        for model, status in [("all-down", 502), ("bad-key", 502), ("silent", 504)]:
            started = time.monotonic()
            with pytest.raises(openai.APIStatusError) as raised:
                client.chat.completions.create(model=model, messages=messages, max_completion_tokens=8)
            assert raised.value.status_code == status, (model, raised.value.body)
            error = raised.value.body
            assert isinstance(error, dict)
            assert error["code"] == ("timeout" if status == 504 else "upstream_error")
            assert wrong_key not in json.dumps(error)
            if model == "silent":
                assert time.monotonic() - started < 2 + 3  # bounded by timeout_s
        assert Decimal(gateway.balance("client")) == Decimal(10)
        rows = _usage_rows(gateway, "client")
        assert sorted(r["status"] for r in rows) == [502, 502, 504]
        assert [Decimal(r["cost"]) for r in rows] == [0, 0, 0]
        assert "refused our credentials" in gateway.log() and wrong_key not in gateway.log()
    finally:
        gateway.stop()
        silent.close()


def test_a_hold_refused_after_the_upstream_was_asked_leaves_nothing_behind(
    scripted: ScriptedUpstream, tmp_path: Path
) -> None:
    """The gateway sends the upstream request while the hold commits once it knows the balance covers it
    (docs/decisions.md "Hot path"). When the balance was spent elsewhere meanwhile, the hold is refused:
    the client gets its 402, nothing is charged, and the upstream request is closed before the answer,
    which `TOKENTILL_QUEUE_SIZE=1` makes visible: a request left open would keep the only slot (503)."""
    gateway = start_gateway(tmp_path / "b", [_fronted(scripted.url + "/ok/v1")], TOKENTILL_QUEUE_SIZE="1")
    try:
        key = gateway.new_key("client", credits="10")
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)
        messages: Any = [{"role": "user", "content": "Hi"}]
        ask = {"model": "fronted", "messages": messages, "max_completion_tokens": 8}
        assert client.chat.completions.create(**ask).choices[0].message.content  # the balance is known now
        spent = Decimal(gateway.balance("client")) - Decimal("0.001")
        gateway.cli("credits", "debit", "client", str(spent), "--note", "spent on another replica")
        asked = len(scripted.seen)
        for _ in range(3):  # each refused; the first after the upstream may have been asked already
            with pytest.raises(openai.APIStatusError) as raised:
                client.chat.completions.create(**{**ask, "max_completion_tokens": 1000})
            assert raised.value.status_code == 402, raised.value.body
            assert isinstance(raised.value.body, dict) and raised.value.body["code"] == "insufficient_credits"
        assert len(scripted.seen) - asked <= 1  # a refused hold forgets the balance: no more early asks
        assert Decimal(gateway.balance("client")) == Decimal("0.001")
        (first,) = _usage_rows(gateway, "client")
        assert first["status"] == 200
        gateway.cli("credits", "add", "client", "10")
        assert client.chat.completions.create(**ask).choices[0].message.content  # the slot is free
        (last,) = [r for r in _usage_rows(gateway, "client") if r != first]
        assert last["status"] == 200
        assert Decimal(gateway.balance("client")) == Decimal("10.001") - Decimal(last["cost"])
    finally:
        gateway.stop()


def test_endless_upstream_is_cut_at_the_budget_and_closed_when_the_client_leaves(
    scripted: ScriptedUpstream, tmp_path: Path
) -> None:
    gateway = start_gateway(tmp_path / "b", [_fronted(scripted.url + "/endless/v1", context=4096)])
    try:
        key = gateway.new_key("client", credits="10")
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)
        messages: Any = [{"role": "user", "content": "Count forever."}]

        # An upstream that ignores max_tokens: the gateway stops at the budget and bills exactly it.
        scripted.closed.clear()
        chunks = list(
            client.chat.completions.create(
                model="fronted",
                messages=messages,
                max_completion_tokens=6,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "x" * 6
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        usage = chunks[-1].usage
        assert usage is not None and usage.completion_tokens == 6
        assert scripted.closed.wait(5), "the gateway kept reading the upstream past the budget"
        rows = _usage_rows(gateway, "client")
        assert len(rows) == 1 and rows[0]["status"] == 200 and rows[0]["completion_tokens"] == 6
        assert Decimal(rows[0]["cost"]) == _cost(usage.prompt_tokens, 6)
        assert _estimated(gateway) == [True]

        # A client that leaves mid-stream: the gateway closes its upstream request promptly.
        scripted.closed.clear()
        with requests.post(
            gateway.url + "/v1/chat/completions",
            headers={"Authorization": f"Bearer {key}"},
            json={"model": "fronted", "messages": messages, "max_completion_tokens": 2000, "stream": True},
            stream=True,
            timeout=30,
        ) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            seen = 0
            while seen < 5:
                seen += next(lines).startswith(b"data: ")
        assert scripted.closed.wait(5), "the upstream kept streaming after the client left"
        deadline = time.monotonic() + 10
        while len(rows := _usage_rows(gateway, "client")) < 2:
            assert time.monotonic() < deadline, "the abandoned request was never settled"
            time.sleep(0.2)
        left = next(r for r in rows if r["status"] != 200)
        assert left["status"] == 499 and left["completion_tokens"] >= 4
    finally:
        gateway.stop()


def test_upstream_breaking_mid_stream_bills_what_was_delivered_as_estimated(
    scripted: ScriptedUpstream, tmp_path: Path
) -> None:
    # `truncated`: one content delta ("half"), then the upstream closes without finishing.
    gateway = start_gateway(tmp_path / "b", [_fronted(scripted.url + "/truncated/v1", context=4096)])
    try:
        key = gateway.new_key("client", credits="10")
        with requests.post(
            gateway.url + "/v1/chat/completions",
            headers={"Authorization": f"Bearer {key}"},
            json={
                "model": "fronted",
                "messages": [{"role": "user", "content": "Hi"}],
                "max_completion_tokens": 50,
                "stream": True,
            },
            stream=True,
            timeout=30,
        ) as response:
            assert response.status_code == 200  # the stream had started: the failure is an event
            events = [
                json.loads(line.removeprefix(b"data: "))
                for line in response.iter_lines()
                if line.startswith(b"data: ") and line != b"data: [DONE]"
            ]
        text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e.get("choices"))
        assert text == "half"
        assert events[-1]["error"]["code"] == "upstream_error"
        rows = _usage_rows(gateway, "client")
        assert len(rows) == 1 and rows[0]["status"] == 502 and rows[0]["completion_tokens"] == 1
        # the client got one delta and pays for it; the prompt is our (high) estimate, so the row says so
        assert Decimal(rows[0]["cost"]) == _cost(rows[0]["prompt_tokens"], 1)
        assert _estimated(gateway) == [True]
        assert Decimal(gateway.balance("client")) == Decimal(10) - _cost(rows[0]["prompt_tokens"], 1)
    finally:
        gateway.stop()


def test_an_upstream_echoing_our_key_leaks_it_neither_to_clients_nor_to_the_log(
    scripted: ScriptedUpstream, tmp_path: Path
) -> None:
    """Issue 15.7: an upstream that quotes our Authorization header back, in a 400 message (relayed to
    the client) and in a 500 body (logged by the gateway)."""
    upstream_key = "sk-e2e-upstream-key-9f8e7d6c5b4a"
    models = [
        _fronted(scripted.url + "/echo-400/v1", api_key=upstream_key),
        {**_fronted(scripted.url + "/echo-500/v1", api_key=upstream_key), "id": "fronted-500"},
    ]
    gateway = start_gateway(tmp_path / "g", models, TOKENTILL_ADMIN_KEY="admin-e2e-secret-0123456789")
    try:
        key = gateway.new_key("client", credits="10")
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)
        messages: Any = [{"role": "user", "content": "Hi"}]
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="fronted", messages=messages, max_completion_tokens=5)
        message = refused.value.response.json()["error"]["message"]
        assert "[redacted]" in message and upstream_key not in message, message
        with pytest.raises(openai.InternalServerError) as failed:
            client.chat.completions.create(model="fronted-500", messages=messages, max_completion_tokens=5)
        assert failed.value.status_code == 502
        assert scripted.seen[-1]["headers"]["authorization"] == f"Bearer {upstream_key}"
        log = gateway.log_path.read_text(errors="replace")
        assert "upstream crashed handling" in log and "[redacted]" in log, log[-3000:]
        assert upstream_key not in log and upstream_key[:12] not in log
        assert "admin-e2e-secret" not in log
    finally:
        gateway.stop()
