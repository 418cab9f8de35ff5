"""Tiny real OpenAI-style servers on 127.0.0.1 for the upstream engine's tests (no mocks of our code).

`ScriptedUpstream` is a Starlette app under uvicorn in a thread; the first path segment picks a script, so
`base_url = f"{server.url}/ok/v1"` answers with the `ok` script. `SilentServer` accepts TCP connections
and never answers (a hung upstream). Both listen on loopback only.

`python -m tests.engines.upstream_servers PORT` runs a `ScriptedUpstream` in the foreground, for tests that
need one they can kill (a replica that dies after the gateway saw it healthy).
"""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

__all__ = ["ScriptedUpstream", "SilentServer", "free_port", "sse_chunk"]

USAGE = {
    "prompt_tokens": 11,
    "completion_tokens": 7,
    "total_tokens": 18,
    "prompt_tokens_details": {"cached_tokens": 2},
    "completion_tokens_details": {"reasoning_tokens": 3},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sse_chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any) -> bytes:
    """One `data:` event; `raw=True` writes non-ASCII unescaped, as pydantic does (vLLM, SGLang)."""
    raw = extra.pop("raw", False)
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    obj = {
        "id": "chatcmpl-x",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": choices,
        **extra,
    }
    obj = {k: v for k, v in obj.items() if v is not _OMIT}
    return b"data: " + json.dumps(obj, ensure_ascii=not raw).encode() + b"\n\n"


_OMIT = object()  # sse_chunk(..., choices=_OMIT) leaves the key out

# Two parallel calls: each first delta carries index, id, type and name; then argument fragments.
TOOL_CALL_DELTAS: list[dict[str, Any]] = [
    {"index": 0, "id": "call_up1", "type": "function", "function": {"name": "get_weather", "arguments": ""}},
    {"index": 0, "function": {"arguments": '{"city": '}},
    {"index": 0, "function": {"arguments": '"Paris"}'}},
    {"index": 1, "id": "call_up2", "type": "function", "function": {"name": "get_time", "arguments": ""}},
    {"index": 1, "function": {"arguments": "{}"}},
]
TOOL_CALL_STREAM = [
    sse_chunk({"role": "assistant", "content": None}),
    *(sse_chunk({"tool_calls": [d]}) for d in TOOL_CALL_DELTAS),
    sse_chunk({}, "tool_calls"),
    sse_chunk(None, usage=USAGE),
    b"data: [DONE]\n\n",
]


def _content_stream(*texts: str, usage: bool = True, sep: bytes = b"\n\n") -> list[bytes]:
    out = [sse_chunk({"role": "assistant", "content": ""})]
    out += [sse_chunk({"content": t}) for t in texts]
    out.append(sse_chunk({}, "stop"))
    if usage:
        out.append(sse_chunk(None, usage=USAGE))
    out.append(b"data: [DONE]\n\n")
    return [c.replace(b"\n\n", sep) for c in out]


