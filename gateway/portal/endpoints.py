"""The tenant's usage page and Stripe's portal on the proxy listener (PRODUCT.md §6a); own_endpoints.py routes here.

    POST /_gateway/portal-link        tenant JWT → {url, expires_at}: a one-time link, LINK_SECONDS
    GET  /_gateway/portal/<token>     the link: consumed, a page session cookie set, on to the page
    GET  /_gateway/portal             the page (the session cookie)
    POST /_gateway/billing/portal     tenant JWT → {url}; the page's form (cookie + CSRF) → 303 to that URL
    GET  /_gateway/static/{console,portal}.css

The link's URL is built from the request as the proxy tells the upstream where it was reached (the settings
have no public URL): the scheme and Host, or the `X-Forwarded-Proto`/`X-Forwarded-Host` of a trusted proxy.

One-time across workers: the first GET of a link sets `gw:{t:<tenant>}:portal-link:<id>` with SET NX for the
rest of the link's life; a link whose key exists was used (410). Redis down is a 503, never a 500: a link
that cannot be marked used is not honoured.

Why the link's answer is a page that refreshes to the usage page rather than a 303: the link is opened from
CosmosBuilder's web app, another site, and a browser sends no SameSite=Strict cookie on a navigation that
another site started, redirects included (and on its reloads). A refresh from the gateway's own page is a
navigation this site starts, so the cookie goes along; the refresh replaces the link in the history too.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from importlib import resources
from typing import Any

from aiohttp import web
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from gateway.auth.tokens import Identity
from gateway.console.forms import read_form
from gateway.errors import (
    Forbidden,
    GatewayError,
    InvalidRequest,
    InvalidToken,
    LimiterUnavailable,
    LinkGone,
    MethodNotAllowed,
    NoStripeCustomer,
    NotFound,
    problem_response,
)
from gateway.portal.page import render, usage_page
from gateway.portal.stripe_portal import StripePortal
from gateway.portal.tokens import LINK_SECONDS, PortalTokens, Signed
from gateway.proxy.headers import is_trusted, request_id
from metering.clock import Clock, rfc3339
from metering.errors import REDIS_ERRORS
from metering.keys import tenant_prefix
from metering.meters import Meter
from metering.usage_history import UsageHistory
from quota.tenants import TenantDirectory

log = logging.getLogger("cosmos_gateway.portal")
Authenticate = Callable[[web.BaseRequest], Awaitable[Identity]]
UsageView = Callable[[str], Awaitable[dict[str, Any]]]  # the tenant view of /_gateway/usage, without alerts

LINK_PREFIX = "/_gateway/portal/"
PAGE = "/_gateway/portal"
COOKIE = "cosmos_usage_page"
COOKIE_PATH = "/_gateway/"
REDIS_SECONDS = 2.0
_HOST = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}"
                   r"[A-Za-z0-9])?)*|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?")
_STYLES = {name: resources.files(package).joinpath(f"static/{name}").read_bytes()
           for package, name in (("gateway.console", "console.css"), ("gateway.portal", "portal.css"))}


def security_headers(form_targets: Sequence[str]) -> dict[str, str]:
    """No scripts, styles from the gateway only, forms to the gateway (and to Stripe's portal: the form's
    redirect must be allowed too), never framed, no Referer to other sites (a link carries its token)."""
    return {
        "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self' "
                                   + " ".join(form_targets) + "; frame-ancestors 'none'; base-uri 'none'",
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "same-origin",  # not "no-referrer": the form's POST would then say `Origin: null`
        "Cross-Origin-Opener-Policy": "same-origin",
        "Cache-Control": "no-store",
    }


class TenantPortal:
    """The usage page, its links and Stripe's portal for one worker; no state of its own between requests."""

    def __init__(self, *, tokens: PortalTokens, redis: Redis | RedisCluster, stripe: StripePortal,
                 directory: TenantDirectory, meters: Sequence[Meter], history: UsageHistory | None,
                 trusted_proxies: Sequence[Any], body_timeout: float, type_base: str, clock: Clock) -> None:
        self._tokens = tokens
        self._redis = redis
        self._stripe = stripe
        self._directory = directory
        self._gauges = frozenset(m.name for m in meters if m.kind == "gauge")
        self._history = history
        self._trusted = trusted_proxies
        self._body_timeout = body_timeout
        self._type_base = type_base
        self._clock = clock
        self._headers = security_headers(stripe.origins)

    async def aclose(self) -> None:
        await self._stripe.aclose()

    def handles(self, path: str) -> bool:
        return path in ("/_gateway/portal-link", PAGE, "/_gateway/billing/portal") \
            or path.startswith((LINK_PREFIX, "/_gateway/static/"))

    async def handle(self, request: web.BaseRequest, path: str, authenticate: Authenticate,
                     views: UsageView) -> web.StreamResponse:
        method = request.method
        if path == "/_gateway/portal-link":
            _allow(method, "POST")
            return await self._issue_link(request, await authenticate(request))
        if path == "/_gateway/billing/portal":
            _allow(method, "POST")
            return await self._billing_portal(request, authenticate)
        if path.startswith("/_gateway/static/"):
            _allow(method, "GET", "HEAD")
            body = _STYLES.get(path.removeprefix("/_gateway/static/"))
            if body is None:
                raise NotFound("no such gateway endpoint")
            return web.Response(body=body, content_type="text/css", charset="utf-8",
                                headers={"Cache-Control": "max-age=3600", "X-Content-Type-Options": "nosniff"})
        try:  # the browser's pages: errors as HTML pages
            if path == PAGE:
                _allow(method, "GET", "HEAD")
                return await self._page(request, views)
            _allow(method, "GET")  # not HEAD: a HEAD must not use up a one-time link
            return await self._open_link(request, path.removeprefix(LINK_PREFIX))
        except GatewayError as error:
            return self._error_page(request, error)

    # ------------------------------------------------------------------ the link

    async def _issue_link(self, request: web.BaseRequest, identity: Identity) -> web.Response:
        token, signed = self._tokens.link(identity.tenant, self._clock())
        body = {"url": f"{public_origin(request, self._trusted)}{LINK_PREFIX}{token}",
                "expires_at": rfc3339(signed.expires)}
        return web.Response(body=json.dumps(body).encode(), content_type="application/json",
                            headers={"Cache-Control": "no-store"})

    async def _open_link(self, request: web.BaseRequest, token: str) -> web.Response:
        now = self._clock()
        signed = self._tokens.read_link(token, now)
        if signed is None:
            expired = self._tokens.read_link(token, float("-inf"))
            if expired is None:
                raise NotFound("this is not a usage page link")
            raise LinkGone("this link has expired: links work for 10 minutes")
        secure = public_origin(request, self._trusted).startswith("https:")  # a bad Host fails before the use
        if not await self._consume(signed, now):
            raise LinkGone("this link was used already: each link opens the usage page once")
        cookie, session = self._tokens.session(signed.tenant, now)
        response = self._html(render("message.html", title="Opening", heading="Opening your usage page",
                                     message="Your usage page is opening.", ok=True, refresh=PAGE))
        response.set_cookie(COOKIE, cookie, path=COOKIE_PATH, max_age=max(1, session.expires - int(now)),
                            httponly=True, samesite="Strict", secure=secure)
        return response

    async def _consume(self, signed: Signed, now: float) -> bool:
        """Marks the link used; False if it was already. Redis down or late: 503 (the link stays unused)."""
        key = f"{tenant_prefix(signed.tenant)}portal-link:{signed.id}"
        try:
            async with asyncio.timeout(REDIS_SECONDS):
                taken = await self._redis.set(key, b"1", nx=True,
                                              ex=max(1, min(LINK_SECONDS, signed.expires - int(now))))
        except (*REDIS_ERRORS, TimeoutError) as exc:
            log.warning("usage page link of %s: Redis is unavailable (%r)", signed.tenant, exc)
            raise LimiterUnavailable("the gateway cannot check the link right now; try it again shortly",
                                     headers={"Retry-After": "1"}) from None
        return bool(taken)

    # ------------------------------------------------------------------ the page

    def _session(self, request: web.BaseRequest) -> Signed:
        cookie = request.cookies.get(COOKIE)
        session = self._tokens.read_session(cookie, self._clock())
        if session is None:  # no credentials, or invalid ones: a 401, as for a bad token
            raise InvalidToken("no usage page session, or it has ended (it lasts 30 minutes)",
                               token_presented=cookie is not None)
        return session

    async def _page(self, request: web.BaseRequest, views: UsageView) -> web.Response:
        session = self._session(request)
        view = await views(session.tenant)
        record = self._directory.get(session.tenant)
        billing = "no-customer" if record is None or not record.stripe_customer_id else \
            "dry-run" if self._stripe.dry_run else "portal"
        html = await usage_page(view, history=self._history, now=datetime.fromtimestamp(self._clock(), UTC),
                                csrf=self._tokens.csrf_token(session), billing=billing, gauges=self._gauges)
        return self._html(html)

    # ------------------------------------------------------------------ Stripe's portal

    async def _billing_portal(self, request: web.BaseRequest, authenticate: Authenticate) -> web.StreamResponse:
        if "Authorization" in request.headers or COOKIE not in request.cookies:
            identity = await authenticate(request)  # no credentials at all: 401
            url = await self._portal_url(identity.tenant)
            return web.Response(body=json.dumps({"url": url}).encode(), content_type="application/json",
                                headers={"Cache-Control": "no-store"})
        try:
            session = self._session(request)
            if not _same_origin(request, public_origin(request, self._trusted)):
                raise Forbidden("the request comes from another site")
            async with asyncio.timeout(self._body_timeout):
                form = await read_form(request)  # type: ignore[arg-type]  # it reads only what BaseRequest has
            if not self._tokens.csrf_ok(session, form.get("csrf")):
                raise Forbidden("the form is missing its CSRF token, or it belongs to another page session")
            url = await self._portal_url(session.tenant)
        except TimeoutError:
            return self._error_page(request, InvalidRequest("the form did not arrive in time",
                                                            [{"field": "body", "message": "sent too slowly"}]))
        except GatewayError as error:
            return self._error_page(request, error)
        return web.Response(status=303, headers={"Location": url, **self._headers})

    async def _portal_url(self, tenant: str) -> str:
        record = self._directory.get(tenant)  # every tenant record is in the directory: no SQL here
        if record is None or not record.stripe_customer_id:
            raise NoStripeCustomer(f"tenant {tenant!r} has no Stripe customer: nothing to manage in Stripe yet",
                                   tenant=tenant)
        return await self._stripe.session_url(record.stripe_customer_id)

    # ------------------------------------------------------------------ answers

    def _html(self, html: str, status: int = 200) -> web.Response:
        return web.Response(status=status, text=html, content_type="text/html", headers=self._headers)

    def _error_page(self, request: web.BaseRequest, error: GatewayError) -> web.Response:
        """An error as a page for a browser, as problem+json for anything else (RFC 9457, the one builder)."""
        if "text/html" not in request.headers.get("Accept", ""):
            response = problem_response(error, self._type_base, request_id(request.raw_headers))
            response.headers.update(self._headers)
            return response
        heading = {401: "Your session has ended", 404: "Not a usage page link", 410: "This link cannot be used again",
                   409: "No billing account yet"}.get(error.status, error.title)
        response = self._html(render("message.html", title=heading, heading=heading, message=error.detail, ok=False,
                                     refresh=None), status=error.status)
        response.headers.update(error.headers)
        return response


