"""The embedded llama.cpp engine (llama-cpp-python), the default way tokentill serves a GGUF.

Threads: `start()` loads the weights in a worker thread, then one scheduler thread (`scheduler.py`) owns
the llama context: every `llama_decode` and sampler call happens there, never on the event loop.
Continuous batching (`batch.py`): up to `parallel` requests decode together in one `llama_decode` per
token; each has `spec.context` tokens of its own (the context is per sequence, so the engine holds
parallel × context KV cells), and that per-sequence context is what `capabilities.context_length`
reports and what prompt + completion are clamped to.
`count_prompt_tokens` tokenizes on the caller's thread while the scheduler decodes; that is safe because
`llama_tokenize` only reads the vocabulary, which is immutable after load (llama.cpp's own server tokenizes
on its HTTP threads the same way). The chat template is a pure Jinja render.

Usage accounting (the contract billing relies on):
  * `prompt_tokens` is exactly `count_prompt_tokens(request)`: the same render and tokenization.
  * `completion_tokens` counts every sampled token except the end-of-generation token (EOS/EOT), which
    produces no text; the tokens that complete a stop string are counted, as they were generated.
  * `cached_tokens` counts prompt tokens whose KV entries were reused from an earlier request (the
    free slot whose cached tokens share the longest prefix with the prompt is chosen).
  * `image_tokens` counts the prompt tokens that stand for images (included in `prompt_tokens`).
  * every sampled token reaches the consumer on a `TextDelta` as it is sampled (see `text.py`), so a
    request cut short is billed for exactly the tokens generated.

Native reasoning (`spec.reasoning == "native"`): the engine itself splits `<think>…</think>` off as
`reasoning=True` deltas, applies stop strings to the answer only, and starts inside the block when the
rendered prompt ends with `<think>` (templates that pre-fill it). Think tags that the GGUF marks as control
tokens are still detokenized as text (see `batch.py`).

Follow-ups (`EngineRequest.follow_up`, the scratchpad's answer pass): the first pass's output becomes an
assistant turn; the template is rendered once more with a marker in its place, and only the text after
the marker (end of turn, the follow-up's turns, the assistant header) is tokenized and appended to the
same sequence (`FollowUpPass`). A template whose text before the marker is not the first pass's prompt
declines the follow-up. The follow-up's own usage counts the whole sequence before its answer as its
prompt, and what was already in the cells as cached.

Vision (`spec.mmproj`): `vision.VisionEncoder` loads the projector beside the weights. A request with
images is rendered with a media marker per image and tokenized by libmtmd **on the decode thread**
(`Scheduler.call`), for `count_prompt_tokens` as for `generate`; its prefill decodes text and image chunks
in order into its own sequence, on its own (not batched with other prompts); its tokens then decode in the
shared batch. KV reuse across requests covers only the text before the first image (another image, or
even the same one, is always encoded again).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import os
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from tokentill.catalog import ModelSpec
from tokentill.engines.base import THINK_OPEN, Capabilities, EngineHealth, EngineRequest, FollowUp
from tokentill.engines.batch import BatchedLlamaRunner
from tokentill.engines.chat_template import ChatTemplate
from tokentill.engines.scheduler import SamplingParams, Scheduler, Sequence, new_channel, stream
from tokentill.engines.sequence import FollowUpPass
from tokentill.engines.threads import ThreadTuner
from tokentill.engines.vision import PromptCounts, VisionEncoder, VisionError
from tokentill.errors import APIError, InvalidRequest, UpstreamError
from tokentill.structured.tools import parse_tool_calls, template_messages
from tokentill.types import EngineEvent, Finished, Grammar, ImageInput, Message

__all__ = ["DEFAULT_PARALLEL", "LlamaCppEngine"]

logger = logging.getLogger(__name__)

# Sequences decoded together when neither the catalogue nor the caller says: one, as before batching.
# The server always passes `Settings.max_parallel` (default 8, see docs/performance.md).
DEFAULT_PARALLEL = 1

# Stands for the first pass's output when the template renders a follow-up (see the module docstring).
_OUTPUT_MARKER = "\ue000tokentill-output\ue000"


@dataclass(frozen=True)
class _MediaPrompt:
    """A prompt with images: the rendered text (one marker per image) and the images, in order."""

    text: str
    images: tuple[ImageInput, ...]
    add_special: bool


class LlamaCppEngine:
    """`Engine` for a local GGUF. Threads: at most `spec.n_threads`, else `n_threads`, else `os.cpu_count()`;
    with `adapt_threads` the decode loop measures whether fewer decode faster (`threads.ThreadTuner`, for
    a busy machine), else it keeps that count.

    Parallel sequences: `spec.parallel`, else `max_parallel`, else `DEFAULT_PARALLEL`; `queue_size` more
    requests may wait (FIFO) before new ones get 503.
    """

    def __init__(
        self,
        spec: ModelSpec,
        *,
        queue_size: int,
        n_threads: int | None,
        max_parallel: int | None = None,
        adapt_threads: bool = True,
    ) -> None:
        self.spec = spec
        self._parallel = spec.parallel or max_parallel or DEFAULT_PARALLEL
        self.capabilities = Capabilities(
            context_length=spec.context,
            vision=spec.mmproj is not None,
            reasoning=spec.reasoning,
            grammar=True,
            follow_up=True,
        )
        self._vision: VisionEncoder | None = None
        self._queue_size = queue_size
        self._n_threads = spec.n_threads or n_threads or os.cpu_count() or 1
        self._adapt_threads = adapt_threads
        self._llm: Any = None
        self._template: ChatTemplate | None = None
        self._add_bos = False
        self._bos_text = ""
        self._scheduler: Scheduler | None = None
        self._runner: BatchedLlamaRunner | None = None

    async def start(self) -> None:
        """Load the weights off the event loop, then start the decode thread."""
        if self._scheduler is not None:
            return
        self._llm = await asyncio.to_thread(self._load)
        try:
            runner = await asyncio.to_thread(self._new_runner)
        except BaseException:
            await self.aclose()
            raise
        self._runner = runner
        # llama.cpp may round the per-sequence context down: report (and clamp to) what it holds.
        self.capabilities = dataclasses.replace(self.capabilities, context_length=runner.n_ctx_seq)
        self._scheduler = Scheduler(
            runner, queue_size=self._queue_size, name=self.spec.id, max_active=self._parallel
        )
        self._scheduler.start()

    def _load(self) -> Any:
        import llama_cpp

        path = self.spec.weights_path()
        started = time.monotonic()
        # The Llama object gives weights, vocabulary and metadata; its own context stays tiny and unused
        # (the runner creates the multi-sequence context, which Llama's constructor cannot ask for).
        llm = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=256,
            n_batch=64,
            n_threads=self._n_threads,
            n_threads_batch=self._n_threads,
            verbose=False,
        )
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        bos, eos = llm.token_bos(), llm.token_eos()
        self._bos_text = llm.detokenize([bos], special=True).decode("utf-8", "replace") if bos >= 0 else ""
        eos_text = llm.detokenize([eos], special=True).decode("utf-8", "replace") if eos >= 0 else ""
        self._add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
        self._template = ChatTemplate(llm.metadata, bos_token=self._bos_text, eos_token=eos_text)
        if self.spec.mmproj is not None:
            try:
                self._vision = VisionEncoder(llm, self.spec.mmproj, n_threads=self._n_threads)
            except VisionError as exc:
                llm.close()
                raise RuntimeError(f"model {self.spec.id!r}: mmproj: {exc}") from exc
        logger.info(
            "loaded %s (%s) in %.2fs: n_threads=%d",
            self.spec.id, path.name, time.monotonic() - started, self._n_threads,
        )  # fmt: skip
        return llm

    def _new_runner(self) -> BatchedLlamaRunner:
        runner = BatchedLlamaRunner(
            self._llm,
            parallel=self._parallel,
            n_ctx_seq=self.spec.context,
            n_threads=self._n_threads,
            vision=self._vision,
            tuner=ThreadTuner(self._n_threads, name=self.spec.id) if self._adapt_threads else None,
        )
        logger.info(
            "%s: %d parallel sequences × %d tokens of context, %s",
            self.spec.id, self._parallel, runner.n_ctx_seq,
            f"at most {self._n_threads} threads (adaptive)" if self._adapt_threads
            else f"{self._n_threads} threads",
        )  # fmt: skip
        return runner

    # --- Engine ------------------------------------------------------------------------------------------

    def count_prompt_tokens(self, request: EngineRequest) -> int:
        """Exact prompt tokens; callable from the event loop while the decode thread runs (see module doc)."""
        media = self._media_prompt(request)
        if media is None:
            return len(self._tokenize_prompt(request))
        timeout = max(0.0, request.deadline - time.monotonic())
        try:
            return self._count_media(media).result(timeout=timeout).total
        except concurrent.futures.TimeoutError:
            raise request.deadline_error() from None

    async def generate(self, request: EngineRequest) -> AsyncGenerator[EngineEvent, None]:
        """TextDelta events, then one Finished; raises the `tokentill.errors` listed in `engines.base`."""
        scheduler = self._require_started()
        self._check_logit_bias(request)
        media = self._media_prompt(request)
        prompt: list[int] = []
        counts = PromptCounts(total=0, image=0)
        marker = None
        if media is None:
            rendered, add_bos = self._render(request)
            prompt = self._tokenize(rendered, add_bos)
            counts = PromptCounts(total=len(prompt), image=0)
        else:
            rendered, marker = media.text, self._vision.marker if self._vision is not None else None
            counts = await asyncio.wrap_future(self._count_media(media))
        native = self.capabilities.reasoning == "native"
        # A template that pre-fills `<think>` (DeepSeek-R1 distills, QwQ): the output starts inside it.
        thinking = native and rendered.rstrip().endswith(THINK_OPEN)
        n_ctx = self.capabilities.context_length
        n_prompt = counts.total
        if n_prompt >= n_ctx:
            raise InvalidRequest(
                f"This model's maximum context length is {n_ctx} tokens. However, your messages resulted "
                f"in {n_prompt} tokens. Please reduce the length of the messages.",
                code="context_length_exceeded",
                param="messages",
            )
        sampling = SamplingParams(
            request.temperature,
            request.top_p,
            request.seed,
            logit_bias=request.logit_bias,
            frequency_penalty=request.frequency_penalty,
            presence_penalty=request.presence_penalty,
            grammar=_with_thinking(request.grammar, thinking) if native else request.grammar,
        )
        follow_up = request.follow_up
        plan = None if follow_up is None else self._follow_up(request, follow_up, rendered, marker, sampling)
        seq = Sequence(
            request_id=request.request_id,
            prompt=prompt,
            max_new_tokens=max(1, min(request.max_tokens, n_ctx - n_prompt)),
            sampling=sampling,
            stop=request.stop,
            deadline=request.deadline,
            timeout_s=request.deadline - request.started,
            channel=new_channel(),
            media=media,
            media_prompt_tokens=counts.total,
            image_tokens=counts.image,
            continuation=request.continuation,
            think_tags=native,
            thinking=thinking,
            follow_up=plan,
        )
        # stream() withdraws the sequence when this generator is closed or cancelled (client disconnect).
        tokens = stream(scheduler, seq)
        events = tokens
        calls = bool(request.tools) and request.tool_choice.mode != "none"
        if plan is not None and follow_up is not None:
            events = _then(tokens, parse=bool(request.tools) and follow_up.tool_choice.mode != "none")
        elif calls:
            events = parse_tool_calls(tokens)  # the calls the model writes, as OpenAI's deltas
        try:
            async for event in events:
                yield event
        finally:
            await events.aclose()
            await tokens.aclose()

    def _follow_up(
        self,
        request: EngineRequest,
        follow_up: FollowUp,
        rendered: str,
        marker: str | None,
        sampling: SamplingParams,
    ) -> FollowUpPass | None:
        """The follow-up's prompt: the template's text after the first pass's output; None to decline."""
        turn = Message(role="assistant", text=_OUTPUT_MARKER)
        whole, _ = self._render(
            dataclasses.replace(request, messages=(*request.messages, turn, *follow_up.after)), marker
        )
        before, found, after = whole.partition(_OUTPUT_MARKER)
        if not found or before != rendered or not after:
            logger.info("%s: the chat template cannot continue a pass in place", self.spec.id)
            return None
        return FollowUpPass(
            prompt=self._tokenize(after, False),
            budget=follow_up.max_tokens,
            sampling=dataclasses.replace(sampling, grammar=follow_up.grammar),
            stop=follow_up.stop,
        )

    def health(self) -> EngineHealth:
        scheduler = self._scheduler
        if scheduler is None:
            return EngineHealth(replicas_up=0, replicas=1, queued=0, running=0)
        threads = self._runner.threads if self._runner is not None else None
        return EngineHealth(
            replicas_up=1, replicas=1, queued=scheduler.queued, running=scheduler.running, threads=threads
        )

    def tokens_decoded(self, request_id: str) -> int | None:
        """Tokens sampled for a retired request (None if unknown); lets tests see that cancel stopped work."""
        return self._scheduler.tokens_decoded(request_id) if self._scheduler is not None else None

    def prompt_tokens_evaluated(self, request_id: str) -> int | None:
        """Prompt tokens a retired request had evaluated, every pass included (None if unknown)."""
        return self._scheduler.prompt_tokens_evaluated(request_id) if self._scheduler is not None else None

    async def aclose(self) -> None:
        """Stop the decode thread (queued and running requests get Overloaded), then free the model."""
        scheduler, self._scheduler = self._scheduler, None
        if scheduler is not None:
            await asyncio.to_thread(scheduler.close)
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.close()  # the decode thread has stopped: nothing else touches the context
        vision, self._vision = self._vision, None
        if vision is not None:
            vision.close()  # the decode thread has stopped: nothing else touches the mtmd context
        llm, self._llm = self._llm, None
        if llm is not None:
            llm.close()

    # --- helpers -----------------------------------------------------------------------------------------

    def _require_started(self) -> Scheduler:
        if self._scheduler is None:
            raise UpstreamError("The model is not loaded.")
        return self._scheduler

    def _check_logit_bias(self, request: EngineRequest) -> None:
        """Every biased token must exist in this model's vocabulary (ids differ between models)."""
        n_vocab = self._runner.n_vocab if self._runner is not None else 0
        for token, _ in request.logit_bias:
            if token >= n_vocab:
                raise InvalidRequest(
                    f"Invalid key in 'logit_bias': {token}. The model '{self.spec.id}' has {n_vocab} "
                    f"tokens (ids 0 to {n_vocab - 1}).",
                    code="invalid_value",
                    param="logit_bias",
                )

    def _render(self, request: EngineRequest, marker: str | None = None) -> tuple[str, bool]:
        """(prompt text, whether tokenizing it must add BOS)."""
        if self._llm is None or self._template is None:
            raise UpstreamError("The model is not loaded.")
        try:
            messages = template_messages(request.messages, request.tools, request.tool_choice)
            text = self._template.render(messages, media_marker=marker)
        except Exception as exc:  # jinja TemplateError, or the template's raise_exception (ValueError)
            raise InvalidRequest(
                f"The messages do not fit this model's chat template: {exc}", param="messages"
            ) from exc
        return text, self._add_bos and not (self._bos_text and text.startswith(self._bos_text))

    def _tokenize_prompt(self, request: EngineRequest) -> list[int]:
        return self._tokenize(*self._render(request))

    def _tokenize(self, text: str, add_bos: bool) -> list[int]:
        return list(self._llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True))

    def _media_prompt(self, request: EngineRequest) -> _MediaPrompt | None:
        images = tuple(image for message in request.messages for image in message.images)
        if not images:
            return None
        if self._vision is None:
            raise InvalidRequest(
                "This model does not accept image input. To enable vision, give its catalogue entry an "
                "`mmproj` projector file (see docs/vision.md).",
                code="image_input_unsupported",
                param="messages",
            )
        text, add_bos = self._render(request, self._vision.marker)
        return _MediaPrompt(text=text, images=images, add_special=add_bos)

    def _count_media(self, media: _MediaPrompt) -> concurrent.futures.Future[PromptCounts]:
        """Tokenize `media` on the decode thread (it owns the mtmd context); libmtmd failures → 502."""
        scheduler, vision = self._require_started(), self._vision
        assert vision is not None, "_media_prompt checked the projector"

        def count() -> PromptCounts:
            try:
                return vision.count(media.text, media.images, add_special=media.add_special)
            except APIError:
                raise
            except Exception as exc:  # VisionError, or Pillow on bytes that are not an image
                logger.warning(
                    "libmtmd could not tokenize a prompt with %d image(s): %s", len(media.images), exc
                )
                raise UpstreamError("The model could not process the image.") from exc

        return scheduler.call(count)


def _with_thinking(grammar: Grammar | None, thinking: bool) -> Grammar | None:
    """A `native` model's grammar: its `<think>…</think>` block (free text without `<`) before the
    constrained answer; already open when the template pre-filled `<think>`. Lazy grammars need nothing:
    they apply from their trigger on."""
    if grammar is None or grammar.triggers:
        return grammar
    answer = grammar.text.replace("root ::= ", "answer-root ::= ", 1)
    block = 'think-body "</think>" [ \\n]{0,2}'
    prefix = block if thinking else f'( "<think>" {block} )?'
    return Grammar(f"root ::= {prefix} answer-root\nthink-body ::= [^<]*\n{answer}")


async def _then(
    events: AsyncGenerator[EngineEvent, None], *, parse: bool
) -> AsyncGenerator[EngineEvent, None]:
    """A pass and its follow-up: the calls the model writes are parsed in the follow-up only."""
    async for event in events:
        yield event
        if isinstance(event, Finished):
            break
    rest = parse_tool_calls(events) if parse else events
    try:
        async for event in rest:
            yield event
    finally:
        await rest.aclose()
