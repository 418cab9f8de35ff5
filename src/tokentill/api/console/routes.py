"""`/console/`: the web console's routes. Each reads the request, calls one view or action of
`ConsoleViews`, and renders a template (Jinja2, autoescaped: every name, label and id is text).

Every page checks its session first (`_enter`): no valid session → the sign-in page; a customer on an
operator page or the other way round → 403. Every POST checks the CSRF token and, when the browser sends
one, that `Origin` is this server. Responses carry a strict Content-Security-Policy (scripts and styles
only from /static/console/) and `Cache-Control: no-store`.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from tokentill import errors
from tokentill.api.console.forms import Form
from tokentill.api.console.operator import OperatorViews
from tokentill.api.console.session import CSRF_COOKIE, SESSION_COOKIE, SessionCodec
from tokentill.api.console.views import ConsoleViews
from tokentill.api.state import services_of
from tokentill.auth.service import CreatedKey, Principal
from tokentill.storage.secrets import get_or_create_secret

__all__ = ["console_router"]

console_router = APIRouter(prefix="/console", include_in_schema=False)

_TEMPLATES = Environment(
    loader=PackageLoader("tokentill.api.console", "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
_NOTICES = {
    "redeemed": "Code redeemed: the credits are in your balance.",
    "revoked": "Key revoked: it stops working at once.",
    "account": "Account created.",
    "granted": "Credits granted.",
    "signed_out": "Signed out.",
    "ended": "Your session has ended (it expired, or its key was revoked). Sign in again.",
}


@dataclass(frozen=True)
class Viewer:
    """Who is signed in: a key's `principal`, or the operator (principal None)."""

    principal: Principal | None

    @property
    def admin(self) -> bool:
        return self.principal is None

    @property
    def customer(self) -> Principal:
        assert self.principal is not None, "an operator page asked for the customer"
        return self.principal


@dataclass(frozen=True)
class Visit:
    codec: SessionCodec
    viewer: Viewer
    views: ConsoleViews
    operator: OperatorViews
    form: Form


async def _codec(request: Request) -> SessionCodec:
    """The signing codec, keyed by the secret all replicas share (read once per process)."""
    codec: SessionCodec | None = getattr(request.app.state, "console_codec", None)
    if codec is None:
        secret = await get_or_create_secret(services_of(request).db, "console-session")
        codec = request.app.state.console_codec = SessionCodec(secret)
    return codec


async def _viewer(request: Request, codec: SessionCodec) -> Viewer | None:
    session = codec.read(request.cookies.get(SESSION_COOKIE))
    if session is None:
        return None
    settings = services_of(request).settings
    if session.kind == "admin":
        admin = settings.admin_key.get_secret_value() if settings.admin_key is not None else ""
        fingerprint = codec.admin_fingerprint(admin)
        return Viewer(None) if admin and hmac.compare_digest(session.subject, fingerprint) else None
    principal = await services_of(request).keys.principal_for(session.subject)  # revoked → None
    return Viewer(principal) if principal is not None else None


def _cookie(request: Request, response: Response, name: str, value: str, max_age: int | None) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path="/console",
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def _redirect(request: Request, where: str) -> RedirectResponse:
    return RedirectResponse(f"{request.scope.get('root_path', '')}/console/{where}", status_code=303)


def _render(
    request: Request,
    codec: SessionCodec,
    template: str,
    viewer: Viewer | None,
    *,
    error: errors.APIError | None = None,
    status: int = 200,
    **context: Any,
) -> HTMLResponse:
    nonce = request.cookies.get(CSRF_COOKIE) or ""
    fresh = not 16 <= len(nonce) <= 64
    if fresh:
        nonce = codec.new_nonce()
    headers = dict(_HEADERS)
    if error is not None:
        request.state.error_code = error.code  # counted like the JSON API's refusals
        status = error.status
        headers.update(error.headers)
    html = _TEMPLATES.get_template(template).render(
        root=request.scope.get("root_path", ""),
        viewer=viewer,
        csrf=codec.csrf_token(nonce),
        notice=_NOTICES.get(request.query_params.get("notice", "")),
        error=error.message if error is not None else None,
        **context,
    )
    response = HTMLResponse(html, status_code=status, headers=headers)
    if fresh:
        _cookie(request, response, CSRF_COOKIE, nonce, None)
    return response


