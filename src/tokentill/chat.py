"""One chat completion from validated request to settled bill: the service behind both chat routes.

`ChatService.prepare` runs every check that can refuse a request (model, permission, images, context,
rate limits, credits) and ends holding a credit reservation and a rate-limit lease. `ChatService.settle`
closes both with what the run came to:

    finished                             → charge the real usage, release the rest
    client went away (499)               → charge the tokens generated so far
    engine failed (timeout, 5xx)         → charge nothing, unless tokens were already streamed: those

Who runs the engine and calls `settle` exactly once, on every exit, is `lifecycle.Run`. Nothing here
knows about HTTP; the api package renders the events as JSON or SSE.

An engine whose generation begins with a network request (`Capabilities.early_start`: an upstream server)
is asked while the credit hold commits, when the account's last known balance covers the hold: the
request's round trip to the upstream and the database's commit overlap instead of adding up. Nothing
reaches the client before `prepare` returns with the hold committed; a hold that is refused (or a
`prepare` that fails or is cancelled) stops that generation before anything else happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field, replace

import anyio

from tokentill import errors, metrics
from tokentill.auth.service import Principal
from tokentill.billing import pricing
from tokentill.billing.group_commit import HoldBook
from tokentill.billing.ledger import Hold, KeyChanged, KeyTerms, Ledger, UsageRecord
from tokentill.billing.money import format_credits
from tokentill.billing.settlement import Settlements
from tokentill.catalog import Catalog, ModelSpec
from tokentill.engines.base import Engine, EngineRequest
from tokentill.limits import KeyLimits, Lease, RateLimiter
from tokentill.media.service import ImageRef, MediaService
from tokentill.protocol.chat import ChatCompletionRequest, ImagePart
from tokentill.structured.tools import constraint
from tokentill.types import EngineEvent, Finished, ImageInput, Message

__all__ = ["ChatService", "PreparedChat"]

log = logging.getLogger(__name__)

_ROLE_FOR_ENGINE = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
}


_KNOWN_BALANCES = 65_536  # accounts whose last balance a process remembers (forgotten all at once past it)


def _limits(principal: Principal) -> KeyLimits:
    return KeyLimits(rpm=principal.rpm, tpm=principal.tpm, max_concurrent=principal.max_concurrent)


class EarlyStart:
    """A generation asked for before its hold committed: the first event is fetched in a task of its own
    from the start, the rest by whoever iterates `events()`. `cancel` stops it whatever state it is in."""

    def __init__(self, events: AsyncGenerator[EngineEvent, None]) -> None:
        self._events = events
        self._first: asyncio.Future[EngineEvent] = asyncio.ensure_future(anext(events))

    async def events(self) -> AsyncGenerator[EngineEvent, None]:
        """The generation's events, the first included; closing this stops the generation."""
        ended = False  # the generation ran to its end: nothing is left to stop
        try:
            try:
                first = await self._first
            except StopAsyncIteration:
                return
            yield first
            async for event in self._events:
                yield event
            ended = True
        finally:
            if not ended:  # a shielded scope costs ~5 µs: only where something may still be running
                await self.cancel()

    async def cancel(self) -> None:
        """Stop the generation: the first fetch if it still runs (its failure is not this caller's), then
        the generator. Safe to call again."""
        with anyio.CancelScope(shield=True):
            if not self._first.done():
                self._first.cancel()
            with contextlib.suppress(BaseException):
                await self._first
            await self._events.aclose()


