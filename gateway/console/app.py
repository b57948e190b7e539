"""The console's sub-application at /admin/ui on the admin listener: middleware, sign-in and sign-out.

Every response carries a strict Content-Security-Policy (no scripts at all, styles from the one static
file), `X-Frame-Options: DENY` and `Cache-Control: no-store`. Every request but the sign-in page and the
stylesheet needs a session (gateway/console/session.py); every POST needs the session's CSRF token and,
when the browser names one, the console's own origin. Errors are HTML pages for a browser (Accept:
text/html) and problem+json (gateway/errors.py) otherwise; bad input is a 4xx naming the field.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any
from urllib.parse import urlencode

import aiohttp_jinja2
import jinja2
import jwt
from aiohttp import web
from markupsafe import Markup
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gateway.admin.auth import AdminAuth
from gateway.admin.sync import SyncAdmin
from gateway.admin.tenants import TenantHandlers, UsageReader
from gateway.console.charts import size
from gateway.console.forms import read_form
from gateway.console.history import TrafficHistory
from gateway.console.overview import NearestLimits
from gateway.console.session import (
    PRESESSION_COOKIE,
    PRESESSION_SECONDS,
    SESSION_COOKIE,
    Session,
    Sessions,
)
from gateway.errors import (
    DatabaseUnavailable,
    Forbidden,
    GatewayError,
    InvalidToken,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    problem_response,
)
from gateway.proxy.headers import request_id
from metering.clock import Clock
from metering.sql_errors import store_unavailable
from metering.usage_history import UsageHistory
from quota.tenants import TenantDirectory

log = logging.getLogger("cosmos_gateway.console")
PREFIX = "/admin/ui"
CSP = ("default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
}
_PUBLIC = frozenset({"sign_in", "static"})  # route names served without a session
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Console:
    """What the console's handlers use; `clock` is the injected epoch-seconds clock of the worker."""

    auth: AdminAuth
    keys: Sessions
    tenants: TenantHandlers
    sync: SyncAdmin | None
    sessions: async_sessionmaker[AsyncSession]
    usage: UsageReader
    directory: TenantDirectory
    plans: tuple[str, ...]
    meters: tuple[str, ...]  # configured meter names
    history: TrafficHistory
    nearest: NearestLimits
    settings: Any  # gateway.config.settings.Settings (the overview shows the spool's settings)
    clock: Clock
    type_base: str
    usage_history: UsageHistory | None = None  # the tenant page's period charts (billed meters)


class SignInRefused(GatewayError):
    """A sign-in with something that is no admin credential (the form is shown again, with this)."""

    status, suffix, title = 401, "invalid-token", "Sign-in refused"

    def __init__(self, detail: str, errors: list[dict[str, str]]) -> None:
        super().__init__(detail, errors=errors)


CONSOLE = web.AppKey("console", Console)
SESSION = web.RequestKey("console_session", object)  # Session | None
FORM = web.RequestKey("console_form", dict)
JINJA = web.AppKey("console_jinja", jinja2.Environment)


def console_app(console: Console, routes: list[web.RouteDef]) -> web.Application:
    """The sub-application (mount it with `app.add_subapp(PREFIX, ...)`); `routes`: the pages and actions."""
    app = web.Application(middlewares=[_middleware])
    app[CONSOLE] = console
    aiohttp_jinja2.setup(app, app_key=JINJA, loader=jinja2.PackageLoader("gateway.console", "templates"),
                         autoescape=True, undefined=jinja2.StrictUndefined, default_helpers=False,
                         filters={"size": size})
    app.add_routes([
        web.get("/sign-in", sign_in_page, name="sign_in"),
        web.post("/sign-in", sign_in, name="sign_in_post"),
        web.post("/sign-out", sign_out),
        web.get("/static/console.css", stylesheet, name="static"),
        *routes,
    ])
    app.cleanup_ctx.append(_sample_traffic)
    return app