async def _enter(request: Request, *, admin: bool | None) -> Visit | Response:
    """The visit of a signed-in viewer of the right kind (`admin` None: either), else the response to
    send instead; for a POST, also the form, once its CSRF token and Origin are checked."""
    codec = await _codec(request)
    viewer = await _viewer(request, codec)
    if viewer is None:
        ended = SESSION_COOKIE in request.cookies
        response = _redirect(request, "?notice=ended" if ended else "")
        if ended:
            response.delete_cookie(SESSION_COOKIE, path="/console")
        return response
    if admin is not None and viewer.admin != admin:
        wrong = errors.PermissionDenied(
            "This page is for the operator." if admin else "This page is for API key holders.",
            code="admin_required" if admin else "customer_only",
        )
        return _render(request, codec, "error.html", viewer, error=wrong)
    form = Form({})
    if request.method == "POST":
        refused = await _check_post(request, codec)
        if isinstance(refused, errors.APIError):
            return _render(request, codec, "error.html", viewer, error=refused)
        form = refused
    services = services_of(request)
    return Visit(codec, viewer, ConsoleViews(services), OperatorViews(services), form)


async def _check_post(request: Request, codec: SessionCodec) -> Form | errors.APIError:
    origin = request.headers.get("origin")
    own = f"{request.url.scheme}://{request.url.netloc}"
    try:
        form = Form.parse(await request.body())
    except errors.APIError as exc:
        return exc
    if (origin is not None and origin != own) or not codec.csrf_ok(
        request.cookies.get(CSRF_COOKIE), form.one("csrf")
    ):
        return errors.PermissionDenied(
            "This form has expired or did not come from this console. Reload the page and try again.",
            code="csrf_failed",
        )
    return form


def _today() -> Any:
    return datetime.now(UTC).date()


# ------------------------------------------------------------------------------------------ sign-in


@console_router.get("/")
async def index(request: Request) -> Response:
    codec = await _codec(request)
    viewer = await _viewer(request, codec)
    if viewer is None:
        return _render(request, codec, "signin.html", None)
    if viewer.admin:
        overview = await OperatorViews(services_of(request)).operator_overview(_today())
        return _render(request, codec, "operator/overview.html", viewer, **overview)
    page = await ConsoleViews(services_of(request)).customer_overview(viewer.customer, _today())
    return _render(request, codec, "customer/overview.html", viewer, **page)


@console_router.post("/signin")
async def sign_in(request: Request) -> Response:
    codec = await _codec(request)
    checked = await _check_post(request, codec)
    if isinstance(checked, errors.APIError):
        return _render(request, codec, "signin.html", None, error=checked)
    client = request.client.host if request.client else "unknown"
    try:
        principal = await ConsoleViews(services_of(request)).sign_in(checked.one("key"), client)
    except (errors.AuthenticationFailed, errors.RateLimited) as exc:
        return _render(request, codec, "signin.html", None, error=exc)
    ttl = services_of(request).settings.console_session_ttl_s
    if principal is None:
        admin = services_of(request).settings.admin_key
        assert admin is not None
        cookie = codec.issue("admin", codec.admin_fingerprint(admin.get_secret_value()), ttl)
    else:
        cookie = codec.issue("key", principal.key_id, ttl)
    response = _redirect(request, "")
    _cookie(request, response, SESSION_COOKIE, cookie, ttl)
    return response


@console_router.post("/signout")
async def sign_out(request: Request) -> Response:
    codec = await _codec(request)
    checked = await _check_post(request, codec)
    if isinstance(checked, errors.APIError):
        return _render(request, codec, "error.html", None, error=checked)
    response = _redirect(request, "?notice=signed_out")
    response.delete_cookie(SESSION_COOKIE, path="/console")
    return response


# ------------------------------------------------------------------------------------------ customer


@console_router.post("/redeem")
async def redeem(request: Request) -> Response:
    visit = await _enter(request, admin=False)
    if not isinstance(visit, Visit):
        return visit
    try:
        await visit.views.redeem(visit.viewer.customer, visit.form)
    except errors.APIError as exc:
        page = await visit.views.customer_overview(visit.viewer.customer, _today())
        return _render(request, visit.codec, "customer/overview.html", visit.viewer, error=exc, **page)
    return _redirect(request, "?notice=redeemed")


async def _keys_page(
    request: Request, visit: Visit, error: errors.APIError | None = None, created: CreatedKey | None = None
) -> Response:
    page = await visit.views.customer_keys(visit.viewer.customer, _today())
    return _render(
        request, visit.codec, "customer/keys.html", visit.viewer, error=error, created=created, **page
    )


