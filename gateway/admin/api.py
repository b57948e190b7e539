"""The operators' API under /admin on the admin listener (PRODUCT.md §6): the app, its routes, the one
problem+json middleware, and the paged lists (tenants, audit).

    add_admin_api(admin_app, settings=..., sessions=..., directory=..., authenticator=...,
                  usage_reader=..., plans=..., meters=..., clock=time.time)

The tenant and override handlers are in gateway/admin/tenants.py, the billing sync's in
gateway/admin/sync.py. Errors are problem+json (one middleware); bad input is a 400 naming the field,
never a 500.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from aiohttp import web
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gateway.admin.auth import AdminAuth
from gateway.admin.input import Errors, invalid, limit_param
from gateway.admin.openapi import admin_openapi
from gateway.admin.sync import SyncAdmin
from gateway.admin.tenants import ACTOR, TenantHandlers, UsageReader, json_response, seen
from gateway.admin.usage_history import UsageHistoryAdmin
from gateway.auth.tokens import Authenticator
from gateway.config.settings import Settings
from gateway.errors import (
    DatabaseUnavailable,
    GatewayError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    problem_response,
)
from gateway.proxy.headers import request_id
from metering.clock import Clock, rfc3339, system_clock
from metering.keys import TENANT_ID
from metering.meters import Meter
from metering.models import AuditEntry, Tenant
from metering.sql_errors import store_unavailable
from metering.usage_history import UsageHistory
from quota.plans import Plan
from quota.tenants import TenantDirectory
from quota.usage_view import plan_catalog_view

log = logging.getLogger("cosmos_gateway.admin")
_DEFAULT_PAGE = 50
_MAX_PAGE = 500

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def add_admin_api(app: web.Application, **dependencies: Any) -> web.Application:
    """Mount the admin API at /admin on the admin listener's app; see `admin_api_app` for the arguments."""
    api = admin_api_app(**dependencies)
    app.add_subapp("/admin", api)
    return api


def admin_api_app(*, settings: Settings, sessions: async_sessionmaker[AsyncSession],
                  directory: TenantDirectory, authenticator: Authenticator, usage_reader: UsageReader,
                  plans: Mapping[str, Plan], meters: Sequence[Meter],
                  clock: Clock = system_clock, sync: SyncAdmin | None = None,
                  history: UsageHistory | None = None) -> web.Application:
    """The /admin sub-application (mount it with `app.add_subapp("/admin", ...)`); `clock`: epoch seconds."""
    auth = AdminAuth(settings.admin.tokens, settings.admin.scope, authenticator)
    lists = _Lists(settings, sessions, usage_reader, plans, sync=sync is not None, history=history is not None)
    tenants = TenantHandlers(sessions=sessions, directory=directory, usage_reader=usage_reader, plans=plans,
                             meters=meters, default_plan=settings.default_plan, clock=clock)
    api = web.Application(middlewares=[_problems(auth, settings.server.problem_type_base)])
    routes = [
        web.get("/openapi.json", lists.openapi, allow_head=False),
        web.get("/plans", lists.plans, allow_head=False),
        web.get("/tenants", lists.tenants, allow_head=False),
        web.get("/tenants/{tenant}", tenants.get_tenant, allow_head=False),
        web.put("/tenants/{tenant}", tenants.put_tenant),
        web.put("/tenants/{tenant}/overrides/{meter}", tenants.put_override),
        web.delete("/tenants/{tenant}/overrides/{meter}", tenants.delete_override),
        web.get("/audit", lists.audit, allow_head=False),
    ]
    if sync is not None:
        routes += sync.routes()
    if history is not None:
        routes += UsageHistoryAdmin(history, directory=directory, usage_reader=usage_reader, clock=clock).routes()
    api.add_routes(routes)
    # Last: anything else under /admin gets a problem+json 404/405 instead of aiohttp's text page.
    api.router.add_route("*", "/{tail:.*}", _unmatched(api))
    return api


# --------------------------------------------------------------------------- errors and auth


def _problems(auth: AdminAuth, type_base: str) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        rid = request_id(request.raw_headers)
        try:
            request[ACTOR] = await auth.actor(request.headers.get("Authorization"))
            response = await handler(request)
        except GatewayError as error:
            response = problem_response(error, type_base)
        except web.HTTPRequestEntityTooLarge:
            response = problem_response(PayloadTooLarge("the request body is too large"), type_base)
        except web.HTTPException:
            raise
        except Exception as exc:
            if store_unavailable(exc):  # down or restarting (PostgreSQL's errors included): try again later
                log.warning("admin API: the SQL store is unavailable: %r", exc)
                error = DatabaseUnavailable("the SQL store is unavailable", headers={"Retry-After": "1"})
            else:
                log.exception("admin API: unexpected error on %s %s", request.method, request.path)
                error = GatewayError("the request could not be completed")
            response = problem_response(error, type_base)
        response.headers["X-Request-Id"] = rid
        return response

    return middleware