async def _sample_traffic(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(app[CONSOLE].history.run())
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


# --------------------------------------------------------------------------- rendering


def render(request: web.Request, template: str, *, status: int = 200, **context: Any) -> web.Response:
    """A page of the console, with the signed-in actor and the session's CSRF token for its forms."""
    console = request.app[CONSOLE]
    session = request.get(SESSION)
    context.setdefault("title", "")
    context.setdefault("section", "")
    values = {"prefix": PREFIX, "actor": None, "csrf": "", **context}
    if isinstance(session, Session):
        values["actor"] = session.actor
        values["csrf"] = console.keys.csrf_token(session.nonce)
    return aiohttp_jinja2.render_template(template, request, values, app_key=JINJA, status=status)


def svg(markup: str) -> Markup:
    """An SVG string from gateway/console/charts.py (which escapes every text) as template markup."""
    return Markup(markup)  # charts.py escapes every text it draws


def wants_html(request: web.Request) -> bool:
    return "text/html" in request.headers.get("Accept", "")


def error_response(request: web.Request, error: GatewayError, type_base: str) -> web.StreamResponse:
    if not wants_html(request):
        return problem_response(error, type_base, request_id(request.raw_headers))
    errors = error.extra.get("errors") or []
    response = render(request, "error.html", status=error.status, title=error.title, error=error, errors=errors)
    response.headers.update(error.headers)
    return response


# --------------------------------------------------------------------------- middleware


def same_origin(request: web.Request) -> bool:
    """Whether the Origin (else the Referer) the browser sent is this console's; true when it sent neither."""
    expected = f"{request.scheme}://{request.host}"
    origin = request.headers.get("Origin")
    if origin is not None:
        return origin == expected
    referer = request.headers.get("Referer")
    if referer is not None:
        return referer == expected or referer.startswith(expected + "/")
    return True


async def _guard(request: web.Request) -> None:
    """Session, CSRF token and origin; the form of a POST is read here (bounded) for the handler."""
    console = request.app[CONSOLE]
    match = request.match_info
    if match.http_exception is not None:
        if request.path == PREFIX and request.method in ("GET", "HEAD"):
            raise web.HTTPSeeOther(PREFIX + "/")
        if isinstance(match.http_exception, web.HTTPMethodNotAllowed):
            raise MethodNotAllowed(f"{request.method} is not allowed here",
                                   headers={"Allow": ", ".join(sorted(match.http_exception.allowed_methods))})
        raise NotFound(f"no console page at {request.path[:200]}")
    now = console.clock()
    session = console.keys.read(request.cookies.get(SESSION_COOKIE), now)
    request[SESSION] = session
    name = match.route.name
    if request.method != "POST":
        if session is None and name not in _PUBLIC:
            target = request.path_qs if request.method == "GET" else PREFIX + "/"
            raise web.HTTPSeeOther(f"{PREFIX}/sign-in?{urlencode({'next': target[:2000]})}")
        return
    if not same_origin(request):
        raise Forbidden("the request comes from another origin")
    form = await read_form(request)
    request[FORM] = form
    if name == "sign_in_post":
        nonce = request.cookies.get(PRESESSION_COOKIE, "")
        if not nonce or not console.keys.csrf_ok("pre:" + nonce[:64], form.get("csrf")):
            raise Forbidden("the sign-in form is missing its CSRF token or it expired; load the page again")
        return
    if session is None:
        raise Forbidden("no console session: sign in first")
    if not console.keys.csrf_ok(session.nonce, form.get("csrf")):
        raise Forbidden("the form is missing its CSRF token, or it belongs to another session")


@web.middleware
async def _middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    console = request.app[CONSOLE]
    try:
        await _guard(request)
        response = await handler(request)
    except web.HTTPRedirection as redirect:
        response = redirect
    except GatewayError as error:
        response = error_response(request, error, console.type_base)
    except web.HTTPRequestEntityTooLarge:
        response = error_response(request, PayloadTooLarge("the request body is too large"), console.type_base)
    except Exception as exc:
        if store_unavailable(exc):
            log.warning("console: the SQL store is unavailable: %r", exc)
            error: GatewayError = DatabaseUnavailable("the SQL store is unavailable; try again shortly",
                                                      headers={"Retry-After": "1"})
        else:
            log.exception("console: unexpected error on %s %s", request.method, request.path[:200])
            error = GatewayError("the request could not be completed")
        response = error_response(request, error, console.type_base)
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    response.headers.setdefault("Cache-Control", "no-store")
    if isinstance(response, web.HTTPException):
        raise response  # a redirect is an exception in aiohttp; its headers are set above
    return response


# --------------------------------------------------------------------------- sign-in, sign-out, the stylesheet


def _next_page(value: str | None) -> str:
    """Where to go after sign-in: a console page of this origin only (no open redirect)."""
    if value and value.startswith(PREFIX + "/") and "//" not in value and "\\" not in value and len(value) < 2000:
        return value
    return PREFIX + "/"


async def sign_in_page(request: web.Request, *, error: GatewayError | None = None, status: int = 200,
                       next_page: str | None = None) -> web.Response:
    console = request.app[CONSOLE]
    if error is None and request.get(SESSION) is not None:
        raise web.HTTPSeeOther(_next_page(request.query.get("next")))
    nonce = Sessions.new_nonce()
    response = render(request, "sign_in.html", status=status, title="Sign in", error=error,
                      next=_next_page(next_page or request.query.get("next")),
                      signed_out="signed_out" in request.query,
                      sign_in_csrf=console.keys.csrf_token("pre:" + nonce))
    response.set_cookie(PRESESSION_COOKIE, nonce, path=PREFIX, max_age=PRESESSION_SECONDS, httponly=True,
                        samesite="Strict", secure=request.secure)
    return response


async def sign_in(request: web.Request) -> web.StreamResponse:
    """An admin token or an admin-scoped JWT, checked exactly as the admin API checks a bearer token."""
    console = request.app[CONSOLE]
    form = request[FORM]
    credential = form.get("token", "").strip(" \t")
    try:
        actor = await console.auth.actor(f"Bearer {credential}")
    except InvalidToken:
        refused: GatewayError = SignInRefused("that is neither an admin token nor a valid admin JWT",
                                              errors=[{"field": "token", "message": "not an admin token or JWT"}])
        return await sign_in_page(request, error=refused, status=refused.status, next_page=form.get("next"))
    except Forbidden as exc:  # a valid JWT without the admin scope
        return await sign_in_page(request, error=exc, status=exc.status, next_page=form.get("next"))
    now = console.clock()
    not_after = _jwt_expiry(credential) if actor.startswith("jwt:") else None
    value, session = console.keys.issue(actor, now, not_after=not_after)
    log.info("console: %s signed in", actor)
    response = web.HTTPSeeOther(_next_page(form.get("next")))
    response.set_cookie(SESSION_COOKIE, value, path=PREFIX, max_age=max(1, session.expires - int(now)),
                        httponly=True, samesite="Strict", secure=request.secure)
    response.del_cookie(PRESESSION_COOKIE, path=PREFIX)
    return response


def _jwt_expiry(token: str) -> float | None:
    """The `exp` of a JWT the admin check has just verified: the console session ends with the token."""
    try:
        exp = jwt.decode(token, options={"verify_signature": False}).get("exp")
    except jwt.PyJWTError:
        return None
    return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None


async def sign_out(request: web.Request) -> web.StreamResponse:
    session = request[SESSION]
    if isinstance(session, Session):
        log.info("console: %s signed out", session.actor)
    response = web.HTTPSeeOther(f"{PREFIX}/sign-in?signed_out=1")
    response.del_cookie(SESSION_COOKIE, path=PREFIX)
    return response


_CSS = resources.files("gateway.console").joinpath("static/console.css").read_bytes()


async def stylesheet(_: web.Request) -> web.Response:
    return web.Response(body=_CSS, content_type="text/css", charset="utf-8",
                        headers={"Cache-Control": "max-age=3600"})
