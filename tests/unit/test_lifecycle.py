"""`Lifecycle` / `Run` without HTTP: over the real services (echo engine, SQLite, in-process limiter), every
way a run can end settles its hold exactly once, returns its lease and closes its Idempotency-Key claim:
finished, the stream closed early, the engine failing, the client leaving, and never started at all."""

from __future__ import annotations

import itertools
from collections.abc import AsyncGenerator, Iterator
from contextlib import aclosing
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import anyio
import pytest
from sqlalchemy import func, select
from starlette.testclient import TestClient

from tokentill import errors
from tokentill.app import create_app
from tokentill.auth.service import Principal
from tokentill.billing.records import Hold
from tokentill.engines.base import EngineRequest
from tokentill.lifecycle import Answer, Collected, Replayed, Run
from tokentill.protocol.chat import ChatCompletionRequest
from tokentill.services import Services
from tokentill.settings import Settings
from tokentill.storage.schema import holds, usage
from tokentill.types import EngineEvent, Finished, TextDelta

CREDITS = 1_000_000
_REQUEST_IDS = itertools.count()
WORDS = "one two three four five six seven eight"


class FakeClient:
    """A client that hangs up when told to, and remembers the balance it was shown."""

    def __init__(self) -> None:
        self.hung_up = anyio.Event()
        self.balances: list[int] = []

    async def gone(self) -> None:
        await self.hung_up.wait()

    def show_balance(self, ucr: int) -> None:
        self.balances.append(ucr)


@dataclass
class Harness:
    client: TestClient
    services: Services

    def call(self, fn: Any, *args: Any) -> Any:
        return self.client.portal.call(fn, *args)  # type: ignore[union-attr]

    def principal(self, account: str) -> Principal:
        async def make() -> Principal:
            await self.services.ledger.create_account(account, CREDITS)
            key = (await self.services.keys.create_key(account, max_concurrent=1)).key
            return await self.services.keys.authenticate(key)

        return self.call(make)  # type: ignore[no-any-return]

    async def admit(
        self, principal: Principal, client: FakeClient, *, stream: bool = False, key: str | None = None
    ) -> Run | Replayed:
        body = ChatCompletionRequest.model_validate(
            {"messages": [{"role": "user", "content": WORDS}], "max_completion_tokens": 20, "stream": stream}
        )
        return await self.services.lifecycle.admit(
            principal,
            "echo",
            body,
            request_id=f"req_{next(_REQUEST_IDS)}",
            client=client,
            render=_render,
            idempotency_key=key,
            route="test",
            payload={"stream": stream},
        )

    def books(self, account: str) -> tuple[int, int, list[int]]:
        """(balance, open holds, usage row statuses) of `account`."""

        async def read() -> tuple[int, int, list[int]]:
            found = await self.services.ledger.get_account(account)
            assert found is not None
            async with self.services.db.read() as conn:
                open_holds = (
                    await conn.execute(
                        select(func.count()).select_from(holds).where(holds.c.status == "open")
                    )
                ).scalar_one()
                statuses = (await conn.execute(select(usage.c.status).order_by(usage.c.id))).scalars()
                return found.balance, int(open_holds), [int(s) for s in statuses]

        return self.call(read)  # type: ignore[no-any-return]


def _render(answer: Answer) -> dict[str, Any]:
    assert answer.finished is not None
    return {"content": "".join(answer.content), "finish_reason": answer.finished.finish_reason}


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    catalogue = tmp_path / "models.toml"
    catalogue.write_text(
        '[[models]]\nid = "echo"\nengine = "echo"\ncontext = 4096\nprice_input = 15\nprice_output = 60\n'
    )
    settings = Settings(data_dir=tmp_path / "data", config=catalogue)
    with TestClient(create_app(settings)) as client:
        yield Harness(client, client.app.state.services)  # type: ignore[attr-defined]


def _run(admitted: Run | Replayed) -> Run:
    assert isinstance(admitted, Run), admitted
    return admitted


def test_collect_settles_once_and_shows_the_balance_it_left(harness: Harness) -> None:
    principal = harness.principal("collect")
    client = FakeClient()

    async def main() -> Any:
        run = _run(await harness.admit(principal, client))
        collected = await run.collect()
        await run.aclose()  # after the end: nothing more happens
        return collected

    collected = harness.call(main)
    assert collected is not None and collected.body["content"].strip() == WORDS
    balance, open_holds, statuses = harness.books("collect")
    assert (open_holds, statuses) == (0, [200])
    assert collected.balance == balance < CREDITS
    assert client.balances[-1] == balance  # after the hold, then after settlement
    assert client.balances[0] < balance  # the hold reserved more than the answer cost


