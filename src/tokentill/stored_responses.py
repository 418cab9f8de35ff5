"""Responses API objects kept with `store: true`, per account: save, get, delete, and the conversation
that `previous_response_id` continues.

Every read and delete names the account, so another account's response id is simply not found (404),
never a 403 that would confirm it exists. A stored row holds the `response` object as the client got it
and the conversation it ended with as chat messages (input, then the answer's text and tool calls);
`instructions` are not part of it, as at OpenAI: each request states its own.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, insert, select

from tokentill import errors
from tokentill.protocol.response_objects import ResponseBuilder
from tokentill.protocol.responses_api import ResponsesRequest, continued
from tokentill.storage.db import Database
from tokentill.storage.schema import responses

__all__ = ["ResponseStore", "StoredResponse"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoredResponse:
    id: str
    body: dict[str, Any]
    conversation: list[dict[str, Any]]


def _not_found(response_id: str) -> errors.NotFound:
    return errors.NotFound(
        f"Response with id '{response_id[:64]}' not found.", code="response_not_found", param="response_id"
    )


class ResponseStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def save(
        self,
        *,
        account_id: int,
        key_id: str,
        body: dict[str, Any],
        conversation: list[dict[str, Any]],
    ) -> None:
        async with self._db.begin() as conn:
            await conn.execute(
                insert(responses).values(
                    id=body["id"],
                    account_id=account_id,
                    key_id=key_id,
                    model=body["model"],
                    body=json.dumps(body, separators=(",", ":")),
                    conversation=json.dumps(conversation, separators=(",", ":")),
                )
            )

    async def keep(
        self,
        made: ResponseBuilder,
        *,
        request: ResponsesRequest,
        history: list[dict[str, Any]],
        account_id: int,
        key_id: str,
    ) -> None:
        """Store a finished response when its request asked (`store`), with the conversation it ended
        with. A failure is logged, not raised: the answer is delivered and billed, only this copy is lost."""
        if not request.stored:
            return
        conversation = continued(history, request, made.output_text, made.tool_calls())
        try:
            await self.save(
                account_id=account_id, key_id=key_id, body=made.response(), conversation=conversation
            )
        except Exception:
            log.exception("storing response %s failed", made.response_id)

    async def find(self, account_id: int, response_id: str) -> StoredResponse | None:
        async with self._db.read() as conn:
            row = (
                await conn.execute(
                    select(responses.c.body, responses.c.conversation).where(
                        responses.c.id == response_id, responses.c.account_id == account_id
                    )
                )
            ).first()
        if row is None:
            return None
        return StoredResponse(response_id, json.loads(row.body), json.loads(row.conversation))

    async def get(self, account_id: int, response_id: str) -> StoredResponse:
        """The account's stored response; 404 `response_not_found` if it has none by that id."""
        found = await self.find(account_id, response_id)
        if found is None:
            raise _not_found(response_id)
        return found

    async def delete(self, account_id: int, response_id: str) -> None:
        """Forget the account's response; 404 `response_not_found` if it has none by that id."""
        async with self._db.begin() as conn:
            result = await conn.execute(
                delete(responses).where(responses.c.id == response_id, responses.c.account_id == account_id)
            )
        if result.rowcount == 0:
            raise _not_found(response_id)

    async def history(self, account_id: int, previous_response_id: str) -> list[dict[str, Any]]:
        """The conversation `previous_response_id` ended with; 400 `previous_response_not_found`."""
        found = await self.find(account_id, previous_response_id)
        if found is None:
            raise errors.InvalidRequest(
                f"Previous response with id '{previous_response_id}' not found.",
                code="previous_response_not_found",
                param="previous_response_id",
            )
        return found.conversation