@console_router.get("/keys")
async def keys_page(request: Request) -> Response:
    visit = await _enter(request, admin=False)
    return await _keys_page(request, visit) if isinstance(visit, Visit) else visit


@console_router.post("/keys")
async def create_key(request: Request) -> Response:
    visit = await _enter(request, admin=False)
    if not isinstance(visit, Visit):
        return visit
    try:
        created = await visit.views.create_key(visit.viewer.customer, visit.form)
    except errors.APIError as exc:
        return await _keys_page(request, visit, exc)
    return await _keys_page(request, visit, created=created)


@console_router.post("/keys/{key_id}/revoke")
async def revoke_key(request: Request, key_id: str) -> Response:
    visit = await _enter(request, admin=False)
    if not isinstance(visit, Visit):
        return visit
    try:
        await visit.views.revoke_key(visit.viewer.customer, key_id)
    except errors.APIError as exc:
        return await _keys_page(request, visit, exc)
    return _redirect(request, "keys?notice=revoked")


@console_router.get("/requests")
async def requests_page(request: Request, before: str | None = None) -> Response:
    visit = await _enter(request, admin=False)
    if not isinstance(visit, Visit):
        return visit
    try:
        page = await visit.views.customer_requests(visit.viewer.customer, before)
    except errors.APIError as exc:
        page = await visit.views.customer_requests(visit.viewer.customer, None)
        return _render(request, visit.codec, "customer/requests.html", visit.viewer, error=exc, **page)
    return _render(request, visit.codec, "customer/requests.html", visit.viewer, **page)


@console_router.get("/requests.csv")
async def requests_csv(request: Request) -> Response:
    visit = await _enter(request, admin=False)
    if not isinstance(visit, Visit):
        return visit
    return StreamingResponse(
        visit.views.requests_csv(visit.viewer.customer),
        media_type="text/csv; charset=utf-8",
        headers={
            "Content-Disposition": 'attachment; filename="tokentill-requests.csv"',
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
        },
    )


# ------------------------------------------------------------------------------------------ operator


async def _accounts_page(request: Request, visit: Visit, error: errors.APIError | None = None) -> Response:
    page = await visit.operator.operator_accounts(_today())
    return _render(request, visit.codec, "operator/accounts.html", visit.viewer, error=error, **page)


@console_router.get("/accounts")
async def accounts_page(request: Request) -> Response:
    visit = await _enter(request, admin=True)
    return await _accounts_page(request, visit) if isinstance(visit, Visit) else visit


@console_router.post("/accounts")
async def create_account(request: Request) -> Response:
    visit = await _enter(request, admin=True)
    if not isinstance(visit, Visit):
        return visit
    try:
        await visit.operator.create_account(visit.form)
    except errors.APIError as exc:
        return await _accounts_page(request, visit, exc)
    return _redirect(request, "accounts?notice=account")


@console_router.post("/credits")
async def grant_credits(request: Request) -> Response:
    visit = await _enter(request, admin=True)
    if not isinstance(visit, Visit):
        return visit
    try:
        await visit.operator.grant(visit.form)
    except errors.APIError as exc:
        return await _accounts_page(request, visit, exc)
    return _redirect(request, "accounts?notice=granted")


@console_router.get("/codes")
async def codes_page(request: Request) -> Response:
    visit = await _enter(request, admin=True)
    if not isinstance(visit, Visit):
        return visit
    page = await visit.operator.operator_codes()
    return _render(request, visit.codec, "operator/codes.html", visit.viewer, created=[], **page)


@console_router.post("/codes")
async def create_codes(request: Request) -> Response:
    visit = await _enter(request, admin=True)
    if not isinstance(visit, Visit):
        return visit
    error: errors.APIError | None = None
    created = []
    try:
        created = await visit.operator.create_codes(visit.form)
    except errors.APIError as exc:
        error = exc
    page = await visit.operator.operator_codes()
    return _render(
        request, visit.codec, "operator/codes.html", visit.viewer, error=error, created=created, **page
    )


@console_router.get("/models")
async def models_page(request: Request) -> Response:
    visit = await _enter(request, admin=True)
    if not isinstance(visit, Visit):
        return visit
    return _render(
        request, visit.codec, "operator/models.html", visit.viewer, engines=visit.operator.engines()
    )
