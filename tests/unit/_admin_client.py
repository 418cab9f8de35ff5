"""An in-process server on the echo engine whose client holds the admin key (admin-route tests)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from starlette.testclient import TestClient

from tokentill.app import create_app
from tokentill.settings import Settings

ADMIN = "admin-key-for-admin-client-0123456789"


@contextlib.contextmanager
def admin_client(tmp_path: Path, database_url: str) -> Iterator[TestClient]:
    """A `TestClient` sending `Authorization: Bearer ADMIN`; a 500 is a response, not an exception."""
    catalogue = tmp_path / "models.toml"
    catalogue.write_text('[[models]]\nid = "echo"\nengine = "echo"\n')
    settings = Settings(
        data_dir=tmp_path / "data",
        config=catalogue,
        database_url=database_url,
        admin_key=ADMIN,  # type: ignore[arg-type]
    )
    headers = {"Authorization": f"Bearer {ADMIN}"}
    with TestClient(create_app(settings), headers=headers, raise_server_exceptions=False) as client:
        yield client