def _error(status: int, message: str, code: str | None, param: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


class ScriptedUpstream:
    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.seen: list[dict[str, Any]] = []  # (script, headers, body) of every chat request
        self.models_hits = 0  # GET …/models requests (health checks)
        self.closed = threading.Event()  # set when an `endless` stream was cancelled by a disconnect
        app = Starlette(
            routes=[
                Route("/{script}/v1/chat/completions", self._chat, methods=["POST"]),
                Route("/{script}/v1/models", self._models, methods=["GET"]),
            ]
        )
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off", ws="none"
        )
        config.timeout_graceful_shutdown = 1
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def start(self) -> ScriptedUpstream:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            assert time.monotonic() < deadline, "scripted upstream did not start"
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)

    async def _models(self, request: Request) -> Response:
        self.models_hits += 1
        if request.path_params["script"] == "down":
            return Response(status_code=503)
        return JSONResponse({"object": "list", "data": [{"id": "m", "object": "model"}]})

    async def _chat(self, request: Request) -> Response:
        script = request.path_params["script"]
        body = await request.json()
        client = request.client.port if request.client else None  # one port per TCP connection
        self.seen.append({"script": script, "headers": dict(request.headers), "body": body, "port": client})
        if script.startswith("echo-"):
            return _echo_headers(script, request)
        stream = self._script(script, body)
        if isinstance(stream, Response):
            return stream
        return StreamingResponse(_paced(stream, self.closed), media_type="text/event-stream")

    def _script(self, script: str, body: dict[str, Any]) -> Response | list[bytes] | None:
        if script == "ok":
            return _content_stream("Hello", " world")
        if script == "tools":  # a tool call streamed as OpenAI streams it (needs tools in the request)
            if not body.get("tools"):
                return _error(400, "this script answers only requests with tools", "invalid_value")
            return TOOL_CALL_STREAM
        if script == "crlf":  # sse-starlette (llama-cpp-python's server) separates with CRLF
            return _content_stream("Hello", " world", sep=b"\r\n\r\n")
        if script == "nousage":
            return _content_stream("one", " two", " three", usage=False)
        if script == "reasoning":
            return [
                sse_chunk({"role": "assistant", "reasoning_content": "Let me"}),
                sse_chunk({"reasoning_content": " think."}),
                sse_chunk({"reasoning": " Done."}),
                sse_chunk({"content": "42"}),
                sse_chunk({}, "length"),
                b": keep-alive comment\n\n",
                sse_chunk(None, usage={"prompt_tokens": 5, "completion_tokens": 4}),
                b"data: [DONE]\n\n",
            ]
        if script == "think":  # tags split across chunks
            return _content_stream("<thi", "nk>plan", "ning</th", "ink>Ans", "wer", usage=False)
        if script.startswith("burst-"):  # every chunk in one write: they reach the gateway in one read
            chunks = {
                "burst-text": _content_stream("one", " two", " three", usage=False),
                "burst-think": _content_stream("<think>a", " b</think>", "c", " d", usage=False),
                "burst-tools": TOOL_CALL_STREAM,
                "burst-broken": _content_stream("one", " two")[:3] + [b"data: not json\n\n"],
            }[script]
            return [b"".join(chunks)]
        if script == "done-open":  # says [DONE] and then never ends the body
            return StreamingResponse(
                _held_open(_content_stream("Hello"), self.closed), media_type="text/event-stream"
            )
        if script == "json":  # ignores stream: true
            message = {"role": "assistant", "content": "fixed answer"}
            choice = {"index": 0, "message": message, "finish_reason": "stop"}
            return JSONResponse({"object": "chat.completion", "choices": [choice], "usage": USAGE})
        if script == "legacy" and "max_tokens" in body:  # OpenAI o-series
            return _error(400, "Unsupported parameter: 'max_tokens'.", "unsupported_parameter", "max_tokens")
        if script == "legacy":
            return _content_stream("modern")
        if script == "unicode":  # raw line separators inside JSON strings are not line breaks in SSE
            return [
                sse_chunk({"role": "assistant", "content": ""}, raw=True),
                sse_chunk({"content": "a\u2028b"}, raw=True),
                sse_chunk({"content": "\u2029c\u0085d"}, raw=True),
                b"data: "
                + json.dumps({"choices": [{"index": 0, "delta": {"content": "\re"}}]}).encode()
                + b"\r",
                b"\n\r",  # CR LF split across two reads, then an empty line given as a lone CR
                sse_chunk({}, "stop", raw=True),
                sse_chunk(None, usage=USAGE),
                b"data: [DONE]\n\n",
            ]
        if script == "usage-only-trailer":  # the usage chunk leaves out `choices` after a complete answer
            return _content_stream("Hello")[:-2] + [
                sse_chunk(None, usage=USAGE, choices=_OMIT),
                b"data: [DONE]\n\n",
            ]
        if script == "no-choices-midway":
            return [sse_chunk({"content": "half"}), sse_chunk(None, usage=USAGE, choices=_OMIT)]
        if script == "usage-partial":  # usage without prompt_tokens
            return _content_stream("Hi")[:-2] + [
                sse_chunk(None, usage={"completion_tokens": 1}),
                b"data: [DONE]\n\n",
            ]
        if script.startswith("usage-"):  # usage-null, usage-negative, usage-float: nonsense counts
            value = {"usage-null": None, "usage-negative": -3, "usage-float": 2.5}[script]
            return _content_stream("Hi")[:-2] + [
                sse_chunk(None, usage={"prompt_tokens": value, "completion_tokens": 1}),
                b"data: [DONE]\n\n",
            ]
        if script == "badgzip":  # a proxy that claims gzip and sends something else
            headers = {"content-encoding": "gzip", "content-type": "text/event-stream"}
            return Response(b"data: not gzip at all" * 10, headers=headers)
        if script == "gzip":  # a proxy that compresses correctly: must work
            body = b"".join(_content_stream("Hello", " world"))
            headers = {"content-encoding": "gzip", "content-type": "text/event-stream"}
            return Response(gzip.compress(body), headers=headers)
        if script == "flood":  # bytes without a line break, as fast as possible
            return StreamingResponse(_flood(), media_type="text/event-stream")
        if script == "trickle":  # a byte every 50 ms, never a line break
            return StreamingResponse(_trickle(), media_type="text/event-stream")
        if script == "sglang400":  # SGLang / older vLLM: a top-level error object, numeric code
            return JSONResponse(
                {
                    "object": "error",
                    "message": "The input (3000 tokens) is longer than the model's context length "
                    "(2048 tokens).",
                    "type": "BadRequestError",
                    "param": None,
                    "code": 400,
                },
                status_code=400,
            )
        if script == "sglang400-other":
            body = {
                "object": "error",
                "message": "top_p must be in (0, 1], got 7.",
                "type": "BadRequestError",
            }
            return JSONResponse({**body, "param": None, "code": 400}, status_code=400)
        if script == "ollama400":
            return JSONResponse({"error": "invalid model name"}, status_code=400)
        if script == "odd-code":  # an upstream code that is not one of ours
            return _error(400, "Bad logprobs.", "weird_code_123", "logprobs")
        if script == "object-code":  # nonsense in the envelope itself
            body = {"error": {"message": "Bad.", "code": {"nested": 1}, "param": ["messages"]}}
            return JSONResponse(body, status_code=400)
        if script == "garbage":
            return [b"data: this is not json\n\n"]
        if script == "truncated":
            return [sse_chunk({"content": "half"})]
        if script == "endless":
            return None
        if script == "unauthorized":
            return _error(401, "Incorrect API key provided: sk-...", "invalid_api_key")
        if script == "toolong":
            return _error(
                400,
                "This model's maximum context length is 2048 tokens.",
                "context_length_exceeded",
                "messages",
            )
        if script == "plain400":
            return Response("bad", status_code=400)
        if script == "busy":
            return Response("slow down", status_code=429, headers={"Retry-After": "7"})
        if script == "busy-nan":
            return Response("slow down", status_code=429, headers={"Retry-After": "nan"})
        if script in ("broken", "down"):
            return Response("internal", status_code=500)
        return Response("no such script", status_code=404)