def test_a_stream_closed_early_settles_what_was_made_and_frees_the_key(harness: Harness) -> None:
    principal = harness.principal("early")

    async def main() -> Run | Replayed:
        run = _run(await harness.admit(principal, FakeClient(), stream=True, key="k1"))
        events = await run.stream()
        assert events is not None
        assert isinstance(await anext(events), TextDelta)
        await events.aclose()  # the client stopped reading after one token
        await run.aclose()  # the response's on-close hook: already ended, a no-op
        # The same key runs again (released, not stored): nothing was answered in full.
        again = await harness.admit(principal, FakeClient(), stream=True, key="k1")
        if isinstance(again, Run):
            await again.aclose()
        return again

    again = harness.call(main)
    assert isinstance(again, Run)
    balance, open_holds, statuses = harness.books("early")
    assert open_holds == 0 and statuses == [499, 499]
    assert balance < CREDITS  # the token that was made is paid for


def test_a_finished_stream_stores_its_answer_for_replay(harness: Harness) -> None:
    principal = harness.principal("stored")

    async def main() -> Run | Replayed:
        run = _run(await harness.admit(principal, FakeClient(), stream=True, key="k2"))
        events = await run.stream()
        assert events is not None
        async with anyio.create_task_group():  # consumed to the end, as the SSE pump does
            seen = [event async for event in events]
        assert isinstance(seen[-1], Finished)
        return await harness.admit(principal, FakeClient(), stream=True, key="k2")

    replayed = harness.call(main)
    assert isinstance(replayed, Replayed) and replayed.stored.streamed
    assert replayed.stored.body["content"].strip() == WORDS
    assert harness.books("stored")[1:] == (0, [200])


