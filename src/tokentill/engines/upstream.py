"""The `upstream` engine: an OpenAI-compatible server (vLLM, SGLang, llama-server, Ollama, OpenAI) as engine.

Catalogue entry (see docs/upstream.md):

    [[models]]
    id = "o1-preview"
    engine = "upstream"
    base_url = ["http://10.0.0.5:8000/v1", "http://10.0.0.6:8000/v1"]   # one URL or replicas
    api_key = "env:VLLM_API_KEY"       # the value, or env:NAME to read it from the environment
    upstream_model = "deepseek-ai/DeepSeek-R1-Distill-Qwen-32B"           # default: the entry's id
    timeout_s = 120                    # longest wait for the answer's headers or between two chunks
    headers = { "x-team" = "research" }

Four modules: this one (the engine: replicas, failover, timeouts, budget), `upstream_config` (the entry's
start-up checks), `upstream_wire` (the payload we send, the chunks we fold, the errors we map; no I/O) and
`upstream_sse` (the answer body read as server-sent events), with `upstream_pool` (replica health).

Contract, beyond `engines/base.py`:
- One long-lived `aiohttp.ClientSession` (opened in `start`, closed in `aclose`), `trust_env=False` so no
  proxy from the environment sees prompts or keys. aiohttp, not httpx2, on this hop: it costs a fifth of
  the CPU per streamed request (`bench/upstream_client.py`; docs/decisions.md, "Hot path").
- Failover: a connect error, or a 5xx / dropped connection before the response headers, moves the request
  to the next replica (at most one try per replica). Once the upstream has answered 200, nothing is
  retried: output may already be with the client. Which failures mark a replica down: see `_open`.
- `start` never fails because an upstream is down (a warning; requests then get 502). It does fail, with a
  `CatalogError`, on an entry `upstream_config` refuses.
- Errors: see `upstream_wire.error_for_status`; all replicas failing → 502, a silent upstream → 504 after
  `timeout_s`, the request's own deadline → 504, more than `queue_size` requests per replica in flight → 503.
  An answer that breaks the protocol (bad JSON or usage, a body that does not decode, an SSE line over
  1 MiB) → 502. SSE lines end at CR, LF or CRLF only, never at U+2028/U+2029/U+0085 inside JSON text
  (`upstream_sse`).
- Budget: the upstream is asked for `max_tokens`; one that streams past it is cut there (the response is
  closed, `finish_reason` "length", usage = the budget, marked estimated), and no reported usage above the
  budget is passed on.
- Usage comes from the upstream; without it we count (`Usage.estimated`). Every non-empty text delta is
  one token: most servers stream one token per delta, which is what an interrupted stream is billed by.
  The chunks one read of the body brought are passed on as one delta per run of a kind, carrying their
  tokens (`upstream_wire.coalesce`). `<think>` tags in content are split by `reasoning.NativeThinking`
  (applied by the app for `reasoning = "native"`), exactly as for the embedded engine;
  `reasoning_content` / `reasoning` fields are reasoning deltas here already.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing

import aiohttp
from multidict import CIMultiDict

from tokentill import errors
from tokentill.catalog import ModelSpec
from tokentill.engines.base import Capabilities, EngineHealth, EngineRequest
from tokentill.engines.upstream_config import headers, resolve_api_key, secrets, urls
from tokentill.engines.upstream_pool import Replica, ReplicaPool
from tokentill.engines.upstream_sse import read_capped, sse_events
from tokentill.engines.upstream_wire import (
    BadAnswer,
    Piece,
    StreamState,
    build_payload,
    coalesce,
    error_for_status,
    estimate_prompt_tokens,
    parse_json,
    rejects_max_tokens,
)
from tokentill.jsonbytes import dumps
from tokentill.redact import Redactor
from tokentill.types import EngineEvent, Finished, TextDelta, ToolCallDelta

__all__ = ["UpstreamEngine"]

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 5.0
HEALTH_INTERVAL_S = 5.0
STARTUP_CHECK_S = 2.0  # start() waits at most this long for the first health round
MAX_ERROR_BODY = 64 * 1024  # bytes of an upstream error answer we read (for its envelope)
MAX_JSON_BODY = 8 * 1024 * 1024  # a non-streamed completion
_INVALID = "Bad gateway: the upstream model sent an invalid answer."
_UNAVAILABLE = "Bad gateway: the upstream model service is temporarily unavailable; please try again later."


class UpstreamEngine:
    """`Engine` that forwards to one or more OpenAI-compatible replicas of the same model."""

    def __init__(
        self,
        spec: ModelSpec,
        *,
        queue_size: int = 32,
        n_threads: int | None = None,
        health_interval_s: float = HEALTH_INTERVAL_S,
    ) -> None:
        self.spec = spec
        self.model = spec.upstream_model or spec.id
        self.pool = ReplicaPool(urls(spec), model=spec.id, interval_s=health_interval_s)
        self._extra_headers = headers(spec)
        self.capabilities = Capabilities(
            context_length=spec.context,
            vision=spec.vision,
            reasoning=spec.reasoning,
            exact_prompt_tokens=False,
            early_start=True,
        )
        self._max_inflight = max(1, queue_size) * len(self.pool.replicas)
        self._inflight = 0
        self._send_max_tokens = True
        # Answer text is left one delta per chunk for `NativeThinking` (see `coalesce`).
        self._coalesce_content = spec.reasoning != "native"
        self._headers = _Headers()
        # Upstream text (error bodies, broken answers) passes through this before it is relayed or logged:
        # an upstream that echoes our Authorization header must not leak the key.
        self._redact = Redactor()
        self._client: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:  # never the headers: they carry the key
        return f"UpstreamEngine({self.spec.id!r}, replicas={len(self.pool.replicas)})"

    async def start(self) -> None:
        key = resolve_api_key(self.spec)
        # Case-insensitive (a catalogue `authorization` replaces ours); `_Headers`' repr masks the values.
        headers: CIMultiDict[str] = CIMultiDict(
            {"Authorization": f"Bearer {key.get_secret_value()}"} if key else {}
        )
        headers.update(self._extra_headers)  # the catalogue may override (e.g. Azure's api-key)
        self._headers = _Headers(headers)
        self._redact = Redactor(secrets(self.spec))
        self._client = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                # Never waited on: `generate` refuses past _max_inflight first; + the health checks.
                limit=self._max_inflight + len(self.pool.replicas),
                keepalive_timeout=30.0,
            ),
            trust_env=False,
            auto_decompress=True,
        )
        await self.pool.check(
            self._client, self._headers.headers, timeout_s=min(STARTUP_CHECK_S, self.spec.timeout_s)
        )
        if not self.pool.any_healthy():
            log.warning(
                "no upstream replica of model %s answers yet (%s); requests get 502 until one does",
                self.spec.id,
                ", ".join(r.base_url for r in self.pool.replicas),
            )
        self.pool.start(self._client, self._headers.headers)

    def health(self) -> EngineHealth:
        replicas = self.pool.replicas
        return EngineHealth(
            replicas_up=sum(r.healthy for r in replicas),
            replicas=len(replicas),
            queued=0,  # requests wait in the replicas' own queues, which we cannot see
            running=sum(r.outstanding for r in replicas),
        )

    async def aclose(self) -> None:
        await self.pool.aclose()
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    def count_prompt_tokens(self, request: EngineRequest) -> int:
        """An over-estimate (see `upstream_wire.estimate_prompt_tokens`): we cannot tokenize remotely."""
        return estimate_prompt_tokens(request)

    async def generate(self, request: EngineRequest) -> AsyncGenerator[EngineEvent, None]:
        if self._inflight >= self._max_inflight:
            raise errors.Overloaded("The model is busy with other requests; retry shortly.")
        self._inflight += 1
        try:
            state = StreamState(
                prompt_estimate=self.count_prompt_tokens(request), max_tokens=request.max_tokens
            )
            response, replica = await self._open(request)
            where = f"{replica.base_url} (model {self.spec.id})"
            try:
                async with aclosing(self._read(response, replica, request, state)) as deltas:
                    async for delta in deltas:
                        yield delta
            finally:
                # Also reached when the consumer stops iterating (client gone) and when the budget is
                # spent: releasing a response whose body was not read to its end drops the connection,
                # which is how vLLM/llama-server learn to stop generating; a finished one goes back to
                # the pool.
                replica.outstanding -= 1
                response.release()
            if state.cut:
                log.warning(
                    "upstream %s ignored max_tokens=%d; the answer was cut", where, request.max_tokens
                )
            elif state.finish_reason is None and not state.done:
                log.warning("upstream %s ended the stream without finishing", where)
                raise errors.UpstreamError("Bad gateway: the upstream model's answer ended early.")
            try:
                usage = state.final_usage()
            except BadAnswer as exc:
                log.warning("upstream %s answered nonsense: %s", where, self._redact(str(exc)))
                raise errors.UpstreamError(_INVALID) from exc
            yield Finished(state.finish_reason or "stop", usage)
        finally:
            self._inflight -= 1

    def _timeout(self, request: EngineRequest) -> tuple[aiohttp.ClientTimeout, bool]:
        """This try's timeouts, and whether they are the entry's `timeout_s` (not the request's deadline):
        only then does running into them say something about the replica. `sock_read` bounds the wait
        for the answer's head and every read after it."""
        left = request.deadline - time.monotonic()
        if left <= 0:
            raise errors.DeadlineExceeded("The request timed out before the upstream model answered.")
        read = min(self.spec.timeout_s, left)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=min(CONNECT_TIMEOUT_S, read), sock_read=read)
        return timeout, read >= self.spec.timeout_s

    async def _open(self, request: EngineRequest) -> tuple[aiohttp.ClientResponse, Replica]:
        """The first replica to answer 200, its `outstanding` count taken (the caller gives it back).

        Whose fault a failure is: a replica that cannot be connected to, or that sits on the request for
        all of `timeout_s`, is marked down at once. A 5xx or a connection dropped before the headers may
        be the request's doing (one that crashes every replica): it counts against a replica only when
        another replica then answers the same request, so a poison request cannot take the pool down.
        """
        client = self._client
        if client is None:
            raise errors.UpstreamError(_UNAVAILABLE)
        tried: set[int] = set()
        suspects: list[tuple[Replica, str]] = []  # failed this request in a way that may be its fault
        while (index := self.pool.pick(tried)) is not None:
            tried.add(index)
            replica = self.pool.replicas[index]
            where = f"{replica.base_url} (model {self.spec.id})"
            payload = build_payload(
                request,
                model=self.model,
                reasoning=self.spec.reasoning,
                send_max_tokens=self._send_max_tokens,
            )
            timeout, own_timeout = self._timeout(request)
            replica.outstanding += 1
            kept = False  # a 200 keeps the replica's count: the caller gives it back when the answer ends
            try:
                try:
                    response = await client.post(
                        replica.base_url + "/chat/completions",
                        data=dumps(payload),
                        # No x-request-id: llama-cpp-python's server answers 400 to one that is not a UUID.
                        headers=self._headers.for_json,
                        timeout=timeout,
                        allow_redirects=False,
                    )
                except aiohttp.ConnectionTimeoutError:
                    replica.mark(False, "ConnectTimeout", self.spec.id)
                    continue
                except aiohttp.ClientConnectorError:
                    replica.mark(False, "ConnectError", self.spec.id)
                    continue
                except TimeoutError as exc:  # connected, but no answer within timeout_s
                    log.warning(
                        "upstream %s sent no answer in time (timeout_s=%s)", where, self.spec.timeout_s
                    )
                    if own_timeout:
                        replica.mark(False, f"no answer within timeout_s={self.spec.timeout_s}", self.spec.id)
                    raise errors.DeadlineExceeded("The upstream model did not answer in time.") from exc
                except aiohttp.ClientError as exc:  # dropped before the headers: nothing reached the client
                    log.warning("upstream %s dropped the request: %s", where, type(exc).__name__)
                    suspects.append((replica, type(exc).__name__))
                    continue
                if response.status == 200:
                    replica.mark(True, "", self.spec.id)
                    for suspect, why in suspects:  # this request works: the earlier failures were theirs
                        suspect.mark(False, why, self.spec.id)
                    kept = True
                    return response, replica
                body = self._redact.body(await read_capped(response, MAX_ERROR_BODY))
            finally:
                if not kept:
                    replica.outstanding -= 1
            status = response.status
            if status >= 500:
                log.warning("upstream %s answered HTTP %d: %s", where, status, body[:300])
                suspects.append((replica, f"HTTP {status}"))
                continue
            if self._send_max_tokens and rejects_max_tokens(status, body):
                log.info("upstream %s refuses max_tokens; sending only max_completion_tokens", where)
                self._send_max_tokens = False
                tried.discard(index)
                continue
            raise error_for_status(status, body, response.headers.get("retry-after"), where=where)
        log.error("no upstream replica of model %s could take request %s", self.spec.id, request.request_id)
        raise errors.UpstreamError(_UNAVAILABLE)

    async def _read(
        self, response: aiohttp.ClientResponse, replica: Replica, request: EngineRequest, state: StreamState
    ) -> AsyncGenerator[TextDelta | ToolCallDelta, None]:
        """The answer's text deltas, the stream's protocol and transport errors mapped to ours.

        Stops early (without error) once `state.cut`: the upstream went past the completion budget.
        """
        where = f"{replica.base_url} (model {self.spec.id})"
        content_type = response.headers.get("content-type", "").partition(";")[0].strip().lower()
        try:
            if content_type == "application/json":  # an upstream that ignores stream: true
                obj = parse_json(await read_capped(response, MAX_JSON_BODY))
                if obj is None:
                    raise BadAnswer("the body is not a JSON object")
                for delta in state.completion(obj):
                    yield delta
                return
            if content_type != "text/event-stream":
                raise BadAnswer(f"unexpected content type {content_type!r}")
            async with aclosing(sse_events(response.content.iter_any(), request.deadline)) as reads:
                async for events in reads:
                    pieces: list[Piece] = []
                    broken: BadAnswer | None = None  # raised after the pieces before it are passed on
                    try:
                        for data in events:
                            if data == b"[DONE]":
                                state.done = True
                                break
                            obj = parse_json(data)
                            if obj is None:
                                raise BadAnswer(f"an event is not a JSON object: {data[:200]!r}")
                            state.fold(obj, pieces)
                            if state.cut:
                                break
                    except BadAnswer as exc:
                        broken = exc
                    # One delta per run of a kind in this read, not one per chunk (`coalesce`).
                    for delta in coalesce(pieces, content=self._coalesce_content):
                        yield delta
                    if broken is not None:
                        raise broken
                    if state.done and not response.content.at_eof():  # its end is normally on the way
                        await _body_end(response.content)
                    if state.done or state.cut:
                        return
        except BadAnswer as exc:
            log.warning("upstream %s answered nonsense: %s", where, self._redact(str(exc)))
            raise errors.UpstreamError(_INVALID) from exc
        except TimeoutError as exc:
            log.warning("upstream %s went silent mid-answer", where)
            if time.monotonic() < request.deadline:  # timeout_s fired, not the request's own deadline
                replica.mark(False, f"silent for timeout_s={self.spec.timeout_s} mid-answer", self.spec.id)
            raise errors.DeadlineExceeded("The upstream model stopped answering in time.") from exc
        except aiohttp.ClientPayloadError as exc:
            if _undecodable(exc):  # e.g. a proxy's broken gzip
                log.warning("upstream %s sent a body that does not decode: %s", where, exc)
                raise errors.UpstreamError(_INVALID) from exc
            log.warning("upstream %s broke the answer off: %s", where, type(exc).__name__)
            raise errors.UpstreamError("Bad gateway: the upstream model's answer broke off.") from exc
        except aiohttp.ClientError as exc:
            log.warning("upstream %s broke the answer off: %s", where, type(exc).__name__)
            raise errors.UpstreamError("Bad gateway: the upstream model's answer broke off.") from exc