def _unmatched(api: web.Application) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        allowed: set[str] = set()
        for resource in api.router.resources():
            match, methods = await resource.resolve(request)
            if match is None and methods and "*" not in methods:
                allowed |= methods
        if allowed:
            raise MethodNotAllowed(f"{request.method} is not allowed here",
                                   headers={"Allow": ", ".join(sorted(allowed))})
        raise NotFound(f"no admin resource at {request.path}")

    return handler


# --------------------------------------------------------------------------- paging


def _encode_cursor(kind: str, value: str | int) -> str:
    raw = json.dumps([kind, value], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(request: web.Request, kind: str, value_type: type) -> Any:
    text = request.query.get("cursor")
    if text is None or text == "":
        return None
    try:
        decoded = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        decoded = None
    if (not isinstance(decoded, list) or len(decoded) != 2 or decoded[0] != kind
            or type(decoded[1]) is not value_type):
        raise invalid("cursor", "not a cursor of this list")
    return decoded[1]


# --------------------------------------------------------------------------- the document, the catalog, the lists


class _Lists:
    def __init__(self, settings: Settings, sessions: async_sessionmaker[AsyncSession], usage_reader: UsageReader,
                 plans: Mapping[str, Plan], *, sync: bool = False, history: bool = False) -> None:
        self._default_plan = settings.default_plan
        self._sessions = sessions
        self._usage = usage_reader
        self._plans = plans
        self._openapi = admin_openapi(settings.server.problem_type_base, sync=sync, history=history)

    async def openapi(self, _: web.Request) -> web.Response:
        return json_response(self._openapi)

    async def plans(self, _: web.Request) -> web.Response:
        return json_response(plan_catalog_view(self._plans, self._default_plan))

    async def tenants(self, request: web.Request) -> web.Response:
        """Registered tenants and those only seen in traffic, in id order, a page at a time."""
        errors = Errors()
        limit = limit_param(request, errors, default=_DEFAULT_PAGE, maximum=_MAX_PAGE)
        errors.raise_if_any("invalid query")
        after: str | None = _decode_cursor(request, "t", str)
        traffic = await seen(self._usage.tenants_seen_after(after, limit + 1))
        async with self._sessions() as session:
            column = Tenant.id.collate("C") if _is_postgres(session) else Tenant.id  # byte order, as Python
            query = select(Tenant).order_by(column).limit(limit + 1)
            if after is not None:
                query = query.where(column > after)
            rows = {t.id: t for t in (await session.scalars(query)).all()}
        traffic_only = [t for t in traffic if TENANT_ID.fullmatch(t)]
        ids = sorted(set(rows) | set(traffic_only))[: limit + 1]
        page = ids[:limit]
        items = [self._summary(tenant, rows.get(tenant)) for tenant in page]
        next_cursor = _encode_cursor("t", page[-1]) if len(ids) > limit else None
        return json_response({"tenants": items, "next_cursor": next_cursor})

    def _summary(self, tenant_id: str, row: Tenant | None) -> dict[str, Any]:
        if row is None:
            return {"tenant": tenant_id, "plan": self._default_plan, "status": "active",
                    "subscription_status": None, "stripe_customer_id": None, "billing_anchor_day": None,
                    "registered": False}
        return {"tenant": tenant_id, "plan": row.plan, "status": row.status,
                "subscription_status": row.subscription_status, "stripe_customer_id": row.stripe_customer_id,
                "billing_anchor_day": row.billing_anchor_day, "registered": True}

    async def audit(self, request: web.Request) -> web.Response:
        errors = Errors()
        limit = limit_param(request, errors, default=_DEFAULT_PAGE, maximum=_MAX_PAGE)
        tenant = request.query.get("tenant")
        if tenant is not None and not TENANT_ID.fullmatch(tenant):
            errors.add("tenant", "expected 1-64 characters of A-Z a-z 0-9 . _ : -")
        errors.raise_if_any("invalid query")
        before_id: int | None = _decode_cursor(request, "a", int)
        query = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit + 1)
        if tenant is not None:
            query = query.where(AuditEntry.tenant_id == tenant)
        if before_id is not None:
            query = query.where(AuditEntry.id < before_id)
        async with self._sessions() as session:
            rows = list((await session.scalars(query)).all())
        entries = [{"id": e.id, "at": rfc3339(e.at), "actor": e.actor, "tenant": e.tenant_id,
                    "action": e.action, "before": e.before, "after": e.after} for e in rows[:limit]]
        next_cursor = _encode_cursor("a", rows[limit - 1].id) if len(rows) > limit else None
        return json_response({"entries": entries, "next_cursor": next_cursor})


def _is_postgres(session: AsyncSession) -> bool:
    bind = session.get_bind()
    return bind.dialect.name == "postgresql"
