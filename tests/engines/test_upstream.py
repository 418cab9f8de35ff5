"""The upstream engine against real HTTP servers on 127.0.0.1 (see `upstream_servers.py`)."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from tests._services import run
from tests.engines.upstream_servers import ScriptedUpstream, SilentServer, free_port
from tokentill import errors
from tokentill.catalog import CatalogError, ModelSpec
from tokentill.engines import create_engine
from tokentill.engines.base import Engine, EngineRequest
from tokentill.engines.reasoning import with_reasoning
from tokentill.engines.upstream import UpstreamEngine
from tokentill.engines.upstream_sse import MAX_EVENT, EventSplitter, sse_events
from tokentill.engines.upstream_wire import BadAnswer, Piece, coalesce
from tokentill.types import Finished, ImageInput, Message, TextDelta, ToolCallDelta, Usage


@pytest.fixture(scope="module")
def upstream() -> Iterator[ScriptedUpstream]:
    server = ScriptedUpstream().start()
    yield server
    server.stop()


def _spec(base_url: str | list[str], **fields: Any) -> ModelSpec:
    return ModelSpec(id="fronted", engine="upstream", base_url=base_url, **fields)


def _request(text: str = "Say hello", **fields: Any) -> EngineRequest:
    values: dict[str, Any] = {
        "request_id": "req-1",
        "messages": (Message("system", "be brief"), Message("user", text)),
        "max_tokens": 50,
        "deadline": time.monotonic() + 30,
    }
    values.update(fields)
    return EngineRequest(**values)


async def _collect(engine: Engine, request: EngineRequest) -> tuple[list[TextDelta], Finished]:
    deltas: list[TextDelta] = []
    finished: Finished | None = None
    async for event in engine.generate(request):
        if isinstance(event, TextDelta):
            deltas.append(event)
        else:
            finished = event
    assert finished is not None
    return deltas, finished


def _complete(spec: ModelSpec, request: EngineRequest | None = None, *, mode: str = "none") -> Any:
    async def main() -> tuple[list[TextDelta], Finished]:
        engine = UpstreamEngine(spec, queue_size=4)
        await engine.start()
        try:
            return await _collect(with_reasoning(engine, mode), request or _request())
        finally:
            await engine.aclose()

    return run(main())


def _text(deltas: list[TextDelta], reasoning: bool = False) -> str:
    return "".join(d.text for d in deltas if d.reasoning == reasoning)


def test_factory_builds_it_and_capabilities_say_estimates(upstream: ScriptedUpstream) -> None:
    engine = create_engine(
        _spec(upstream.url + "/ok/v1", vision=True, context=4096), queue_size=2, n_threads=None
    )
    assert isinstance(engine, UpstreamEngine)
    caps = engine.capabilities
    assert (caps.context_length, caps.vision, caps.exact_prompt_tokens) == (4096, True, False)
    # bytes/3 rounded up + 8 per message + 48 per request + 1000 per image
    image = ImageInput(data=b"\x89PNG", mime="image/png", width=1, height=1)
    request = _request("x" * 30, messages=(Message("user", "x" * 30, images=(image,)),))
    assert engine.count_prompt_tokens(request) == 10 + 8 + 48 + 1000


def test_stream_with_usage_and_rebuilt_payload(upstream: ScriptedUpstream) -> None:
    spec = _spec(
        upstream.url + "/ok/v1", upstream_model="served-name", api_key="sk-test", headers={"x-a": "b"}
    )
    deltas, finished = _complete(spec, _request(seed=7, stop=("END",), temperature=0.2))
    assert _text(deltas) == "Hello world"
    assert all(d.tokens == 1 for d in deltas)
    assert finished.finish_reason == "stop"
    assert finished.usage == Usage(
        prompt_tokens=11, completion_tokens=7, cached_tokens=2, reasoning_tokens=3, estimated=False
    )
    seen = upstream.seen[-1]
    assert seen["headers"]["authorization"] == "Bearer sk-test"
    assert seen["headers"]["x-a"] == "b"
    assert seen["body"] == {
        "model": "served-name",
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Say hello"}],
        "max_tokens": 50,
        "max_completion_tokens": 50,
        "temperature": 0.2,
        "top_p": 1.0,
        "seed": 7,
        "stop": ["END"],
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def test_images_go_as_data_uris_in_their_place(upstream: ScriptedUpstream) -> None:
    first = ImageInput(data=b"\x89PNG\r\n", mime="image/png", width=1, height=1, detail="low")
    second = ImageInput(data=b"GIF89a", mime="image/gif", width=1, height=1)
    # The client sent [image, "compare", image, "which is bigger?"]: the text offsets say where each sat.
    message = Message("user", "comparewhich is bigger?", images=(first, second), image_offsets=(0, 7))
    _complete(_spec(upstream.url + "/ok/v1", vision=True), _request(messages=(message,)))
    content = upstream.seen[-1]["body"]["messages"][0]["content"]

    def part(image: ImageInput) -> dict[str, Any]:
        uri = f"data:{image.mime};base64," + base64.b64encode(image.data).decode()
        return {"type": "image_url", "image_url": {"url": uri, "detail": image.detail}}

    assert content == [
        part(first),
        {"type": "text", "text": "compare"},
        part(second),
        {"type": "text", "text": "which is bigger?"},
    ]


def test_crlf_framing(upstream: ScriptedUpstream) -> None:
    deltas, _ = _complete(_spec(upstream.url + "/crlf/v1"))
    assert _text(deltas) == "Hello world"


def test_missing_usage_is_counted_and_marked_estimated(upstream: ScriptedUpstream) -> None:
    request = _request()
    deltas, finished = _complete(_spec(upstream.url + "/nousage/v1"), request)
    assert _text(deltas) == "one two three"
    expected_prompt = UpstreamEngine(_spec(upstream.url)).count_prompt_tokens(request)
    assert finished.usage == Usage(prompt_tokens=expected_prompt, completion_tokens=3, estimated=True)


def test_reasoning_fields_become_reasoning_deltas(upstream: ScriptedUpstream) -> None:
    deltas, finished = _complete(_spec(upstream.url + "/reasoning/v1", reasoning="native"), mode="native")
    assert _text(deltas, reasoning=True) == "Let me think. Done."
    assert _text(deltas) == "42"
    assert finished.finish_reason == "length"
    assert finished.usage.reasoning_tokens == 3  # not reported: counted from the reasoning deltas
    assert (finished.usage.prompt_tokens, finished.usage.completion_tokens) == (5, 4)
    assert upstream.seen[-1]["body"]["reasoning_effort"] == "medium"


def test_reasoning_effort_goes_only_to_native_reasoning_models(upstream: ScriptedUpstream) -> None:
    # A scratchpad entry runs its own passes, often in front of a model that refuses the parameter.
    for mode in ("scratchpad", "none"):
        _complete(_spec(upstream.url + "/ok/v1", reasoning=mode), _request(reasoning_effort="high"))
        assert "reasoning_effort" not in upstream.seen[-1]["body"], mode
    _complete(_spec(upstream.url + "/ok/v1", reasoning="native"), _request(reasoning_effort="high"))
    assert upstream.seen[-1]["body"]["reasoning_effort"] == "high"


def test_usage_missing_a_count_gets_ours_and_is_estimated(upstream: ScriptedUpstream) -> None:
    request = _request()
    _, finished = _complete(_spec(upstream.url + "/usage-partial/v1"), request)
    expected_prompt = UpstreamEngine(_spec(upstream.url)).count_prompt_tokens(request)
    assert finished.usage == Usage(prompt_tokens=expected_prompt, completion_tokens=1, estimated=True)


def test_think_tags_split_across_chunks(upstream: ScriptedUpstream) -> None:
    deltas, finished = _complete(_spec(upstream.url + "/think/v1", reasoning="native"), mode="native")
    assert _text(deltas, reasoning=True) == "planning"
    assert _text(deltas) == "Answer"
    assert sum(d.tokens for d in deltas) == 5
    assert finished.usage.completion_tokens == 5 and finished.usage.estimated


def test_non_streamed_json_answer(upstream: ScriptedUpstream) -> None:
    deltas, finished = _complete(_spec(upstream.url + "/json/v1"))
    assert _text(deltas) == "fixed answer"
    assert finished.usage.prompt_tokens == 11 and not finished.usage.estimated


def test_max_tokens_refused_then_dropped(upstream: ScriptedUpstream) -> None:
    deltas, _ = _complete(_spec(upstream.url + "/legacy/v1"))
    assert _text(deltas) == "modern"
    first, second = upstream.seen[-2:]
    assert "max_tokens" in first["body"] and "max_tokens" not in second["body"]
    assert second["body"]["max_completion_tokens"] == 50


@pytest.mark.parametrize(
    ("script", "error", "code", "param"),
    [
        ("unauthorized", errors.UpstreamError, "upstream_error", None),
        ("toolong", errors.InvalidRequest, "context_length_exceeded", "messages"),
        ("plain400", errors.InvalidRequest, "invalid_value", None),
        ("busy", errors.Overloaded, "overloaded", None),
        ("busy-nan", errors.Overloaded, "overloaded", None),
        ("broken", errors.UpstreamError, "upstream_error", None),
        ("garbage", errors.UpstreamError, "upstream_error", None),
        ("truncated", errors.UpstreamError, "upstream_error", None),
        ("nowhere", errors.UpstreamError, "upstream_error", None),  # 404: wrong base_url
        ("usage-null", errors.UpstreamError, "upstream_error", None),
        ("usage-negative", errors.UpstreamError, "upstream_error", None),
        ("usage-float", errors.UpstreamError, "upstream_error", None),
        ("badgzip", errors.UpstreamError, "upstream_error", None),
        ("no-choices-midway", errors.UpstreamError, "upstream_error", None),
        ("flood", errors.UpstreamError, "upstream_error", None),  # a line past 1 MiB
        ("sglang400", errors.InvalidRequest, "context_length_exceeded", "messages"),
        ("sglang400-other", errors.InvalidRequest, "invalid_value", None),
        ("ollama400", errors.InvalidRequest, "invalid_value", None),
        ("odd-code", errors.InvalidRequest, "invalid_value", "logprobs"),
        ("object-code", errors.InvalidRequest, "invalid_value", None),
    ],
)
def test_error_mapping(
    upstream: ScriptedUpstream,
    script: str,
    error: type[errors.APIError],
    code: str,
    param: str | None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with pytest.raises(error) as raised:
        _complete(_spec(upstream.url + f"/{script}/v1", api_key="sk-secret-value"))
    assert (raised.value.code, raised.value.param) == (code, param)
    if script == "unauthorized":
        assert "credentials" in caplog.text and "fronted" in caplog.text
        assert "Incorrect API key" not in raised.value.message
    if script == "toolong":
        assert raised.value.message == "This model's maximum context length is 2048 tokens."
    if script.startswith("busy"):
        assert raised.value.headers["Retry-After"] == ("7" if script == "busy" else "1")
    upstream_messages = {
        "sglang400": "The input (3000 tokens) is longer than the model's context length (2048 tokens).",
        "sglang400-other": "top_p must be in (0, 1], got 7.",
        "ollama400": "invalid model name",
        "odd-code": "Bad logprobs.",
    }
    if script in upstream_messages:
        assert raised.value.message == upstream_messages[script]
    logged = {"usage-": "usage field", "badgzip": "does not decode", "flood": "longer than 1 MiB"}
    for prefix, words in logged.items():
        if script.startswith(prefix):
            assert words in caplog.text
    assert "sk-secret-value" not in caplog.text


def _events(chunks: list[bytes]) -> list[bytes]:
    splitter = EventSplitter()
    return [event for chunk in chunks for event in splitter.feed(chunk)] + splitter.end()


def _assert_split_anywhere(data: bytes, expected: list[bytes]) -> None:
    """`data` read in three reads, wherever the two breaks fall, gives `expected`."""
    for i in range(len(data) + 1):
        for j in range(i, len(data) + 1):
            assert _events([data[:i], data[i:j], data[j:]]) == expected, (i, j)


def test_events_split_on_cr_lf_crlf_only_wherever_the_reads_break() -> None:
    # A BOM, a comment, an unknown field, multi-line data, U+2028/U+0085 inside data, every line ending,
    # and an unterminated last event that the body's end dispatches.
    data = (
        "\ufeffdata: a\r\n: keep-alive\r\rdata:b\rid: 7\ndata: c\n\n\r\ndata: \u2028d\u0085\r\r\ndata: e\r"
    ).encode()
    _assert_split_anywhere(data, [b"a", b"b\nc", "\u2028d\u0085".encode(), b"e"])
    assert _events([b"data: x\r", b"", b"\n", b"\ndata: y\n\n"]) == [b"x", b"y"]  # CR, empty read, LF


@pytest.mark.parametrize("line_end", [b"\n", b"\r\n"])
def test_streams_split_the_same_whole_or_line_by_line_wherever_the_reads_break(line_end: bytes) -> None:
    # Whole one-line `data: ` events take the short path; a comment, a multi-line event, `data:` without
    # its space and an empty event between them take the line-by-line one, in any mix across reads.
    data = "\ufeffdata: a\n\ndata: b\n\n: ping\n\ndata: c\ndata: d\n\n".encode()
    data += b"data:e\n\ndata: \n\ndata: f\n\n"
    _assert_split_anywhere(data.replace(b"\n", line_end), [b"a", b"b", b"c\nd", b"e", b"", b"f"])


def test_a_line_or_an_event_past_the_cap_is_a_bad_answer() -> None:
    with pytest.raises(BadAnswer, match="line"):
        EventSplitter().feed(b"data: " + b"x" * MAX_EVENT)
    splitter = EventSplitter()
    line = b"data: " + b"x" * (MAX_EVENT // 2 + 1) + b"\n"
    splitter.feed(line)
    with pytest.raises(BadAnswer, match="event"):
        splitter.feed(line)
    with pytest.raises(BadAnswer, match="event"):  # whole events, as servers write them
        EventSplitter().feed(b"data: 1\n\ndata: " + b"x" * (MAX_EVENT + 1) + b"\n\n")
    with pytest.raises(BadAnswer, match="line"):  # whole events, then a line that never ends
        EventSplitter().feed(b"data: 1\n\ndata: " + b"x" * MAX_EVENT)


async def _reads(chunks: list[bytes]) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


def test_sse_events_yields_one_list_per_read_and_checks_the_deadline() -> None:
    async def collect(chunks: list[bytes], deadline: float) -> list[list[bytes]]:
        return [events async for events in sse_events(_reads(chunks), deadline)]

    chunks = [b"data: 1\n\ndata: 2\n\nda", b"ta: 3\n", b"\n", b"data: [DONE]"]
    assert run(collect(chunks, time.monotonic() + 10)) == [[b"1", b"2"], [b"3"], [b"[DONE]"]]
    with pytest.raises(errors.DeadlineExceeded):
        run(collect(chunks, time.monotonic() - 1))


def test_coalesce_joins_runs_of_a_kind_and_keeps_their_tokens() -> None:
    pieces: list[Piece] = [
        (True, "Let"),
        (True, " me"),
        (False, "4"),
        (False, "2"),
        ToolCallDelta(0, id="call_a", name="f"),
        ToolCallDelta(0, arguments='{"x"'),
        ToolCallDelta(0, arguments=": 1}"),
        ToolCallDelta(1, id="call_b", name="g", arguments="{"),
        ToolCallDelta(1, arguments="}"),
        ToolCallDelta(2, arguments="{}"),  # another call's fragment: its own delta
        (False, "!"),
    ]
    assert coalesce(pieces) == [
        TextDelta("Let me", reasoning=True, tokens=2),
        TextDelta("42", tokens=2),
        ToolCallDelta(0, id="call_a", name="f", arguments='{"x": 1}', tokens=3),
        ToolCallDelta(1, id="call_b", name="g", arguments="{}", tokens=2),
        ToolCallDelta(2, arguments="{}"),
        TextDelta("!"),
    ]
    # Answer text stays one delta per piece for `<think>` splitting; reasoning is still joined.
    joined = TextDelta("Let me", reasoning=True, tokens=2)
    assert coalesce(pieces[:4], content=False) == [joined, TextDelta("4"), TextDelta("2")]
    assert coalesce(pieces[:1]) == [TextDelta("Let", reasoning=True)] and coalesce([]) == []


def test_chunks_read_together_are_one_delta_billed_the_same(upstream: ScriptedUpstream) -> None:
    deltas, finished = _complete(_spec(upstream.url + "/burst-text/v1"))
    assert deltas == [TextDelta("one two three", tokens=3)]
    assert finished.usage.completion_tokens == 3 and finished.usage.estimated


def test_think_tags_in_chunks_read_together_are_counted_per_chunk(upstream: ScriptedUpstream) -> None:
    deltas, finished = _complete(_spec(upstream.url + "/burst-think/v1", reasoning="native"), mode="native")
    assert (_text(deltas, reasoning=True), _text(deltas)) == ("a b", "c d")
    assert (finished.usage.completion_tokens, finished.usage.reasoning_tokens) == (4, 2)


def test_tool_call_fragments_read_together_are_one_delta_per_call(upstream: ScriptedUpstream) -> None:
    async def main() -> list[ToolCallDelta]:
        engine = UpstreamEngine(_spec(upstream.url + "/burst-tools/v1"), queue_size=4)
        await engine.start()
        try:
            return [e async for e in engine.generate(_request()) if isinstance(e, ToolCallDelta)]
        finally:
            await engine.aclose()

    assert run(main()) == [
        ToolCallDelta(0, id="call_up1", name="get_weather", arguments='{"city": "Paris"}', tokens=3),
        ToolCallDelta(1, id="call_up2", name="get_time", arguments="{}", tokens=2),
    ]


def test_deltas_before_a_broken_chunk_in_the_same_read_are_passed_on(upstream: ScriptedUpstream) -> None:
    async def main() -> list[TextDelta]:
        engine = UpstreamEngine(_spec(upstream.url + "/burst-broken/v1"), queue_size=4)
        await engine.start()
        seen: list[TextDelta] = []
        try:
            with pytest.raises(errors.UpstreamError):
                async for event in engine.generate(_request()):
                    assert isinstance(event, TextDelta)
                    seen.append(event)
        finally:
            await engine.aclose()
        return seen

    assert run(main()) == [TextDelta("one two", tokens=2)]  # what was streamed is what a failure bills


@pytest.mark.parametrize(
    ("script", "text"),
    [
        # U+2028/U+2029/U+0085 raw inside JSON strings (vLLM, SGLang) are text; CR, LF, CRLF end lines
        ("unicode", "a\u2028b\u2029c\u0085d\re"),
        ("usage-only-trailer", "Hello"),  # the usage chunk leaves out `choices` after the answer
        ("gzip", "Hello world"),  # a proxy that compresses the stream
    ],
)
def test_valid_answers_in_unusual_shapes(upstream: ScriptedUpstream, script: str, text: str) -> None:
    deltas, finished = _complete(_spec(upstream.url + f"/{script}/v1"))
    assert _text(deltas) == text
    assert finished.usage == Usage(
        prompt_tokens=11, completion_tokens=7, cached_tokens=2, reasoning_tokens=3, estimated=False
    )


def test_trickle_without_line_break_ends_at_the_deadline(upstream: ScriptedUpstream) -> None:
    # A byte every 50 ms: the read timeout never fires and the line never ends.
    started = time.monotonic()
    with pytest.raises(errors.DeadlineExceeded):
        _complete(_spec(upstream.url + "/trickle/v1"), _request(deadline=time.monotonic() + 2.0))
    assert time.monotonic() - started < 2.0 + 1.0


def test_upstream_ignoring_max_tokens_is_cut_at_the_budget(upstream: ScriptedUpstream) -> None:
    upstream.closed.clear()
    deltas, finished = _complete(_spec(upstream.url + "/endless/v1"), _request(max_tokens=5))
    assert sum(d.tokens for d in deltas) == 5 and _text(deltas) == "xxxxx"
    assert finished.finish_reason == "length"
    assert finished.usage.completion_tokens == 5 and finished.usage.estimated
    assert upstream.closed.wait(5), "the upstream kept streaming past the budget"


def test_reported_usage_is_capped_at_the_budget(upstream: ScriptedUpstream) -> None:
    _, finished = _complete(_spec(upstream.url + "/json/v1"), _request(max_tokens=3))  # reports 7
    assert finished.usage.completion_tokens == 3 and finished.usage.reasoning_tokens == 3


def test_failover_when_a_replica_dies_after_start_up(
    upstream: ScriptedUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    dying = ScriptedUpstream().start()
    spec = _spec([dying.url + "/ok/v1", upstream.url + "/ok/v1"])

    async def main() -> None:
        engine = UpstreamEngine(spec, queue_size=4)
        await engine.start()
        try:
            first, second = engine.pool.replicas
            assert first.healthy and second.healthy  # both answered the start-up health round
            await asyncio.to_thread(dying.stop)
            before = len(upstream.seen)
            deltas, _ = await _collect(engine, _request())
            assert _text(deltas) == "Hello world"
            assert len(upstream.seen) == before + 1  # the live replica took it
            assert not first.healthy and second.healthy
        finally:
            await engine.aclose()

    run(main())
    assert "is down: ConnectError" in caplog.text


def test_a_request_every_replica_fails_takes_none_down(upstream: ScriptedUpstream) -> None:
    spec = _spec([upstream.url + "/broken/v1", upstream.url + "/broken/v1"])

    async def main() -> None:
        engine = UpstreamEngine(spec, queue_size=4)
        await engine.start()
        try:
            with pytest.raises(errors.UpstreamError):
                await _collect(engine, _request())
            assert all(r.healthy for r in engine.pool.replicas)  # it may be the request's fault
        finally:
            await engine.aclose()

    run(main())


def test_a_hung_replica_is_marked_down(upstream: ScriptedUpstream) -> None:
    silent = SilentServer()
    spec = _spec([silent.url + "/v1", upstream.url + "/ok/v1"], timeout_s=1.0)

    async def main() -> None:
        engine = UpstreamEngine(spec, queue_size=4)
        await engine.start()
        try:
            hung, ok = engine.pool.replicas
            hung.healthy = True  # as if it hung after its last health check
            with pytest.raises(errors.DeadlineExceeded):
                await _collect(engine, _request())
            assert not hung.healthy and ok.healthy
            deltas, _ = await _collect(engine, _request())  # the next request goes elsewhere
            assert _text(deltas) == "Hello world"
        finally:
            await engine.aclose()

    try:
        run(main())
    finally:
        silent.close()


def test_failover_from_dead_port_and_500(upstream: ScriptedUpstream) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    spec = _spec([dead, upstream.url + "/broken/v1", upstream.url + "/ok/v1"])

    async def main() -> None:
        engine = UpstreamEngine(spec, queue_size=4)
        await engine.start()
        try:
            dead_replica, broken, ok = engine.pool.replicas
            assert not dead_replica.healthy and broken.healthy and ok.healthy  # /models answers on /broken
            deltas, _ = await _collect(engine, _request())
            assert _text(deltas) == "Hello world"
            assert not broken.healthy  # its 500 marked it down
            assert [r.outstanding for r in engine.pool.replicas] == [0, 0, 0]
        finally:
            await engine.aclose()

    run(main())


def test_all_replicas_down_is_502_and_start_survives() -> None:
    spec = _spec([f"http://127.0.0.1:{free_port()}/v1", f"http://127.0.0.1:{free_port()}/v1"])
    with pytest.raises(errors.UpstreamError):
        _complete(spec)


def test_health_check_brings_a_replica_back() -> None:
    port = free_port()
    spec = _spec(f"http://127.0.0.1:{port}/ok/v1")

    async def main() -> None:
        engine = UpstreamEngine(spec, queue_size=4, health_interval_s=0.1)
        await engine.start()
        server: ScriptedUpstream | None = None
        try:
            assert not engine.pool.replicas[0].healthy
            server = await asyncio.to_thread(ScriptedUpstream(port).start)
            deadline = time.monotonic() + 5
            while not engine.pool.replicas[0].healthy:
                assert time.monotonic() < deadline, "the health check never saw the replica come back"
                await asyncio.sleep(0.05)
            deltas, _ = await _collect(engine, _request())
            assert _text(deltas) == "Hello world"
        finally:
            await engine.aclose()
            if server is not None:
                await asyncio.to_thread(server.stop)

    run(main())


def test_silent_upstream_is_504_within_timeout() -> None:
    silent = SilentServer()
    try:
        started = time.monotonic()
        with pytest.raises(errors.DeadlineExceeded):
            _complete(_spec(silent.url + "/v1", timeout_s=1.0))
        assert time.monotonic() - started < 2.0 + 1.0 + 1.5  # start()'s health round + timeout_s
    finally:
        silent.close()


def test_request_deadline_bounds_the_wait() -> None:
    silent = SilentServer()
    try:
        with pytest.raises(errors.DeadlineExceeded):
            _complete(_spec(silent.url + "/v1", timeout_s=60), _request(deadline=time.monotonic() + 4.0))
    finally:
        silent.close()


def test_consumer_leaving_closes_the_upstream_stream(upstream: ScriptedUpstream) -> None:
    upstream.closed.clear()

    async def main() -> None:
        engine = UpstreamEngine(_spec(upstream.url + "/endless/v1"), queue_size=4, health_interval_s=0.02)
        await engine.start()
        try:
            events = engine.generate(_request())
            assert isinstance(await anext(events), TextDelta)
            checks = upstream.models_hits
            for _ in range(10):  # ~200 ms of streaming: a busy replica gets no health checks
                assert isinstance(await anext(events), TextDelta)
            assert upstream.models_hits == checks
            await events.aclose()  # type: ignore[attr-defined]
            assert engine.pool.replicas[0].outstanding == 0
        finally:
            await engine.aclose()

    run(main())
    assert upstream.closed.wait(5), "the upstream kept streaming after the consumer left"


def test_api_key_from_environment(upstream: ScriptedUpstream, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TT_TEST_UPSTREAM_KEY", "sk-from-env")
    _complete(_spec(upstream.url + "/ok/v1", api_key="env:TT_TEST_UPSTREAM_KEY"))
    assert upstream.seen[-1]["headers"]["authorization"] == "Bearer sk-from-env"
    assert "sk-from-env" not in repr(_spec(upstream.url, api_key="sk-from-env"))
    monkeypatch.delenv("TT_TEST_UPSTREAM_KEY")
    with pytest.raises(CatalogError, match="TT_TEST_UPSTREAM_KEY"):
        _complete(_spec(upstream.url + "/ok/v1", api_key="env:TT_TEST_UPSTREAM_KEY"))


def test_api_key_whitespace_and_secrecy(upstream: ScriptedUpstream, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TT_TEST_UPSTREAM_KEY", "  sk-from-file\n")  # a key file's trailing newline
    spec = _spec(upstream.url + "/ok/v1", api_key="env:TT_TEST_UPSTREAM_KEY")
    _complete(spec)
    assert upstream.seen[-1]["headers"]["authorization"] == "Bearer sk-from-file"

    async def started_repr() -> str:
        engine = UpstreamEngine(spec, queue_size=1)
        await engine.start()
        try:
            return repr(engine) + repr(vars(engine))
        finally:
            await engine.aclose()

    shown = run(started_repr())
    assert "fronted" in shown and "sk-from-file" not in shown
    monkeypatch.setenv("TT_TEST_UPSTREAM_KEY", "sk-one\nX-Injected: yes")
    with pytest.raises(CatalogError, match="cannot carry") as raised:
        _complete(spec)
    assert "sk-one" not in str(raised.value)


UPSTREAM_KEY = "sk-test-upstream-key-0123456789abcdef"
GATEWAY_TOKEN = "gw-token-secret-4242"


@pytest.mark.parametrize("script", ["echo-400", "echo-json", "echo-500", "echo-stream"])
def test_an_upstream_echoing_our_key_leaks_it_nowhere(
    upstream: ScriptedUpstream, caplog: pytest.LogCaptureFixture, script: str
) -> None:
    """Issue 15.7: what the upstream quotes back (its 400 message relayed to the client, a 5xx body or a
    broken event logged) has our key and extra header values replaced."""
    spec = _spec(
        upstream.url + f"/{script}/v1", api_key=UPSTREAM_KEY, headers={"x-gateway-token": GATEWAY_TOKEN}
    )
    with caplog.at_level("DEBUG"), pytest.raises(errors.APIError) as raised:
        _complete(spec)
    assert upstream.seen[-1]["headers"]["authorization"] == f"Bearer {UPSTREAM_KEY}"  # it did echo them
    expected = errors.InvalidRequest if script in ("echo-400", "echo-json") else errors.UpstreamError
    assert type(raised.value) is expected
    shown = raised.value.message + caplog.text
    assert "[redacted]" in shown, shown
    for secret in (UPSTREAM_KEY, GATEWAY_TOKEN, UPSTREAM_KEY[:12], GATEWAY_TOKEN[:12]):
        assert secret not in shown, shown


def test_catalogue_errors() -> None:
    with pytest.raises(CatalogError, match="needs base_url"):
        UpstreamEngine(ModelSpec(id="fronted", engine="upstream"))
    with pytest.raises(CatalogError, match="not an http"):
        UpstreamEngine(_spec("ftp://127.0.0.1/v1"))
    with pytest.raises(CatalogError, match="user:password") as raised:
        UpstreamEngine(_spec("http://admin:hunter2@127.0.0.1/v1"))
    assert "hunter2" not in str(raised.value)
    with pytest.raises(CatalogError, match="not a valid URL") as raised:
        UpstreamEngine(_spec("http://admin:hunter2@127.0.0.1:abc/v1"))
    assert "hunter2" not in str(raised.value)
    with pytest.raises(CatalogError, match="no valid port"):
        UpstreamEngine(_spec("http://127.0.0.1:99999999/v1"))
    bad_headers = [
        ({"x-team": "a\r\nX-Injected: 1"}, "cannot carry"),
        ({"x team": "a"}, "not a valid HTTP header name"),
        ({"Host": "evil.example"}, "cannot be overridden"),
        ({"Content-Length": "0"}, "cannot be overridden"),
        ({"x-name": "caf\u00e9"}, "cannot carry"),
    ]
    for headers, words in bad_headers:
        with pytest.raises(CatalogError, match=words) as raised:
            UpstreamEngine(_spec("http://127.0.0.1/v1", headers=headers))
        assert "X-Injected" not in str(raised.value) and "evil" not in str(raised.value)


def test_a_finished_stream_leaves_its_connection_for_the_next_request(upstream: ScriptedUpstream) -> None:
    """A body read to its end after `[DONE]` returns the connection to the pool: the second request
    arrives on the first one's TCP connection (same client port) instead of opening another."""

    async def main() -> None:
        engine = UpstreamEngine(_spec(upstream.url + "/ok/v1"), queue_size=4)
        await engine.start()
        try:
            for _ in range(2):
                deltas, _finished = await _collect(engine, _request())
                assert _text(deltas) == "Hello world"
        finally:
            await engine.aclose()

    run(main())
    first, second = upstream.seen[-2:]
    assert first["port"] is not None and first["port"] == second["port"]


def test_a_body_left_open_after_done_is_cut_off_and_the_answer_stands(upstream: ScriptedUpstream) -> None:
    """An upstream that says `[DONE]` and keeps its body open: the answer is complete, the connection is
    dropped (the upstream sees it go) instead of waiting out `timeout_s`."""
    upstream.closed.clear()
    started = time.monotonic()
    request = _request(deadline=started + 600)
    deltas, finished = _complete(_spec(upstream.url + "/done-open/v1", timeout_s=600), request)
    assert _text(deltas) == "Hello" and finished.finish_reason == "stop"
    assert time.monotonic() - started < 600 / 10  # far from timeout_s and the deadline: not waited out
    assert upstream.closed.wait(10), "the connection of a body left open was kept"