def _echo_headers(script: str, request: Request) -> Response:
    """An upstream that quotes the request's headers back (our Authorization and extra headers included):
    in a 400's message, a 500's body, or an SSE event that is not JSON."""
    auth = request.headers.get("authorization", "")
    quoted = f"authorization={auth!r} x-gateway-token={request.headers.get('x-gateway-token', '')!r}"
    if script == "echo-400":
        return _error(400, f"Invalid header value: {quoted}", "invalid_value")
    if script == "echo-500":
        return Response(f"upstream crashed handling {json.dumps(dict(request.headers))}", status_code=500)
    if script == "echo-json":  # the key JSON-escaped inside a JSON string
        return _error(400, json.dumps({"headers": dict(request.headers)}), None)
    if script == "echo-stream":
        return StreamingResponse(iter([f"data: {quoted}\n\n".encode()]), media_type="text/event-stream")
    return Response("no such echo script", status_code=404)


async def _flood() -> AsyncIterator[bytes]:
    yield b"data: "
    while True:
        yield b"x" * 65536
        await asyncio.sleep(0)


async def _trickle() -> AsyncIterator[bytes]:
    yield b"data: "
    while True:
        yield b"x"
        await asyncio.sleep(0.05)


async def _paced(chunks: list[bytes] | None, closed: threading.Event) -> AsyncIterator[bytes]:
    try:
        if chunks is None:
            while True:  # endless: one delta every 20 ms until the client goes away
                yield sse_chunk({"content": "x"})
                await asyncio.sleep(0.02)
        for chunk in chunks:
            yield chunk
            await asyncio.sleep(0.005)
    finally:
        if chunks is None:
            closed.set()


async def _held_open(chunks: list[bytes], closed: threading.Event) -> AsyncIterator[bytes]:
    try:
        for chunk in chunks:
            yield chunk
        await asyncio.sleep(60)  # the body stays open until the client drops the connection
    finally:
        closed.set()


class SilentServer:
    """Accepts connections and never answers."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.port = int(self._sock.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        self._sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._held.append(conn)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for conn in self._held:
            conn.close()
        self._sock.close()


if __name__ == "__main__":
    server = ScriptedUpstream(int(sys.argv[1]))
    server._server.run()
