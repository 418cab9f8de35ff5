"""Helpers shared by the tests: the skip-or-fail rule for outside services, and running async code.

`require(service, reason)` skips a test locally but fails it under `CI=true`, so CI can never go green by
skipping the PostgreSQL / Redis / llama.cpp tests. No pytest-asyncio: async bodies go through `run()`.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import pytest

import tokentill
from tokentill.storage.db import Database, open_database

T = TypeVar("T")

__all__ = ["in_ci", "require", "run", "run_with_db", "subprocess_env"]


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


def require(service: str, reason: str) -> NoReturn:
    """Stop the current test because `service` is unavailable: skip locally, fail under CI=true."""
    message = f"{service} is not available: {reason}"
    if in_ci():
        pytest.fail(f"{message} (CI=true: required services must be present)", pytrace=False)
    pytest.skip(message)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one coroutine on a fresh event loop (each test owns its loop and everything opened on it)."""
    return asyncio.run(coro)


def run_with_db(url: str, body: Callable[[Database], Awaitable[T]]) -> T:
    """Open (and migrate) the database at `url`, run `body(db)`, and always close it again."""

    async def main() -> T:
        db = await open_database(url)
        try:
            return await body(db)
        finally:
            await db.aclose()

    return run(main())


def subprocess_env() -> dict[str, str]:
    """This environment, plus PYTHONPATH such that a child `python -c` imports this very tokentill."""
    src = str(Path(tokentill.__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    return env
