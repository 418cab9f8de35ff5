"""What users send, for bench/batching.py: default sampling, natural stops, ragged prompts, a few at a time.

A workload is `requests` chat completions (three short questions to one long document-and-question prompt)
sent by one asyncio thread that keeps `concurrency` in flight, each streamed, with `max_completion_tokens`
and nothing else (no temperature, no top_p: what the OpenAI SDK sends for a caller who sets nothing).
Per request it records the time to the first visible content token, the completion tokens the server
reports (reasoning included) and the time to `[DONE]`; `Figures` sums them up.

`bare_replay` is the limit for such a workload: bare batched `llama_decode` with the same number of
sequences, the same prompts, and each sequence decoding exactly the completion tokens a server produced
for that request (end tokens masked, greedy argmax), a freed sequence refilled at the next step. So the
work is equal and what is left is the serving: HTTP, scheduling, sampling, hidden-reasoning passes.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from tokentill.catalog import default_weights_path

SHORT = (
    "What is the capital of France? Answer in one sentence.",
    "Give me three tips for writing clear emails.",
    "Explain what a hash table is to a beginner.",
    "Write a haiku about autumn rain.",
    "Why is the sky blue?",
    "List four uses of a paperclip.",
)


def prompts(requests: int, round_: int) -> list[str]:
    """`requests` prompts, every fourth a long one (≈ 600 tokens); the round number makes each round's
    text new, so no round is served from an earlier round's prefix cache."""
    out = []
    for i in range(requests):
        tag = f"(request {i} of round {round_})"
        if i % 4 == 3:
            notes = " ".join(
                f"Entry {k}: on day {k + round_} the warehouse in sector {(k * 7 + i) % 13} received "
                f"{(k * 37 + i) % 90 + 10} crates of parts and shipped {(k * 11 + i) % 50 + 5} of them."
                for k in range(24)
            )
            out.append(f"Logbook {tag}:\n{notes}\n\nSummarise the logbook above in a short paragraph.")
        else:
            out.append(f"{SHORT[(i + round_) % len(SHORT)]} {tag}")
    return out


@dataclass(frozen=True)
class Request:
    ttft: float  # seconds from sending to the first visible content token (nan: none came)
    tokens: int  # completion tokens, reasoning included (content chunks when the server reports no usage)
    seconds: float  # sending to [DONE]
    finish: str | None = None
    reported: bool = True  # whether `tokens` is the server's usage figure


@dataclass(frozen=True)
class Figures:
    aggregate: float  # all completion tokens / wall time of the workload
    ttft_p50: float
    ttft_p95: float
    per_request: float  # median of each request's tokens / seconds
    counts: tuple[int, ...]  # completion tokens per request, in prompt order

    @staticmethod
    def of(requests: list[Request], wall: float) -> Figures:
        ttfts = sorted(r.ttft for r in requests if r.ttft == r.ttft)
        return Figures(
            aggregate=sum(r.tokens for r in requests) / wall,
            ttft_p50=statistics.median(ttfts) if ttfts else float("nan"),
            ttft_p95=_p95(ttfts),
            per_request=statistics.median(r.tokens / r.seconds for r in requests),
            counts=tuple(r.tokens for r in requests),
        )

    @staticmethod
    def median(rounds: list[Figures]) -> Figures:
        return Figures(
            aggregate=statistics.median(f.aggregate for f in rounds),
            ttft_p50=statistics.median(f.ttft_p50 for f in rounds),
            ttft_p95=statistics.median(f.ttft_p95 for f in rounds),
            per_request=statistics.median(f.per_request for f in rounds),
            counts=tuple(c for f in rounds for c in f.counts),
        )


def _p95(values: list[float]) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, round(0.95 * (len(values) - 1)))]


