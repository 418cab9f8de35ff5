"""Vision end to end: a real `tokentill serve` with SmolLM2 + the committed tiny projector, the openai SDK.

Network rule: every server here listens on 127.0.0.1; the "allowed image host" is a loopback server named
in TOKENTILL_MEDIA_ALLOW_HOSTS, the "forbidden" one is another loopback port that is not. Each test
server counts the TCP connections it accepted, so "refused without contacting it" is measured, not assumed.
The projector's weights are random: assertions are on status, usage, money and health, never on text.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from decimal import Decimal
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import openai
import pytest
import requests

from tests.e2e.conftest import TokentillServer, llama_available
from tests.media.helpers import LoopbackServer, Route, data_uri, encode, png_bytes, png_with_header

pytestmark = [pytest.mark.llama, pytest.mark.e2e]

MMPROJ = Path(__file__).resolve().parents[1] / "fixtures" / "tiny-mmproj.gguf"
MAX_BYTES = 200_000


class CountingServer(LoopbackServer):
    """A LoopbackServer that counts accepted connections (a refused fetch must add none).

    It listens on 127.0.0.1 and on [::1] at the same port, so a connection over either loopback family
    (IPv4-mapped IPv6 addresses reach the IPv4 listener) would be counted.
    """

    def __init__(self) -> None:
        for _ in range(20):
            super().__init__()
            try:
                handler = self.httpd.RequestHandlerClass
                self.httpd6: ThreadingHTTPServer = _IPv6Server(("::1", self.port), handler)
                break
            except OSError:  # the port is taken on ::1; try another
                self.httpd.server_close()
        else:
            raise RuntimeError("no port free on both 127.0.0.1 and ::1")
        self.connections = 0
        self.httpd6.daemon_threads = True
        for httpd in (self.httpd, self.httpd6):
            accept = httpd.get_request

            def counting_accept(accept: Any = accept) -> Any:
                self.connections += 1
                return accept()

            httpd.get_request = counting_accept  # type: ignore[method-assign]
        self.thread.start()
        self.thread6 = threading.Thread(target=self.httpd6.serve_forever, args=(0.05,), daemon=True)
        self.thread6.start()

    def close(self) -> None:
        for httpd in (self.httpd, self.httpd6):
            httpd.shutdown()
            httpd.server_close()


class _IPv6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


@pytest.fixture(scope="module")
def allowed() -> Iterator[CountingServer]:
    server = CountingServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def forbidden() -> Iterator[CountingServer]:
    server = CountingServer()
    server.routes["/cat.png"] = Route(200, {"Content-Type": "image/png"}, png_bytes())
    yield server
    server.close()


@pytest.fixture(scope="module")
def vision_server(
    module_dir: Path, allowed: CountingServer, forbidden: CountingServer
) -> Iterator[TokentillServer]:
    llama_available()
    config = module_dir / "vision.toml"
    entry = '[[models]]\nid = "{}"\nengine = "llamacpp"\nmmproj = "{}"\nreasoning = "{}"\ncontext = 2048\n'
    config.write_text(
        entry.format("o1-preview", MMPROJ, "none") + entry.format("o1-think", MMPROJ, "scratchpad"),
        encoding="utf-8",
    )
    server = TokentillServer(
        module_dir / "vision",
        None,
        TOKENTILL_CONFIG=str(config),
        TOKENTILL_MEDIA_ALLOW_HOSTS=f"127.0.0.1:{allowed.port}",
        TOKENTILL_MEDIA_MAX_BYTES=str(MAX_BYTES),
    ).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def key(vision_server: TokentillServer) -> str:
    return vision_server.new_key("viewer", credits="5")


def _client(server: TokentillServer, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


def _ask(server: TokentillServer, key: str, url: str, detail: str = "auto", model: str = "o1-preview") -> Any:
    return _client(server, key).chat.completions.create(
        model=model,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in this image?"},
                    {"type": "image_url", "image_url": {"url": url, "detail": detail}},
                ],
            }
        ],
        max_completion_tokens=8,
        temperature=0,
    )


def _refused(server: TokentillServer, key: str, url: str) -> dict[str, Any]:
    with pytest.raises(openai.BadRequestError) as caught:
        _ask(server, key, url)
    body = caught.value.body
    assert isinstance(body, dict)
    error: dict[str, Any] = body.get("error", body)
    assert error["param"] == "messages[0].content[1].image_url.url"
    return error


def _healthy(server: TokentillServer, key: str) -> None:
    assert requests.get(server.url + "/healthz", timeout=5).status_code == 200
    completion = _ask(server, key, data_uri(png_bytes()))
    assert completion.usage is not None and completion.usage.prompt_tokens_details is not None
    assert (completion.usage.prompt_tokens_details.image_tokens or 0) > 0


def test_data_uri_image_is_seen_and_billed(vision_server: TokentillServer, key: str) -> None:
    before = Decimal(vision_server.balance("viewer"))
    completion = _ask(vision_server, key, data_uri(png_bytes((64, 48))))
    assert completion.choices[0].finish_reason in {"stop", "length"}
    usage = completion.usage
    assert usage is not None and usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.image_tokens == 16
    assert usage.prompt_tokens > 16
    charged = before - Decimal(vision_server.balance("viewer"))
    assert charged == Decimal(usage.prompt_tokens * 15 + usage.completion_tokens * 60) / 1_000_000


def test_url_image_from_an_allowed_loopback_host(
    vision_server: TokentillServer, key: str, allowed: CountingServer
) -> None:
    allowed.routes["/photo.png"] = Route(200, {"Content-Type": "image/png"}, png_bytes((300, 200)))
    completion = _ask(vision_server, key, f"{allowed.origin}/photo.png")
    assert completion.usage is not None and completion.usage.prompt_tokens_details is not None
    assert completion.usage.prompt_tokens_details.image_tokens == 80  # sliced: overview + 2x2
    assert any(hit.path == "/photo.png" for hit in allowed.hits)


def test_detail_changes_prompt_tokens(vision_server: TokentillServer, key: str) -> None:
    big = data_uri(png_bytes((1024, 1024), color=(10, 120, 240)))
    low = _ask(vision_server, key, big, detail="low").usage
    high = _ask(vision_server, key, big, detail="high").usage
    assert low is not None and high is not None
    assert high.prompt_tokens > low.prompt_tokens
    assert low.prompt_tokens_details is not None and high.prompt_tokens_details is not None
    assert (low.prompt_tokens_details.image_tokens, high.prompt_tokens_details.image_tokens) == (80, 160)


def test_images_pass_through_both_scratchpad_passes(vision_server: TokentillServer, key: str) -> None:
    completion = _ask(vision_server, key, data_uri(png_bytes()), model="o1-think")
    usage = completion.usage
    assert usage is not None and usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.image_tokens == 16
    assert usage.completion_tokens <= 8


def test_redirect_to_a_host_that_is_not_allowed_is_refused_unvisited(
    vision_server: TokentillServer, key: str, allowed: CountingServer, forbidden: CountingServer
) -> None:
    allowed.routes["/hop"] = Route(302, {"Location": f"{forbidden.origin}/cat.png"})
    before = forbidden.connections
    error = _refused(vision_server, key, f"{allowed.origin}/hop")
    assert error["code"] == "invalid_image_url"
    assert forbidden.connections == before


@pytest.mark.parametrize(
    "spelling",
    ["http://2130706433:{port}/cat.png", "http://0x7f000001:{port}/cat.png", "http://127.1:{port}/cat.png",
     "http://127.0.0.1.:{port}/cat.png", "http://127.0.0.1:{port}/cat.png", "http://0.0.0.0:{port}/cat.png",
     "http://[::1]:{port}/cat.png", "http://[::ffff:127.0.0.1]:{port}/cat.png",
     "http://[::ffff:7f00:1]:{port}/cat.png", "http://localhost:{port}/cat.png"],
)  # fmt: skip
def test_loopback_spellings_are_refused_without_a_connection(
    vision_server: TokentillServer, key: str, forbidden: CountingServer, spelling: str
) -> None:
    """Refused by the address check itself (the message says so), and the target saw no connection."""
    before = forbidden.connections
    error = _refused(vision_server, key, spelling.format(port=forbidden.port))
    assert error["code"] == "invalid_image_url"
    assert error["message"].startswith("Image URL refused:"), error["message"]
    assert "loopback address" in error["message"] or "unspecified address" in error["message"]
    assert forbidden.connections == before


def test_the_counting_server_counts_both_loopback_families(forbidden: CountingServer) -> None:
    """The control for the test above: a connection over 127.0.0.1 or ::1 does add to the count."""
    before = forbidden.connections
    for host in ("127.0.0.1", "[::1]"):
        assert requests.get(f"http://{host}:{forbidden.port}/cat.png", timeout=5).status_code == 200
    assert forbidden.connections == before + 2


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "ftp://127.0.0.1/cat.png", "gopher://127.0.0.1:70/_cat"]
)
def test_other_schemes_are_refused(vision_server: TokentillServer, key: str, url: str) -> None:
    assert _refused(vision_server, key, url)["code"] == "invalid_image_url"


def _animated_gif() -> bytes:
    from PIL import Image

    frames = [Image.new("RGB", (16, 16), color) for color in ((255, 0, 0), (0, 255, 0))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


@pytest.mark.parametrize(
    "name", ["oversized", "animated", "corrupt", "bomb"], ids=["oversized", "animated", "corrupt", "bomb"]
)
def test_bad_images_are_400_and_the_server_stays_healthy(
    vision_server: TokentillServer, key: str, name: str
) -> None:
    import os

    bodies = {
        "oversized": (data_uri(os.urandom(MAX_BYTES + 10)), "image/png"),
        "animated": (data_uri(_animated_gif(), "image/gif"), "image/gif"),
        "corrupt": (data_uri(png_bytes()[:60]), "image/png"),
        "bomb": (data_uri(png_with_header(100_000, 100_000)), "image/png"),
    }
    url, _ = bodies[name]
    assert _refused(vision_server, key, url)["code"] == "invalid_image"
    _healthy(vision_server, key)


def test_the_text_only_default_refuses_images_through_the_sdk(sqlite_server: TokentillServer) -> None:
    """The built-in catalogue's o1-preview has no projector: 400 image_input_unsupported, naming mmproj."""
    client = _client(sqlite_server, sqlite_server.new_key("text-only", credits="1"))
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="o1-preview",
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is in this image?"},
                        {"type": "image_url", "image_url": {"url": data_uri(png_bytes())}},
                    ],
                }
            ],
            max_completion_tokens=8,
        )
    error = caught.value
    assert error.status_code == 400
    assert error.code == "image_input_unsupported"
    assert error.param == "messages[0].content[1]"
    assert "mmproj" in error.message and "docs/vision.md" in error.message
    assert requests.get(sqlite_server.url + "/healthz", timeout=5).status_code == 200