_END_OF_BODY_S = 0.05  # how long the end of a body that said [DONE] may take to arrive


async def _body_end(content: aiohttp.StreamReader) -> None:
    """Wait, at most `_END_OF_BODY_S`, for the end of a body that said `[DONE]` (normally the chunked
    body's last bytes, right behind it), so that releasing the response returns its connection to the
    pool: a body released before its end drops the connection, and every request then paid a new TCP
    connection to the upstream. What follows `[DONE]` is not read; an upstream that keeps the body open
    is cut off. A future woken by the reader's end-of-body callback rather than a cancel scope around
    more reads: this runs on nearly every request (servers write the body's end after `[DONE]`)."""
    loop = asyncio.get_running_loop()
    ended: asyncio.Future[None] = loop.create_future()

    def end() -> None:
        if not ended.done():
            ended.set_result(None)

    timer = loop.call_later(_END_OF_BODY_S, end)
    content.on_eof(end)
    try:
        await ended
    finally:
        timer.cancel()


def _undecodable(exc: aiohttp.ClientPayloadError) -> bool:
    """Whether the body failed to decode (its content encoding), not to arrive."""
    return "decode" in str(exc).lower() or "encoding" in str(exc).lower()


class _Headers:
    """The request headers (the key among them): `for_json` adds the content type; the repr shows only
    the names."""

    def __init__(self, headers: CIMultiDict[str] | None = None) -> None:
        self.headers: CIMultiDict[str] = headers if headers is not None else CIMultiDict()
        self.for_json: CIMultiDict[str] = CIMultiDict(self.headers)
        self.for_json.setdefault("Content-Type", "application/json")

    def __repr__(self) -> str:
        return f"_Headers({', '.join(self.headers)})"
