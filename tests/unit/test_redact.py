"""`tokentill.redact`: configured secrets never reach a relayed message or a log line (issue 15.7).
The upstream engine's use of it is tested against scripted upstreams in tests/engines/test_upstream.py and
tests/e2e/test_upstream_e2e.py."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from pydantic import SecretStr
from starlette.testclient import TestClient

from tokentill.app import create_app
from tokentill.redact import REDACTED, RedactingFilter, Redactor, redacted_logs, settings_secrets
from tokentill.settings import Settings

KEY = "sk-live-0123456789/abc+def"


def test_every_form_of_a_secret_is_replaced() -> None:
    redact = Redactor([KEY, SecretStr("second-secret"), None, "", "abc"])
    assert redact(f"Bearer {KEY} and second-secret") == f"Bearer {REDACTED} and {REDACTED}"
    assert redact('{"auth": "sk-live-0123456789\\/abc+def"}') == f'{{"auth": "{REDACTED}"}}'  # JSON-escaped
    assert redact("k=sk-live-0123456789%2Fabc%2Bdef") == f"k={REDACTED}"  # percent-encoded
    assert redact("abc is too short to be a secret") == "abc is too short to be a secret"
    # A capped read that cut the key: its start at the very end is dropped too.
    assert redact.body(f"auth: {KEY[:15]}".encode()) == f"auth: {REDACTED}".encode()
    assert redact.body(b"\xff not utf-8 " + KEY.encode()) == b"\xff not utf-8 " + REDACTED.encode()
    assert KEY not in repr(redact) and not Redactor() and Redactor().body(b"x") == b"x"


def test_settings_secrets_cover_keys_and_url_passwords(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path,
        admin_key="admin-secret-value",  # type: ignore[arg-type]
        database_url="postgresql://tt:pg%40pass-word@db.internal/tt",
        redis_url="redis://:redis-pass-word@cache:6379/0",
    )
    found = settings_secrets(settings)
    assert {"admin-secret-value", "pg@pass-word", "redis-pass-word"} <= set(found)


def test_log_records_are_redacted_while_the_server_runs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    catalogue = tmp_path / "models.toml"
    catalogue.write_text('[[models]]\nid = "echo"\nengine = "echo"\n')
    settings = Settings(data_dir=tmp_path / "data", config=catalogue, admin_key="admin-key-in-a-log-line")  # type: ignore[arg-type]
    log = logging.getLogger("tests.redact")
    with caplog.at_level(logging.INFO), TestClient(create_app(settings)):
        log.warning("someone logged %s", "admin-key-in-a-log-line")
        try:
            raise RuntimeError("failure quoting admin-key-in-a-log-line")
        except RuntimeError:
            log.exception("with a traceback")
    assert "admin-key-in-a-log-line" not in caplog.text
    assert caplog.text.count(REDACTED) == 3, caplog.text  # the message; the traceback's source line and text
    # Detached with the server: nothing outside its lifespan is rewritten.
    assert not [f for h in logging.getLogger().handlers for f in h.filters if isinstance(f, RedactingFilter)]


def test_redacted_logs_detaches(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO):
        with redacted_logs(Redactor(["inner-secret"])):
            logging.getLogger("tests.redact").info("inner-secret")
        logging.getLogger("tests.redact").info("inner-secret after")
    assert [r.getMessage() for r in caplog.records] == [REDACTED, "inner-secret after"]
