"""`ResponseStore` on SQLite and PostgreSQL: an account sees only its own responses; deleting is final."""

from __future__ import annotations

import pytest

from tests._services import run_with_db
from tokentill import errors
from tokentill.billing.ledger import Ledger
from tokentill.storage import Database
from tokentill.stored_responses import ResponseStore


def test_saved_responses_belong_to_their_account(database_url: str) -> None:
    async def body(db: Database) -> None:
        ledger = Ledger(db)
        owner = await ledger.create_account("owner")
        other = await ledger.create_account("other")
        store = ResponseStore(db)
        response = {"id": "resp_1", "object": "response", "model": "m", "output": []}
        conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
        await store.save(account_id=owner.id, key_id="k1", body=response, conversation=conversation)

        found = await store.get(owner.id, "resp_1")
        assert (found.body, found.conversation) == (response, conversation)
        assert await store.history(owner.id, "resp_1") == conversation
        assert await store.find(other.id, "resp_1") is None
        with pytest.raises(errors.NotFound) as missing:
            await store.get(other.id, "resp_1")
        assert (missing.value.status, missing.value.code) == (404, "response_not_found")
        with pytest.raises(errors.NotFound):
            await store.delete(other.id, "resp_1")
        with pytest.raises(errors.InvalidRequest) as previous:
            await store.history(other.id, "resp_1")
        assert (previous.value.code, previous.value.param) == (
            "previous_response_not_found",
            "previous_response_id",
        )

        await store.delete(owner.id, "resp_1")
        assert await store.find(owner.id, "resp_1") is None
        with pytest.raises(errors.NotFound):
            await store.delete(owner.id, "resp_1")

    run_with_db(database_url, body)
