"""Keep configured secrets out of what we relay and what we log.

An upstream may echo what it received — its error message or a 5xx body quoting our `Authorization`
header — and that text is relayed to clients (an upstream 400's message) and logged (5xx bodies, broken
answers). `Redactor` replaces every configured secret in such text with `[redacted]`; the upstream engine
applies it to everything it reads before mapping or logging it, the error renderer to every message it
sends, and `RedactingFilter` to every log record of the process while a server runs.

What counts as a secret: every `SecretStr` setting (the admin key and any added later), the password of
the database and Redis URLs, and each upstream entry's API key and extra header values. A secret is also
found JSON-escaped or percent-encoded, and the start of one left at the end of a capped read (8 characters
or more) is replaced too. Values shorter than `MIN_SECRET_CHARS` are not treated as secrets: redacting a
3-letter header value everywhere would garble every message and protect nothing.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterable, Iterator
from urllib.parse import quote, unquote, urlsplit

from pydantic import SecretStr

from tokentill.settings import Settings

__all__ = ["MIN_SECRET_CHARS", "REDACTED", "Redactor", "RedactingFilter", "redacted_logs", "settings_secrets"]

REDACTED = "[redacted]"
MIN_SECRET_CHARS = 6
_MIN_TAIL_CHARS = 8  # a secret cut by a capped read: its first 8+ characters at the very end of the text


class Redactor:
    """Replaces configured secrets (and their JSON-escaped and percent-encoded forms) in text."""

    def __init__(self, secrets: Iterable[str | SecretStr | None] = ()) -> None:
        forms: set[str] = set()
        for secret in secrets:
            value = secret.get_secret_value() if isinstance(secret, SecretStr) else secret
            if not value or len(value) < MIN_SECRET_CHARS:
                continue
            escaped = json.dumps(value)[1:-1]
            # JSON-escaped (some encoders also escape "/"), and percent-encoded.
            forms.update({value, escaped, escaped.replace("/", "\\/"), quote(value, safe="")})
        # Longest first, so that a secret containing another is replaced whole.
        self._forms = sorted(forms, key=len, reverse=True)

    def __repr__(self) -> str:  # never the secrets
        return f"Redactor({len(self._forms)} forms)"

    def __bool__(self) -> bool:
        return bool(self._forms)

    def __call__(self, text: str) -> str:
        """`text` with every secret replaced by `[redacted]`."""
        for form in self._forms:
            if form in text:
                text = text.replace(form, REDACTED)
        return text

    def body(self, raw: bytes) -> bytes:
        """A body read up to a cap, secrets replaced, including the start of one the cap cut off at the
        end. Bytes that are not UTF-8 pass through unchanged."""
        if not self._forms:
            return raw
        text = self(raw.decode("utf-8", errors="surrogateescape"))
        for form in self._forms:
            for cut in range(len(form) - 1, _MIN_TAIL_CHARS - 1, -1):
                if text.endswith(form[:cut]):
                    text = text[:-cut] + REDACTED
                    break
        return text.encode("utf-8", errors="surrogateescape")


class RedactingFilter(logging.Filter):
    """Rewrites each record's message (and its traceback text) through a `Redactor`. Attached to
    handlers, it sees every record they emit, whichever logger made it."""

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: the handler reports it (logging's handleError)
            return True
        clean = self.redactor(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redactor(record.exc_text)
        return True


@contextlib.contextmanager
def redacted_logs(redactor: Redactor) -> Iterator[None]:
    """Attach a `RedactingFilter` to every handler of the root logger for the duration (the server's
    lifespan), and detach it afterwards. Handlers added later (none in a running server) are not covered."""
    log_filter = RedactingFilter(redactor)
    handlers = list(logging.getLogger().handlers)
    for handler in handlers:
        handler.addFilter(log_filter)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(log_filter)


def _url_password(url: str | None) -> str | None:
    if not url:
        return None
    try:
        password = urlsplit(url).password
    except ValueError:
        return None
    return unquote(password) if password else None


def settings_secrets(settings: Settings) -> list[str]:
    """Every secret the settings hold: `SecretStr` fields and the passwords in the database / Redis URLs."""
    found: list[str] = []
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if isinstance(value, SecretStr):
            found.append(value.get_secret_value())
    for url in (settings.database_url, settings.redis_url):
        password = _url_password(url)
        if password:
            found.append(password)
    return found
