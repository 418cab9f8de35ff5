"""`EventStreamResponse` driven as an ASGI app: keep-alives, hidden reasoning, errors and disconnects."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from typing import Any

import anyio
import pytest

from tokentill import errors
from tokentill.api.sse import KEEPALIVE, EventStreamResponse, KeepAlive
from tokentill.types import EngineEvent, Finished, TextDelta, Usage

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _silent_then_hidden(closed: list[bool]) -> AsyncGenerator[EngineEvent, None]:
    """Silent for 0.2 s (the model thinking), then 0.2 s of hidden reasoning, then a short answer."""
    try:
        await anyio.sleep(0.2)
        for i in range(20):
            yield TextDelta(f"secret{i} ", reasoning=True)
            await anyio.sleep(0.01)
        yield TextDelta("", tokens=1)  # a token with no text yet: sends nothing
        yield TextDelta("answer")
        yield Finished("stop", Usage(prompt_tokens=3, completion_tokens=22, reasoning_tokens=20))
    finally:
        closed.append(True)


async def _serve(
    response: EventStreamResponse, *, disconnect_after: float | None = None
) -> tuple[bytes, list[str]]:
    """Run the response as Starlette would under uvicorn (ASGI 2.3) and return the body and lines."""
    body = b""
    hang_up = anyio.Event()

    async def receive() -> dict[str, Any]:
        if disconnect_after is None:
            await anyio.Event().wait()  # the client stays; only the response's own cancel ends this
        else:
            await anyio.sleep(disconnect_after)
            hang_up.set()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal body
        if message["type"] == "http.response.body":
            body += message.get("body", b"")

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}}
    await response(scope, receive, send)
    return body, body.decode().split("\n\n")


def _response(events: AsyncGenerator[EngineEvent, None], **kw: Any) -> EventStreamResponse:
    return EventStreamResponse(
        events,
        completion_id="chatcmpl-test",
        created=1,
        model="o1-preview",
        include_usage=kw.pop("include_usage", True),
        include_reasoning=kw.pop("include_reasoning", False),
        keepalive_s=kw.pop("keepalive_s", 0.05),
    )


async def test_keep_alives_while_silent_and_while_reasoning_is_hidden() -> None:
    closed: list[bool] = []
    body, frames = await _serve(_response(_silent_then_hidden(closed)))
    keepalives = [f for f in frames if f == KEEPALIVE.decode().strip("\n")]
    assert len(keepalives) >= 4  # ~4 during the silence, ~4 during the hidden reasoning
    assert b"secret" not in body and b"reasoning_content" not in body
    data = [json.loads(f[len("data: ") :]) for f in frames if f.startswith("data: {")]
    contents = [c["choices"][0]["delta"].get("content") for c in data if c["choices"]]
    assert contents[0] == "" and "answer" in contents
    assert "" not in contents[1:]  # the empty delta sent nothing
    assert data[-1]["choices"] == [] and data[-1]["usage"]["completion_tokens"] == 22
    assert frames[-2] == "data: [DONE]" and frames[-1] == ""
    assert closed == [True]


async def test_reasoning_shown_when_asked() -> None:
    closed: list[bool] = []
    body, _ = await _serve(_response(_silent_then_hidden(closed), include_reasoning=True, keepalive_s=5))
    assert body.count(b'"reasoning_content":"secret') == 20
    assert KEEPALIVE not in body


async def test_error_after_the_first_byte_is_one_event_then_the_end() -> None:
    async def failing() -> AsyncGenerator[EngineEvent, None]:
        yield TextDelta("partial")
        raise errors.UpstreamError("The model failed to generate a response.")

    body, frames = await _serve(_response(failing()))
    assert b"[DONE]" not in body
    last = json.loads(frames[-2][len("data: ") :])
    assert last["error"]["code"] == "upstream_error"


async def test_a_bug_is_a_generic_internal_error() -> None:
    async def buggy() -> AsyncGenerator[EngineEvent, None]:
        yield TextDelta("partial")
        raise KeyError("internal detail")

    body, frames = await _serve(_response(buggy()))
    assert b"internal detail" not in body and b"[DONE]" not in body
    assert json.loads(frames[-2][len("data: ") :])["error"]["code"] == "internal_error"


async def test_disconnect_cancels_the_events_and_closes_them() -> None:
    """The events wait for the engine (as they do between tokens) when the client leaves: cancelled there."""
    closed: list[bool] = []
    cancelled: list[bool] = []

    async def waiting() -> AsyncGenerator[EngineEvent, None]:
        try:
            yield TextDelta("x", reasoning=True)
            await anyio.sleep_forever()  # the engine computing the next token
        except anyio.get_cancelled_exc_class():
            cancelled.append(True)
            raise
        finally:
            closed.append(True)

    with anyio.fail_after(5):
        body, _ = await _serve(_response(waiting()), disconnect_after=0.2)
    assert closed == [True] and cancelled == [True]
    assert b"[DONE]" not in body and KEEPALIVE in body


async def test_disconnect_closes_events_that_keep_coming() -> None:
    """Events produced without pause: the pump is cancelled inside them or between two of them (then
    `aclose()` ends them at their `yield`); either way they end at once, exactly once."""
    ended: list[type[BaseException]] = []

    async def endless() -> AsyncGenerator[EngineEvent, None]:
        try:
            while True:
                yield TextDelta("x", reasoning=True)
                await anyio.sleep(0.01)
        except BaseException as exc:
            ended.append(type(exc))
            raise

    with anyio.fail_after(5):
        body, _ = await _serve(_response(endless()), disconnect_after=0.2)
    assert len(ended) == 1 and ended[0] in {anyio.get_cancelled_exc_class(), GeneratorExit}, ended
    assert b"[DONE]" not in body and KEEPALIVE in body


async def _bodies(response: EventStreamResponse, sent: list[bytes]) -> None:
    """Serve `response`, appending each body message to `sent` as it is sent."""

    async def receive() -> dict[str, Any]:
        await anyio.Event().wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            sent.append(message.get("body", b""))

    await response({"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}}, receive, send)


async def test_events_ready_together_go_out_in_one_write() -> None:
    """Ten deltas, the finish and the usage produced without a pause (one upstream read): one body message
    carries them all and the end of the stream, not one message per chunk."""

    async def burst() -> AsyncGenerator[EngineEvent, None]:
        for i in range(10):
            yield TextDelta(f"t{i} ")
        yield Finished("stop", Usage(prompt_tokens=3, completion_tokens=10))

    sent: list[bytes] = []
    with anyio.fail_after(5):
        await _bodies(_response(burst()), sent)
    body = b"".join(sent)
    assert body.count(b'"content":"t') == 10 and body.endswith(b"data: [DONE]\n\n")
    # The role chunk may go out alone (it is rendered before the first event arrives); the rest is one.
    assert len(sent) <= 2, [chunk[:60] for chunk in sent]
    assert sent[-1].count(b'"content":"t') == 10 and b'"usage"' in sent[-1]


async def test_a_ready_chunk_is_never_held_back_for_the_next() -> None:
    """Each delta must reach the client while the engine is still computing the next: the engine here
    waits until the client has seen the previous one, so holding a chunk back would never end."""
    seen = [anyio.Event() for _ in range(3)]
    sent: list[bytes] = []

    async def paced() -> AsyncGenerator[EngineEvent, None]:
        for i in range(3):
            yield TextDelta(f"word{i}")
            await seen[i].wait()
        yield Finished("stop", Usage(prompt_tokens=3, completion_tokens=3))

    async def watch() -> None:
        for i in range(3):
            while f"word{i}".encode() not in b"".join(sent):
                await anyio.sleep(0.001)
            seen[i].set()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            await _bodies(_response(paced()), sent)
    assert b"".join(sent).endswith(b"data: [DONE]\n\n")


async def test_a_chunk_followed_by_an_invisible_item_is_not_held_back() -> None:
    """A visible delta and, ready with it, one that shows nothing (a token that completes no character,
    hidden reasoning): the visible one must go out before the engine makes anything more. The engine
    waits until the client has seen it, so holding it back until the next visible chunk (or a keep-alive)
    would never end. keepalive_s is far longer than the test: no tick can release it either."""
    seen = anyio.Event()
    sent: list[bytes] = []

    async def split_character() -> AsyncGenerator[EngineEvent, None]:
        yield TextDelta("visible")
        yield TextDelta("", tokens=1)
        yield TextDelta("secret", reasoning=True)
        await seen.wait()
        yield Finished("stop", Usage(prompt_tokens=3, completion_tokens=3))

    async def watch() -> None:
        while b"visible" not in b"".join(sent):
            await anyio.sleep(0.001)
        seen.set()

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            await _bodies(_response(split_character(), keepalive_s=3600), sent)
    body = b"".join(sent)
    assert body.endswith(b"data: [DONE]\n\n") and b"secret" not in body and KEEPALIVE not in body


def test_a_keep_alive_every_second_quiet_tick() -> None:
    """Ticks come every keepalive_s / 2: a keep-alive when a whole tick went by without output, and the
    keep-alive counts as output. So silence gets one every keepalive_s, and any output restarts it."""
    alive = KeepAlive()
    assert [alive.tick() for _ in range(5)] == [b"", KEEPALIVE, b"", KEEPALIVE, b""]
    alive.sent()
    assert [alive.tick() for _ in range(2)] == [b"", KEEPALIVE]
    alive.tick()
    alive.sent()  # output between a quiet tick and the next: no keep-alive at that next tick
    assert alive.tick() == b""