async def stream(url: str, headers: dict[str, str], body: dict[str, Any]) -> Request:
    """One streamed chat completion over raw HTTP/1.1 (no client library: one light thread for all)."""
    target = urlsplit(url)
    reader, writer = await asyncio.open_connection(target.hostname, target.port)
    payload = json.dumps(body).encode()
    head = [
        f"POST {target.path} HTTP/1.1",
        f"Host: {target.netloc}",
        "Content-Type: application/json",
        f"Content-Length: {len(payload)}",
        "Connection: close",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    start = time.perf_counter()
    writer.write("\r\n".join(head).encode() + b"\r\n\r\n" + payload)
    status = await reader.readline()
    if b" 200 " not in status:
        raise RuntimeError(f"{status!r}: {await reader.read(2000)!r}")
    chunked = False
    while (line := await reader.readline()) not in (b"\r\n", b""):
        chunked |= line.lower().startswith(b"transfer-encoding: chunked")
    buffer, first, usage, chunks, done, finish = b"", float("nan"), None, 0, False, None
    while True:
        if chunked:
            size = int((await reader.readline()).strip() or b"0", 16)
            if size == 0:
                break
            buffer += (await reader.readexactly(size + 2))[:-2]
        else:
            data = await reader.read(65536)
            if not data:
                break
            buffer += data
        buffer = buffer.replace(b"\r\n", b"\n")  # sse-starlette (llama_cpp.server) ends lines with CRLF
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            if event == b"data: [DONE]":
                done = True
            elif event.startswith(b"data: {"):
                chunk = json.loads(event[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]["completion_tokens"]
                choices = chunk.get("choices") or []
                if choices and choices[0].get("finish_reason"):
                    finish = choices[0]["finish_reason"]
                if choices and choices[0].get("delta", {}).get("content"):
                    chunks += 1
                    if first != first:
                        first = time.perf_counter() - start
    seconds = time.perf_counter() - start
    writer.close()
    if not done:
        raise RuntimeError("stream ended without [DONE]")
    # llama_cpp.server reports no usage in a stream: one content chunk per token there
    return Request(first, usage if usage is not None else chunks, seconds, finish, usage is not None)


def run(url: str, headers: dict[str, str], bodies: list[dict[str, Any]], concurrency: int) -> Figures:
    """Send `bodies`, at most `concurrency` in flight, from one asyncio thread."""

    async def all_of_them() -> list[Request]:
        gate = asyncio.Semaphore(concurrency)

        async def one(body: dict[str, Any]) -> Request:
            async with gate:
                return await stream(url, headers, body)

        return await asyncio.gather(*(one(body) for body in bodies))

    start = time.perf_counter()
    requests = asyncio.run(all_of_them())
    return Figures.of(requests, time.perf_counter() - start)


def bodies(model: str, texts: list[str], max_tokens: int, *, budget_field: str) -> list[dict[str, Any]]:
    """Default sampling: only the budget (`max_completion_tokens` for tokentill, `max_tokens` for
    llama_cpp.server, which does not read the newer name)."""
    return [
        {
            "model": model,
            "messages": [{"role": "user", "content": text}],
            budget_field: max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        for text in texts
    ]


def bare_context(lib: Any, llm: Any, sequences: int, context: int, threads: int) -> tuple[Any, Any]:
    """A llama.cpp context and batch with tokentill's engine's settings: one KV stream per sequence,
    `context` tokens each, flash attention off, room for a 512-token chunk plus a row per sequence."""
    params = lib.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch = sequences * context, 512 + sequences, 512
    params.n_seq_max, params.kv_unified = sequences, False
    params.n_threads = params.n_threads_batch = threads
    params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_DISABLED  # as tokentill's engine
    params.no_perf = True
    ctx = lib.llama_init_from_model(llm.model, params)
    if not ctx:
        raise RuntimeError(f"llama.cpp could not create a context of {sequences} x {context} tokens")
    return ctx, lib.llama_batch_init(512 + sequences, 0, 1)


def decode_rows(lib: Any, ctx: Any, batch: Any, items: list[tuple[int, int, int, bool]]) -> None:
    """One `llama_decode` of (sequence, token, position, wants logits) rows."""
    for k, (seq, token, pos, logits) in enumerate(items):
        batch.token[k], batch.pos[k], batch.n_seq_id[k], batch.logits[k] = token, pos, 1, logits
        batch.seq_id[k][0] = seq
    batch.n_tokens = len(items)
    if lib.llama_decode(ctx, batch) != 0:
        raise RuntimeError("llama_decode failed")


def bare_replay(
    texts: list[str],
    counts: tuple[int, ...],
    concurrency: int,
    threads: int,
    banned: list[int],
    context: int,
) -> Figures:
    """Bare batched `llama_decode` doing the work a server did: `concurrency` sequences, request i's prompt
    evaluated in a decode of its own when a sequence frees (as tokentill does), then exactly `counts[i]`
    tokens (greedy, end tokens masked) in one batched step per token with the other running sequences.
    A request counts as sent when its sequence freed (the first `concurrency` at the start), as a client
    keeping `concurrency` in flight would send it. `context`: tokens per sequence, the server's."""
    import llama_cpp
    import numpy as np

    lib: Any = llama_cpp
    llm = llama_cpp.Llama(
        model_path=str(default_weights_path()), n_ctx=256, n_batch=64, n_threads=threads, verbose=False
    )
    ctx, batch = bare_context(lib, llm, concurrency, context, threads)
    memory = lib.llama_get_memory(ctx)
    n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(llm.model))
    tokenized = [
        llm.tokenize(
            f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n".encode(),
            add_bos=False,
            special=True,
        )[: context - max(counts) - 1]
        for text in texts
    ]

    def decode(items: list[tuple[int, int, int, bool]]) -> None:
        decode_rows(lib, ctx, batch, items)

    def argmax(row: int) -> int:
        logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, row), shape=(n_vocab,))
        logits[banned] = -np.inf
        return int(np.argmax(logits))

    queue = list(range(len(texts)))
    running: dict[int, list[Any]] = {}  # seq -> [request, next token, position, left, sent, first]
    done: list[tuple[int, Request]] = []
    try:
        start = time.perf_counter()
        # (sequence, when it freed): a client with `concurrency` in flight sends the next request then
        free = [(seq, start) for seq in range(concurrency)]
        while queue or running:
            while queue and free:
                (seq, admitted), i = free.pop(0), queue.pop(0)
                lib.llama_memory_seq_rm(memory, seq, -1, -1)
                prompt = tokenized[i]
                for at in range(0, len(prompt), 512):
                    part = prompt[at : at + 512]
                    decode([(seq, t, at + k, at + k == len(prompt) - 1) for k, t in enumerate(part)])
                token = argmax(len(part) - 1)
                running[seq] = [
                    i,
                    token,
                    len(prompt),
                    counts[i] - 1,
                    admitted,
                    time.perf_counter() - admitted,
                ]
            for seq in [s for s, state in running.items() if state[3] <= 0]:
                i, _, _, _, admitted, first = running.pop(seq)
                now = time.perf_counter()
                done.append((i, Request(first, counts[i], now - admitted)))
                free.append((seq, now))
            if not running:
                continue
            order = list(running)
            decode([(seq, running[seq][1], running[seq][2], True) for seq in order])
            for row, seq in enumerate(order):
                state = running[seq]
                state[1], state[2], state[3] = argmax(row), state[2] + 1, state[3] - 1
        wall = time.perf_counter() - start
    finally:
        lib.llama_batch_free(batch)
        lib.llama_free(ctx)
        llm.close()
    return Figures.of([r for _, r in sorted(done, key=lambda d: d[0])], wall)
