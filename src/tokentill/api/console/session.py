"""The console's signed cookies: who is signed in, and the CSRF token every form carries.

A session cookie is `v1.<payload>.<mac>`: base64url JSON `{"k": "key" | "admin", "s": subject, "e": expiry}`
and HMAC-SHA256 over it with a secret every replica shares (`server_secrets`, so a cookie one replica issued
is good on all). The subject is the key id for a customer — the key itself is checked again on every
request, so revoking it ends the session — and, for the operator, a MAC of the admin key, so changing
TOKENTILL_ADMIN_KEY ends every operator session. The cookie never holds a secret a client could reuse.

CSRF: a separate random nonce cookie; forms carry `HMAC(secret, "csrf:" + nonce)`. A forged cross-site
form has neither the token (same-origin policy) nor the cookies (SameSite=Strict).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from typing import Literal

__all__ = ["CSRF_COOKIE", "SESSION_COOKIE", "Session", "SessionCodec"]

SESSION_COOKIE = "tokentill_session"
CSRF_COOKIE = "tokentill_csrf"
_VERSION = "v1"

Kind = Literal["key", "admin"]


@dataclass(frozen=True)
class Session:
    kind: Kind
    subject: str  # the key id, or the admin key's fingerprint
    expires: int  # unix seconds


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class SessionCodec:
    """Issues and checks session cookies and CSRF tokens with one server secret."""

    def __init__(self, secret: str) -> None:
        self._key = hashlib.sha256(b"tokentill-console|" + secret.encode()).digest()

    def _mac(self, purpose: str, text: str) -> str:
        return _b64(hmac.new(self._key, f"{purpose}|{text}".encode(), hashlib.sha256).digest())

    def admin_fingerprint(self, admin_key: str) -> str:
        return self._mac("admin", admin_key)

    def issue(self, kind: Kind, subject: str, ttl_s: int, now: float | None = None) -> str:
        expires = int((time.time() if now is None else now) + ttl_s)
        payload = _b64(json.dumps({"k": kind, "s": subject, "e": expires}, separators=(",", ":")).encode())
        return f"{_VERSION}.{payload}.{self._mac('session', payload)}"

    def read(self, cookie: str | None, now: float | None = None) -> Session | None:
        """The session in `cookie`, or None if it is absent, forged, malformed or expired."""
        if not cookie or len(cookie) > 1024:
            return None
        version, _, rest = cookie.partition(".")
        payload, _, mac = rest.partition(".")
        if version != _VERSION or not hmac.compare_digest(
            mac.encode(), self._mac("session", payload).encode()
        ):
            return None
        try:
            data = json.loads(_unb64(payload))
            session = Session(kind=data["k"], subject=str(data["s"]), expires=int(data["e"]))
        except (ValueError, KeyError, TypeError):
            return None
        if session.kind not in ("key", "admin") or session.expires <= (time.time() if now is None else now):
            return None
        return session

    @staticmethod
    def new_nonce() -> str:
        return secrets.token_urlsafe(24)

    def csrf_token(self, nonce: str) -> str:
        return self._mac("csrf", nonce)

    def csrf_ok(self, nonce: str | None, token: str | None) -> bool:
        if not nonce or not token:
            return False
        return hmac.compare_digest(token.encode(), self.csrf_token(nonce).encode())