def test_an_engine_failure_charges_nothing_and_frees_the_key(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    principal = harness.principal("failed")

    async def broken(request: EngineRequest) -> AsyncGenerator[EngineEvent, None]:
        raise errors.UpstreamError("the engine broke")
        yield  # pragma: no cover  (makes this a generator)

    monkeypatch.setattr(harness.services.engines["echo"], "generate", broken)
    client = FakeClient()

    async def main() -> Run | Replayed:
        run = _run(await harness.admit(principal, client, key="k3"))
        with pytest.raises(errors.UpstreamError):
            await run.collect()
        monkeypatch.undo()
        again = await harness.admit(principal, FakeClient(), key="k3")
        if isinstance(again, Run):
            await again.aclose()
        return again

    assert isinstance(harness.call(main), Run)
    balance, open_holds, statuses = harness.books("failed")
    assert (balance, open_holds, statuses) == (CREDITS, 0, [502, 499])
    assert client.balances[-1] == CREDITS  # the error response shows the balance after the release


def test_a_client_gone_before_the_first_event_pays_nothing(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    principal = harness.principal("gone")
    client = FakeClient()
    started = anyio.Event()
    closed: list[bool] = []

    async def queued(request: EngineRequest) -> AsyncGenerator[EngineEvent, None]:
        try:
            started.set()
            await anyio.sleep_forever()  # waiting in the engine's queue
            yield TextDelta("never")
        finally:
            closed.append(True)

    monkeypatch.setattr(harness.services.engines["echo"], "generate", queued)

    async def main() -> Any:
        run = _run(await harness.admit(principal, client, stream=True, key="k4"))
        async with anyio.create_task_group() as tg:

            async def hang_up() -> None:
                await started.wait()
                client.hung_up.set()

            tg.start_soon(hang_up)
            return await run.stream()

    assert harness.call(main) is None
    assert closed == [True]  # the engine was stopped
    assert harness.books("gone") == (CREDITS, 0, [499])


def test_a_run_that_never_started_releases_everything_once(harness: Harness) -> None:
    principal = harness.principal("never")

    async def main() -> Run | Replayed:
        run = _run(await harness.admit(principal, FakeClient(), key="k5"))
        await run.aclose()
        await run.aclose()
        # The lease is back (max_concurrent=1) and the key is free.
        again = await harness.admit(principal, FakeClient(), key="k5")
        if isinstance(again, Run):
            await again.aclose()
        return again

    assert isinstance(harness.call(main), Run)
    assert harness.books("never") == (CREDITS, 0, [499, 499])


# --------------------------------------------------------------------------- early start (upstream engines)


@dataclass
class Watched:
    """The echo engine as an early-starting engine (as an upstream one is), noting when each generation
    was asked for and closed, and, for each hold, whether its generation had been asked for by the time
    the hold committed."""

    asked: list[str]
    closed: list[str]
    asked_before_hold: list[bool]
    hung: anyio.Event | None = None  # given: holds never commit; set once one is waiting


def _watch(harness: Harness, monkeypatch: pytest.MonkeyPatch) -> Watched:
    engine = harness.services.engines["echo"]
    monkeypatch.setattr(engine, "capabilities", replace(engine.capabilities, early_start=True))
    watched = Watched([], [], [])
    generate = engine.generate

    async def noted(request: EngineRequest) -> AsyncGenerator[EngineEvent, None]:
        watched.asked.append(request.request_id)
        try:
            async with aclosing(generate(request)) as events:
                async for event in events:
                    yield event
        finally:
            watched.closed.append(request.request_id)

    monkeypatch.setattr(engine, "generate", noted)
    holds = harness.services.chat._holds  # the group commit the server gives the chat service
    reserve = holds.reserve

    async def reserve_noted(**fields: Any) -> Hold:
        asked = len(watched.asked)
        if watched.hung is not None:
            await anyio.sleep(0)  # one pass of the loop: an engine asked early has been asked by now
            watched.hung.set()
            await anyio.sleep_forever()  # a commit that never comes
        hold = await reserve(**fields)
        watched.asked_before_hold.append(len(watched.asked) > asked)
        return hold

    monkeypatch.setattr(holds, "reserve", reserve_noted)
    return watched


def test_an_early_starting_engine_is_asked_while_the_hold_commits(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    principal = harness.principal("early-start")
    watched = _watch(harness, monkeypatch)

    async def main() -> list[Collected | None]:
        out = []
        for _ in range(2):
            out.append(await _run(await harness.admit(principal, FakeClient())).collect())
        return out

    first, second = harness.call(main)
    assert first is not None and second is not None
    assert second.body["content"].strip() == WORDS
    # The first hold of an account this process has not seen waits for its commit; by the second the
    # balance is known to cover it, and the engine was already asked when the hold committed.
    assert watched.asked_before_hold == [False, True]
    assert len(watched.closed) == 2
    balance, open_holds, statuses = harness.books("early-start")
    assert (open_holds, statuses) == (0, [200, 200])
    assert second.balance == balance


def test_a_refused_hold_stops_the_generation_asked_early_and_charges_nothing(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    principal = harness.principal("stale")
    watched = _watch(harness, monkeypatch)

    async def main() -> BaseException | None:
        await _run(await harness.admit(principal, FakeClient())).collect()
        # Spent elsewhere (another replica, the operator): this process's last balance is stale.
        balance = await harness.services.ledger.balance(principal.account_id)
        await harness.services.ledger.debit("stale", balance - 1, note="spent elsewhere")
        try:
            await harness.admit(principal, FakeClient())
        except errors.InsufficientCredits as exc:
            return exc
        return None

    assert harness.call(main) is not None  # 402
    assert len(watched.asked) == 2 and watched.closed == watched.asked  # asked early, then stopped
    balance, open_holds, statuses = harness.books("stale")
    assert (balance, open_holds, statuses) == (1, 0, [200])

    # The key's only concurrency slot came back: a third request is admitted, and refused by the hold
    # again now that the balance is known (the engine is not asked at all this time).
    async def third() -> None:
        with pytest.raises(errors.InsufficientCredits):
            await harness.admit(principal, FakeClient())

    harness.call(third)
    assert len(watched.asked) == 2


def test_an_early_generation_stops_when_its_run_never_starts_or_admission_is_cancelled(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    principal = harness.principal("abandoned")
    watched = _watch(harness, monkeypatch)

    async def main() -> None:
        await _run(await harness.admit(principal, FakeClient())).collect()
        # Admitted with the engine asked, then ended before anyone read it (the client left first).
        run = _run(await harness.admit(principal, FakeClient()))
        await run.aclose()
        # Cancelled while its hold commits (the client hung up during admission).
        watched.hung = hung = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(harness.admit, principal, FakeClient())
            await hung.wait()
            tg.cancel_scope.cancel()

    harness.call(main)
    assert len(watched.asked) == 3 and sorted(watched.closed) == sorted(watched.asked)
    balance, open_holds, statuses = harness.books("abandoned")
    assert open_holds == 0 and statuses == [200, 499]
    # The lease of the cancelled admission came back (max_concurrent=1).
    watched.hung = None

    async def again() -> None:
        await _run(await harness.admit(principal, FakeClient())).aclose()

    harness.call(again)