def test_streamed_image_request_with_scratchpad_reasoning(vision_server: TokentillServer, key: str) -> None:
    """An image through both scratchpad passes, streamed: [DONE] last, usage and the charge both ways."""
    before = Decimal(vision_server.balance("viewer"))
    body = {
        "model": "o1-think",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Describe this image."},
                    {"type": "image_url", "image_url": {"url": data_uri(png_bytes())}},
                ],
            }
        ],
        "max_completion_tokens": 96,
        "reasoning_effort": "low",
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    headers = {"Authorization": f"Bearer {key}"}
    with requests.post(
        vision_server.url + "/v1/chat/completions", json=body, headers=headers, stream=True, timeout=120
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines(decode_unicode=True) if line]
    lines = [line for line in lines if not line.startswith(":")]  # keep-alive comments
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert all("error" not in event for event in events), events[-1]
    finals = [e for e in events if e["choices"] and e["choices"][0].get("finish_reason")]
    assert len(finals) == 1 and finals[0]["choices"][0]["finish_reason"] in {"stop", "length"}
    usage = events[-1]["usage"]
    assert events[-1]["choices"] == []
    assert usage["prompt_tokens_details"]["image_tokens"] == 16
    assert usage["prompt_tokens"] > 16
    assert usage["completion_tokens_details"]["reasoning_tokens"] > 0
    assert usage["completion_tokens"] <= 96
    charged = before - Decimal(vision_server.balance("viewer"))
    assert charged == Decimal(usage["prompt_tokens"] * 15 + usage["completion_tokens"] * 60) / 1_000_000
    _healthy(vision_server, key)