@dataclass(frozen=True)
class PreparedChat:
    """A request that passed every check and holds its reservations until `ChatService.settle`."""

    request_id: str
    principal: Principal
    spec: ModelSpec
    engine: Engine
    engine_request: EngineRequest
    prompt_tokens: int
    hold: Hold
    lease: Lease
    balance_after_hold: int
    started: float = field(default_factory=time.monotonic)
    include_reasoning: bool = False
    stream: bool = False  # tokens reach the client as they are made (decides what a failure costs)
    early: EarlyStart | None = None  # the generation, when it was asked for while the hold committed

    def generate(self) -> AsyncGenerator[EngineEvent, None]:
        """The engine's events for this request (closing them stops the generation)."""
        if self.early is not None:
            return self.early.events()
        return self.engine.generate(self.engine_request)

    async def abandon(self) -> None:
        """Stop a generation asked for early that will never be iterated (the run ended before it)."""
        if self.early is not None:
            await self.early.cancel()


class ChatService:
    def __init__(
        self,
        *,
        catalog: Catalog,
        engines: Mapping[str, Engine],
        ledger: Ledger,
        limiter: RateLimiter,
        media: MediaService,
        request_timeout_s: float,
        hold_ttl_s: float,
        settlements: Settlements | None = None,
        holds: HoldBook | None = None,
    ) -> None:
        """`settlements` keeps what the database refuses and retries it (the server always gives one);
        without it a refused settlement is logged and its hold left to the sweeper. `holds` takes the
        credit holds (`ledger` by default; the server gives its `GroupCommit` when group commit is on)."""
        self._catalog = catalog
        self._settlements = settlements
        self._holds: HoldBook = holds or ledger
        self._engines = engines
        self._ledger = ledger
        self._limiter = limiter
        self._media = media
        self._timeout = request_timeout_s
        self._hold_ttl = hold_ttl_s
        # Each account's balance after its last hold or settlement here: a hold it covers is expected to
        # pass, so the engine may be asked while it commits (see the module docstring).
        self._known_balances: dict[int, int] = {}

    def model(self, model_id: str) -> ModelSpec:
        spec = self._catalog.get(model_id)
        if spec is None:
            raise errors.NotFound(
                f"The model '{model_id}' does not exist or you do not have access to it.",
                code="model_not_found",
                param="model",
            )
        return spec

    async def prepare(
        self, principal: Principal, model_id: str, request: ChatCompletionRequest, request_id: str
    ) -> PreparedChat:
        spec = self.model(model_id)
        principal.check_model(spec.id)
        engine = self._engines[spec.id]
        if request.reasoning_effort is not None and engine.capabilities.reasoning == "none":
            raise errors.InvalidRequest(
                f"Unsupported parameter: 'reasoning_effort' is not supported with the model '{spec.id}', "
                "which does not reason.",
                code="unsupported_parameter",
                param="reasoning_effort",
            )
        messages = await self._messages(request, engine, principal, spec)
        explicit = request.completion_limit()
        draft = EngineRequest(
            request_id=request_id,
            messages=messages,
            max_tokens=explicit or 1,
            deadline=time.monotonic() + self._timeout,
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            seed=request.seed,
            stop=request.stop_sequences(),
            logit_bias=request.token_biases(),
            frequency_penalty=request.frequency_penalty or 0.0,
            presence_penalty=request.presence_penalty or 0.0,
            reasoning_effort=request.reasoning_effort or "medium",
            response_format=request.response_format_spec(),
            tools=request.tool_definitions(),
            tool_choice=request.tool_choice_spec(),
            parallel_tool_calls=request.parallel_tool_calls,
        )
        if engine.capabilities.grammar:
            # Compiled before anything is reserved: a schema the grammar cannot enforce is a plain 400.
            draft = replace(
                draft,
                grammar=constraint(
                    draft.response_format,
                    draft.tools,
                    draft.tool_choice,
                    # Only on request: a small model repeats its call until the budget is spent.
                    parallel=request.parallel_tool_calls is True,
                ),
            )
        if engine.capabilities.exact_prompt_tokens:  # a real tokenizer: CPU work off the event loop
            prompt_tokens = await anyio.to_thread.run_sync(engine.count_prompt_tokens, draft)
        else:  # an estimate from text lengths, cheaper than the thread hop (the engine counts it again)
            prompt_tokens = engine.count_prompt_tokens(draft)
        room = self._check_context(spec, engine, prompt_tokens, explicit)
        budget = await self._budget(principal, spec, prompt_tokens, explicit, room)
        lease = await self._limiter.acquire(principal.key_id, _limits(principal), prompt_tokens + budget)
        engine_request = replace(draft, max_tokens=budget)
        need = pricing.cost(prompt_tokens, budget, spec.price_input, spec.price_output)
        early: EarlyStart | None = None
        hold: Hold | None = None
        try:
            if engine.capabilities.early_start and self._known_balances.get(principal.account_id, -1) >= need:
                early = EarlyStart(engine.generate(engine_request))
            hold = await self._reserve(principal, request_id, need, prompt_tokens, budget)
        except BaseException:
            # Refused (or not taken at all): the next hold of this account waits for its commit.
            self._known_balances.pop(principal.account_id, None)
            with anyio.CancelScope(shield=True):
                if early is not None:
                    await early.cancel()
                if hold is not None:
                    await self._holds.release(hold)
                await lease.release()
            raise
        self._remember_balance(principal.account_id, hold.balance_after)
        return PreparedChat(
            request_id=request_id,
            principal=principal,
            spec=spec,
            engine=engine,
            engine_request=engine_request,
            prompt_tokens=prompt_tokens,
            hold=hold,
            lease=lease,
            balance_after_hold=hold.balance_after,
            include_reasoning=bool(request.include_reasoning),
            stream=bool(request.stream),
            early=early,
        )

    def _remember_balance(self, account_id: int, balance: int) -> None:
        if len(self._known_balances) >= _KNOWN_BALANCES and account_id not in self._known_balances:
            self._known_balances.clear()
        self._known_balances[account_id] = balance

    async def _reserve(
        self, principal: Principal, request_id: str, need: int, prompt_tokens: int, budget: int
    ) -> Hold:
        """The credit hold, taken only while the key is live with the limits this request was admitted
        under (the principal may come from a replica's key cache): `errors.StaleKey` otherwise."""
        terms = KeyTerms(principal.key_id, principal.rpm, principal.tpm, principal.max_concurrent)
        try:
            return await self._holds.reserve(
                account_id=principal.account_id,
                key_id=principal.key_id,
                request_id=request_id,
                amount=need,
                ttl_s=self._hold_ttl,
                need_description=f"{prompt_tokens} prompt + {budget} completion tokens",
                key=terms,
            )
        except KeyChanged as exc:
            raise errors.StaleKey(
                f"Incorrect API key provided: the key tt-{principal.key_id}-… was revoked or changed. Check "
                "the key you are using, or ask the operator of this server for a new one.",
                code="invalid_api_key",
            ) from exc

    async def settle(
        self, chat: PreparedChat, finished: Finished | None, generated: int, reasoning: int, status: int
    ) -> int | None:
        """Charge what the run came to (`finished`, or `generated` tokens of which `reasoning` hidden, and
        the response `status`), close the hold and return the lease; the balance after it (while the database
        is out: what the spooled settlement will leave), or None when it failed (logged; the hold is then
        left to the sweeper). Call exactly once per prepared chat."""
        image_tokens = 0
        if finished is not None:
            usage = finished.usage
            prompt, completion = usage.prompt_tokens, usage.completion_tokens
            reasoning, cached, estimated = usage.reasoning_tokens, usage.cached_tokens, usage.estimated
            image_tokens = usage.image_tokens
        else:
            # No final usage from the engine: the prompt count is ours (an estimate for engines without
            # an exact tokenizer) and the completion count is the tokens seen so far.
            prompt, completion, cached = chat.prompt_tokens, generated, 0
            estimated = not chat.engine.capabilities.exact_prompt_tokens
        record = UsageRecord(
            request_id=chat.request_id,
            key_id=chat.principal.key_id,
            model=chat.spec.id,
            prompt_tokens=prompt,
            completion_tokens=completion,
            reasoning_tokens=reasoning,
            cached_tokens=cached,
            image_tokens=image_tokens,
            status=status,
            latency_ms=int((time.monotonic() - chat.started) * 1000),
            estimated=estimated,
        )
        # What a request that did not finish costs: a client that went away pays for the tokens made for
        # it; an engine failure costs nothing unless those tokens were already streamed to the client.
        free = finished is None and (generated == 0 or (status != 499 and not chat.stream))
        cost = 0
        balance: int | None = None
        try:
            if free:
                record = replace(record, completion_tokens=0, reasoning_tokens=0)
            else:
                # Cached prompt tokens are billed at the cached price; the row keeps what that saved.
                cached = min(cached, prompt)
                saving = pricing.cached_saving(prompt, cached, chat.spec.price_input, chat.spec.cached_price)
                cost = pricing.cost(
                    prompt,
                    completion,
                    chat.spec.price_input,
                    chat.spec.price_output,
                    cached_tokens=cached,
                    price_cached_input=chat.spec.cached_price,
                )
                record = replace(record, cached_saving=saving)
            if self._settlements is None:
                balance = await (
                    self._holds.release(chat.hold, usage=record)
                    if free
                    else self._holds.settle(chat.hold, cost=cost, usage=record)
                )
            else:
                balance = await (
                    self._settlements.release(chat.hold, usage=record)
                    if free
                    else self._settlements.settle(chat.hold, cost=cost, usage=record)
                )
                if balance is None:
                    # Spooled while the database is out: the header shows what the settlement will
                    # leave (the hold's balance plus what it gives back), not a 503 for a delivered answer.
                    balance = chat.balance_after_hold + chat.hold.amount - min(cost, chat.hold.amount)
            self._remember_balance(chat.principal.account_id, balance)
            metrics.observe_request(record, cost, time.monotonic() - chat.started)
        except Exception:
            # The hold stays open and the sweeper releases it after hold_ttl_s: logged, never lost.
            log.exception("settling request %s failed; its hold is left to expire", chat.request_id)
        finally:
            # The rate-limit lease is returned whatever happened to the ledger: a database error must not
            # keep the key's concurrency slot and reserved tokens until the lease expires.
            try:
                if free:
                    await chat.lease.release()
                else:
                    await chat.lease.settle(prompt + completion)
            except Exception:
                log.exception("returning the rate-limit lease of request %s failed", chat.request_id)
        return balance

    async def balance(self, account_id: int) -> int:
        return await self._ledger.balance(account_id)

    async def limit_headers(self, principal: Principal) -> dict[str, str]:
        """The key's x-ratelimit-* headers as they stand, taking nothing (responses never admitted)."""
        return await self._limiter.peek(principal.key_id, _limits(principal))

    def _check_context(
        self, spec: ModelSpec, engine: Engine, prompt_tokens: int, explicit: int | None
    ) -> int:
        if spec.max_output is not None and explicit is not None and explicit > spec.max_output:
            raise errors.InvalidRequest(
                f"max_completion_tokens is too large: {explicit}. This model supports at most "
                f"{spec.max_output} completion tokens.",
                code="invalid_value",
                param="max_completion_tokens",
            )
        context = min(spec.context, engine.capabilities.context_length)
        if not engine.capabilities.exact_prompt_tokens:
            # An estimate must not refuse what the real tokenizer accepts: the engine's server judges the
            # context (its 400 context_length_exceeded passes through); the hold is priced on the estimate.
            if explicit is not None:
                return explicit
            # When the estimate leaves no room the real prompt may still fit: the budget falls back to the
            # model's output cap (or a quarter of the context) rather than collapsing to one token.
            return context - prompt_tokens if context > prompt_tokens else spec.max_output or context // 4
        room = context - prompt_tokens
        if room < 1 or (explicit is not None and explicit > room):
            asked = f" and {explicit} in the completion" if explicit is not None else ""
            raise errors.InvalidRequest(
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{prompt_tokens + (explicit or 0)} tokens ({prompt_tokens} in the messages{asked}). "
                "Please reduce the length of the messages or completion.",
                code="context_length_exceeded",
                param="messages",
            )
        return room

    async def _budget(
        self, principal: Principal, spec: ModelSpec, prompt_tokens: int, explicit: int | None, room: int
    ) -> int:
        """The completion budget: the client's own, or the rest of the context capped at the model's
        `max_output` and at what the balance affords."""
        if explicit is not None:
            return explicit
        affordable = await self._check_affordable(principal, spec, prompt_tokens)
        budget = min(room, affordable, spec.max_output or room)
        if principal.tpm is not None and prompt_tokens < principal.tpm:
            # A key limited to N tokens a minute could never be admitted with a default budget above
            # what is left of N after the prompt: the budget it did not ask for shrinks instead.
            budget = min(budget, principal.tpm - prompt_tokens)
        return budget

    async def _check_affordable(self, principal: Principal, spec: ModelSpec, prompt_tokens: int) -> int:
        """How many completion tokens the balance affords after `prompt_tokens`; 402 if not even one."""
        balance = await self._ledger.balance(principal.account_id)
        self._remember_balance(principal.account_id, balance)
        affordable = pricing.affordable_completion_tokens(
            balance, prompt_tokens, spec.price_input, spec.price_output
        )
        if affordable < 1:
            need = pricing.cost(prompt_tokens, 1, spec.price_input, spec.price_output)
            raise errors.InsufficientCredits(
                f"Insufficient credits: the balance is {format_credits(balance)} credits but this request "
                f"needs at least {format_credits(need)} ({prompt_tokens} prompt tokens and 1 completion "
                "token). Add credits to continue."
            )
        return affordable

    async def _messages(
        self, request: ChatCompletionRequest, engine: Engine, principal: Principal, spec: ModelSpec
    ) -> tuple[Message, ...]:
        """Engine messages with every image fetched and validated (concurrently), each where it was sent."""
        refs: list[ImageRef] = []
        for i, message in enumerate(request.messages):
            for j, part in enumerate(message.content if isinstance(message.content, list) else ()):
                if not isinstance(part, ImagePart):
                    continue
                if not engine.capabilities.vision:
                    raise errors.InvalidRequest(
                        "This model does not accept image input. To enable vision, give its catalogue "
                        "entry an `mmproj` projector file, or `vision = true` for an upstream model "
                        "(see docs/vision.md).",
                        code="image_input_unsupported",
                        param=f"messages[{i}].content[{j}]",
                    )
                url = part.image_url
                refs.append(ImageRef(url.url, url.detail, f"messages[{i}].content[{j}].image_url.url"))
        if refs:
            # Fetching and decoding images is the expensive part of admission: an account that cannot
            # pay for a single token is refused before any of it happens.
            await self._check_affordable(principal, spec, 1)
        loaded = iter(await self._media.load_many(refs) if refs else [])
        out: list[Message] = []
        for message in request.messages:
            role = _ROLE_FOR_ENGINE[message.role]
            if not isinstance(message.content, list):
                out.append(
                    Message(
                        role=role,
                        text=message.content or "",
                        tool_calls=message.domain_tool_calls(),
                        tool_call_id=message.tool_call_id,
                    )
                )
                continue
            text = ""
            images: list[ImageInput] = []
            offsets: list[int] = []
            for part in message.content:
                if isinstance(part, ImagePart):
                    images.append(next(loaded))
                    offsets.append(len(text))
                else:
                    text += ("\n" if text else "") + part.text
            out.append(
                Message(
                    role=role,
                    text=text,
                    images=tuple(images),
                    image_offsets=tuple(offsets),
                    tool_calls=message.domain_tool_calls(),
                    tool_call_id=message.tool_call_id,
                )
            )
        return tuple(out)