def _allow(method: str, *allowed: str) -> None:
    if method not in allowed:
        raise MethodNotAllowed(f"{method} is not allowed here", headers={"Allow": ", ".join(allowed)})


def public_origin(request: web.BaseRequest, trusted: Sequence[Any]) -> str:
    """`scheme://host[:port]` the client reached: the request's, or a trusted proxy's `X-Forwarded-Proto` and
    `X-Forwarded-Host` (their first, client-side element). A Host that is no host name is a 400 naming it."""
    scheme, host, field = request.scheme, request.headers.get("Host", ""), "Host"
    if is_trusted(request.remote, trusted):
        forwarded_proto = _first(request.headers, "X-Forwarded-Proto")
        if forwarded_proto.lower() in ("http", "https"):
            scheme = forwarded_proto.lower()
        forwarded_host = _first(request.headers, "X-Forwarded-Host")
        if forwarded_host:
            host, field = forwarded_host, "X-Forwarded-Host"
    if not _HOST.fullmatch(host) or len(host) > 261:
        raise InvalidRequest(f"{field} is not a host name a link can be built on",
                             [{"field": field, "message": "expected host[:port]"}])
    return f"{scheme}://{host}"


def _first(headers: Mapping[str, str], name: str) -> str:
    return headers.get(name, "").split(",", 1)[0].strip()


def _same_origin(request: web.BaseRequest, origin: str) -> bool:
    """Whether the Origin (else the Referer) the browser sent is the page's; true when it sent neither."""
    sent = request.headers.get("Origin")
    if sent is not None:
        return sent == origin
    referer = request.headers.get("Referer")
    return referer is None or referer == origin or referer.startswith(origin + "/")
