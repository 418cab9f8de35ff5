"""KeyStore against real SQLite and PostgreSQL."""

from __future__ import annotations

import dataclasses

import pytest

from tests._services import run_with_db
from tokentill.auth.service import UNSET, KeyStore, Principal
from tokentill.billing.ledger import Ledger
from tokentill.errors import AuthenticationFailed, InvalidRequest, PermissionDenied
from tokentill.storage import Database


async def _auth_error(store: KeyStore, raw: str | None) -> AuthenticationFailed:
    with pytest.raises(AuthenticationFailed) as caught:
        await store.authenticate(raw)
    assert caught.value.status == 401
    return caught.value


def test_authenticate(database_url: str) -> None:
    async def body(db: Database) -> None:
        account = await Ledger(db).create_account("acme", 1_000)
        store = KeyStore(db)
        created = await store.create_key("acme", name="ci", rpm=60)
        assert created.key.startswith(f"tt-{created.key_id}-") and created.account_name == "acme"

        principal = await store.authenticate(created.key)
        assert principal == Principal(
            account_id=account.id,
            account_name="acme",
            key_id=created.key_id,
            models=None,
            rpm=60,
            tpm=None,
            max_concurrent=None,
            balance=1_000,
        )
        principal.check_model("anything")
        assert (await store.authenticate(f"  {created.key} ")).key_id == created.key_id

        for missing in (None, "", "   "):
            error = await _auth_error(store, missing)
            assert error.code == "missing_api_key"
            assert error.message.startswith("You didn't provide an API key.")

        secret = created.key.split("-", 2)[2]
        wrong = f"tt-{created.key_id}-{'A' * 43}"
        unknown = f"tt-zzzzzzzz-{secret}"
        for bad in (wrong, unknown, "sk-not-a-tokentill-key-at-all", created.key[:-1], "x"):
            error = await _auth_error(store, bad)
            assert error.code == "invalid_api_key"
            assert error.message.startswith("Incorrect API key provided: ")
            assert secret[:8] not in error.message and "A" * 8 not in error.message
        error = await _auth_error(store, wrong)
        assert f"tt-{created.key_id[:4]}****" in error.message

        assert await store.revoke(created.key_id) is True
        assert await store.revoke(created.key_id) is False
        assert await store.revoke("nokey123") is False
        assert (await _auth_error(store, created.key)).code == "invalid_api_key"

    run_with_db(database_url, body)


def test_model_restriction(database_url: str) -> None:
    async def body(db: Database) -> None:
        await Ledger(db).create_account("acme")
        store = KeyStore(db)
        created = await store.create_key("acme", models=["o1-preview", "o1-mini", "o1-preview"])
        assert created.models == ["o1-preview", "o1-mini"]
        principal = await store.authenticate(created.key)
        assert principal.models == frozenset({"o1-preview", "o1-mini"})
        principal.check_model("o1-preview")
        with pytest.raises(PermissionDenied) as caught:
            principal.check_model("gpt-4o")
        assert caught.value.status == 403 and caught.value.code == "model_not_permitted"
        assert "'gpt-4o'" in caught.value.message
        assert "o1-mini, o1-preview" in caught.value.message
        with pytest.raises(InvalidRequest) as refused:  # a client error (400), not a bug
            await store.create_key("acme", models=[])
        assert refused.value.param == "models"

    run_with_db(database_url, body)


def test_create_list_update(database_url: str) -> None:
    async def body(db: Database) -> None:
        book = Ledger(db)
        await book.create_account("a")
        await book.create_account("b")
        store = KeyStore(db)
        with pytest.raises(LookupError):
            await store.create_key("nobody")
        with pytest.raises(ValueError):
            await store.create_key("a", rpm=0)
        k1 = await store.create_key("a", name="one", rpm=10, tpm=1000, max_concurrent=2)
        k2 = await store.create_key("b", models=["m"])
        listed = await store.list_keys()
        assert [k.key_id for k in listed] == [k1.key_id, k2.key_id]
        assert [k.key_id for k in await store.list_keys("b")] == [k2.key_id]
        assert await store.list_keys("nobody") == []
        info = listed[0]
        assert (info.account_name, info.name, info.rpm, info.tpm, info.max_concurrent) == (
            "a",
            "one",
            10,
            1000,
            2,
        )
        assert info.created_at.tzinfo is not None and info.revoked_at is None
        assert listed[1].models == ["m"]
        fields = {f.name for f in dataclasses.fields(info)}
        assert not any("secret" in f or "hash" in f for f in fields)

        assert await store.update_limits(k1.key_id, tpm=5000) is True
        p = await store.authenticate(k1.key)
        assert (p.rpm, p.tpm, p.max_concurrent) == (10, 5000, 2)
        assert await store.update_limits(k1.key_id, rpm=None, max_concurrent=UNSET) is True
        p = await store.authenticate(k1.key)
        assert (p.rpm, p.tpm, p.max_concurrent) == (None, 5000, 2)
        assert await store.update_limits(k1.key_id) is True
        with pytest.raises(ValueError):
            await store.update_limits(k1.key_id, tpm=-1)
        assert await store.update_limits("nokey123", rpm=1) is False
        await store.revoke(k2.key_id)
        assert await store.update_limits(k2.key_id, rpm=1) is False
        assert (await store.list_keys("b"))[0].revoked_at is not None

    run_with_db(database_url, body)
