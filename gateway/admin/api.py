"""The operators' API under /admin on the admin listener (PRODUCT.md §6).

    add_admin_api(admin_app, settings=..., sessions=..., directory=..., authenticator=...,
                  usage_reader=..., plans=..., meters=...)

Every change is written with its audit entry in one transaction, then announced through the
TenantDirectory, so it is effective on this instance before the answer and on the others within
seconds. Errors are problem+json (one middleware); bad input is a 400 naming the field, never a 500.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol, TypeVar

from aiohttp import web
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from billing_sync.webhooks import store_unavailable
from gateway.admin.auth import AdminAuth
from gateway.admin.input import (
    Errors,
    invalid,
    limit_param,
    overrides_body,
    read_object,
    tenant_body,
    tenant_param,
)
from gateway.admin.openapi import admin_openapi
from gateway.admin.sync import SyncAdmin
from gateway.auth.tokens import TENANT_ID, Authenticator
from gateway.config.settings import Settings
from gateway.errors import (
    DatabaseUnavailable,
    GatewayError,
    InvalidRequest,
    LimiterUnavailable,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    problem_response,
)
from gateway.proxy.headers import request_id
from metering.meters import Meter
from metering.models import AlertEvent, AuditEntry, Tenant, TenantOverride, utcnow
from metering.periods import period_bounds
from quota.plans import RATE_METER, Plan
from quota.tenants import TenantDirectory, TenantRecord
from quota.usage_view import number, plan_catalog_view, rfc3339, tenant_view

log = logging.getLogger("cosmos_gateway.admin")
ACTOR = web.RequestKey("actor", str)  # "token:<name>" or "jwt:<subject>", set by the auth middleware
_DEFAULT_PAGE = 50
T = TypeVar("T")
_MAX_PAGE = 500


class UsageReader(Protocol):
    """Current usage from the counting store (the Redis store implements it)."""

    async def usage(self, tenant: str, period_start: int, meters: Sequence[str]) -> dict[str, float]: ...

    async def tenant_seen(self, tenant: str) -> bool: ...

    async def tenants_seen_after(self, after: str | None, limit: int) -> list[str]: ...


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def add_admin_api(app: web.Application, **dependencies: Any) -> web.Application:
    """Mount the admin API at /admin on the admin listener's app; see `admin_api_app` for the arguments."""
    api = admin_api_app(**dependencies)
    app.add_subapp("/admin", api)
    return api


def admin_api_app(*, settings: Settings, sessions: async_sessionmaker[AsyncSession],
                  directory: TenantDirectory, authenticator: Authenticator, usage_reader: UsageReader,
                  plans: Mapping[str, Plan], meters: Sequence[Meter],
                  clock: Callable[[], datetime] = utcnow, sync: SyncAdmin | None = None) -> web.Application:
    """The /admin sub-application (mount it with `app.add_subapp("/admin", ...)`)."""
    auth = AdminAuth(settings.admin.tokens, settings.admin.scope, authenticator)
    handlers = _Handlers(settings, sessions, directory, usage_reader, plans, meters, clock, sync=sync is not None)
    api = web.Application(middlewares=[_problems(auth, settings.server.problem_type_base)])
    routes = [
        web.get("/openapi.json", handlers.openapi, allow_head=False),
        web.get("/plans", handlers.plans, allow_head=False),
        web.get("/tenants", handlers.list_tenants, allow_head=False),
        web.get("/tenants/{tenant}", handlers.get_tenant, allow_head=False),
        web.put("/tenants/{tenant}", handlers.put_tenant),
        web.put("/tenants/{tenant}/overrides/{meter}", handlers.put_override),
        web.delete("/tenants/{tenant}/overrides/{meter}", handlers.delete_override),
        web.get("/audit", handlers.audit, allow_head=False),
    ]
    if sync is not None:
        routes += sync.routes()
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


# --------------------------------------------------------------------------- helpers


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda o: json.dumps(o, separators=(",", ":")))


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


def _tenant_state(tenant: Tenant) -> dict[str, Any]:
    return {"plan": tenant.plan, "status": tenant.status, "stripe_customer_id": tenant.stripe_customer_id,
            "billing_anchor_day": tenant.billing_anchor_day}


def _override_state(row: TenantOverride | None) -> dict[str, Any] | None:
    if row is None:
        return None
    if row.meter == RATE_METER:
        values: dict[str, Any] = {"per_second": number(row.per_second), "burst": row.burst}
    else:
        values = {"limit": row.limit}
    return {"meter": row.meter, **values, "expires_at": rfc3339(row.expires_at), "reason": row.reason}


async def _with_retry(action: Callable[[], Awaitable[Any]]) -> Any:
    """Run a write transaction; a concurrent creation of the same tenant is retried once."""
    try:
        return await action()
    except IntegrityError:
        return await action()


# --------------------------------------------------------------------------- handlers


class _Handlers:
    def __init__(self, settings: Settings, sessions: async_sessionmaker[AsyncSession],
                 directory: TenantDirectory, usage_reader: UsageReader, plans: Mapping[str, Plan],
                 meters: Sequence[Meter], clock: Callable[[], datetime], *, sync: bool = False) -> None:
        self._settings = settings
        self._sessions = sessions
        self._directory = directory
        self._usage = usage_reader
        self._plans = plans
        self._meters = tuple(meters)
        self._meter_names = frozenset(m.name for m in meters)
        self._clock = clock
        self._openapi = admin_openapi(settings.server.problem_type_base, sync=sync)

    # ---- reads

    async def openapi(self, _: web.Request) -> web.Response:
        return _json(self._openapi)

    async def plans(self, _: web.Request) -> web.Response:
        return _json(plan_catalog_view(self._plans, self._settings.default_plan))

    async def list_tenants(self, request: web.Request) -> web.Response:
        errors = Errors()
        limit = limit_param(request, errors, default=_DEFAULT_PAGE, maximum=_MAX_PAGE)
        errors.raise_if_any("invalid query")
        after: str | None = _decode_cursor(request, "t", str)
        seen = await self._seen(self._usage.tenants_seen_after(after, limit + 1))
        async with self._sessions() as session:
            column = Tenant.id.collate("C") if _is_postgres(session) else Tenant.id  # byte order, as Python
            query = select(Tenant).order_by(column).limit(limit + 1)
            if after is not None:
                query = query.where(column > after)
            rows = {t.id: t for t in (await session.scalars(query)).all()}
        traffic_only = [t for t in seen if TENANT_ID.fullmatch(t)]
        ids = sorted(set(rows) | set(traffic_only))[: limit + 1]
        page = ids[:limit]
        items = [self._summary(tenant, rows.get(tenant)) for tenant in page]
        next_cursor = _encode_cursor("t", page[-1]) if len(ids) > limit else None
        return _json({"tenants": items, "next_cursor": next_cursor})

    def _summary(self, tenant_id: str, row: Tenant | None) -> dict[str, Any]:
        if row is None:
            return {"tenant": tenant_id, "plan": self._settings.default_plan, "status": "active",
                    "subscription_status": None, "stripe_customer_id": None, "billing_anchor_day": None,
                    "registered": False}
        return {"tenant": tenant_id, "plan": row.plan, "status": row.status,
                "subscription_status": row.subscription_status, "stripe_customer_id": row.stripe_customer_id,
                "billing_anchor_day": row.billing_anchor_day, "registered": True}

    async def get_tenant(self, request: web.Request) -> web.Response:
        tenant = tenant_param(request)
        record = self._directory.get(tenant)
        if record is None:
            # Created on another instance moments ago, or never: ask the store (admin path, not per request).
            record = await self._directory.reload(tenant)
        if record is None and not await self._seen(self._usage.tenant_seen(tenant)):
            raise NotFound(f"tenant {tenant!r} has no record and has sent no traffic", tenant=tenant)
        return _json(await self._view(tenant, record))

    async def _view(self, tenant: str, record: TenantRecord | None) -> dict[str, Any]:
        now = self._clock()
        start, _ = period_bounds(now, record.billing_anchor_day if record is not None else None)
        names = sorted(self._meter_names)
        try:
            usage = await self._usage.usage(tenant, int(start.timestamp()), names)
        except Exception as exc:
            log.warning("admin API: usage of %s unavailable: %r", tenant, exc)
            raise LimiterUnavailable("the usage store is unavailable; try again shortly") from None
        async with self._sessions() as session:
            rows = (await session.scalars(
                select(AlertEvent).where(AlertEvent.tenant_id == tenant, AlertEvent.period_start == start)
                .order_by(AlertEvent.meter, AlertEvent.threshold))).all()
        alerts = [{"meter": a.meter, "threshold": a.threshold, "at": rfc3339(a.at)} for a in rows]
        return tenant_view(tenant_id=tenant, record=record, plans=self._plans,
                           default_plan=self._settings.default_plan, meters=self._meters, usage=usage,
                           now=now, alerts=alerts)

    async def _seen(self, read: Awaitable[T]) -> T:
        """`read` of the tenant index, or 503 when the store is down."""
        try:
            return await read
        except Exception as exc:
            log.warning("admin API: tenants seen unavailable: %r", exc)
            raise LimiterUnavailable("the usage store is unavailable; try again shortly") from None

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
        return _json({"entries": entries, "next_cursor": next_cursor})

    # ---- changes

    async def put_tenant(self, request: web.Request) -> web.Response:
        tenant = tenant_param(request)
        body = tenant_body(await read_object(request), self._plans)
        actor = request[ACTOR]

        async def write() -> tuple[bool, bool]:
            async with self._sessions() as session, session.begin():
                row, created = await self._tenant_for_update(session, tenant, body.get("plan"))
                before = _tenant_state(row)
                for field, value in body.items():
                    setattr(row, field, value)
                after = _tenant_state(row)
                changed = created or before != after
                if changed:
                    row.updated_at = utcnow()
                    session.add(self._audit(actor, tenant, "tenant.create" if created else "tenant.update",
                                            None if created else before, after))
                return created, changed

        created, changed = await _with_retry(write)
        if changed:
            await self._directory.announce(tenant)
        return _json(await self._view(tenant, self._directory.get(tenant)), status=201 if created else 200)

    async def put_override(self, request: web.Request) -> web.Response:
        tenant = tenant_param(request)
        meter = self._meter_param(request)
        values = overrides_body(await read_object(request), meter, self._clock())
        actor = request[ACTOR]

        async def write() -> None:
            async with self._sessions() as session, session.begin():
                row, created = await self._tenant_for_update(session, tenant, None)
                if created:
                    session.add(self._audit(actor, tenant, "tenant.create", None, _tenant_state(row)))
                override = await session.get(TenantOverride, (tenant, meter))
                before = _override_state(override)
                if override is None:
                    override = TenantOverride(tenant_id=tenant, meter=meter)
                    session.add(override)
                for field in ("limit", "per_second", "burst", "expires_at", "reason"):
                    setattr(override, field, values.get(field))
                override.updated_at = row.updated_at = utcnow()
                session.add(self._audit(actor, tenant, "override.put", before, _override_state(override)))

        await _with_retry(write)
        await self._directory.announce(tenant)
        return _json(await self._view(tenant, self._directory.get(tenant)))

    async def delete_override(self, request: web.Request) -> web.Response:
        tenant = tenant_param(request)
        meter = self._meter_param(request)
        actor = request[ACTOR]
        async with self._sessions() as session, session.begin():
            row = await session.get(Tenant, tenant, with_for_update=True)
            override = None if row is None else await session.get(TenantOverride, (tenant, meter))
            if row is None or override is None:
                raise NotFound(f"tenant {tenant!r} has no override of {meter!r}", tenant=tenant, meter=meter)
            before = _override_state(override)
            await session.delete(override)
            row.updated_at = utcnow()
            session.add(self._audit(actor, tenant, "override.delete", before, None))
        await self._directory.announce(tenant)
        return web.Response(status=204)

    async def _tenant_for_update(self, session: AsyncSession, tenant: str,
                                 plan: str | None) -> tuple[Tenant, bool]:
        """The tenant's row, locked; created (plan: `plan`, else the default plan) when it has none."""
        row = await session.get(Tenant, tenant, with_for_update=True)
        if row is not None:
            return row, False
        now = utcnow()
        row = Tenant(id=tenant, plan=plan or self._settings.default_plan or "starter", status="active",
                     created_at=now, updated_at=now)
        session.add(row)
        await session.flush()  # a concurrent creation fails here, and the caller retries
        return row, True

    def _audit(self, actor: str, tenant: str, action: str, before: dict[str, Any] | None,
               after: dict[str, Any] | None) -> AuditEntry:
        return AuditEntry(at=self._clock(), actor=actor, tenant_id=tenant, action=action, before=before,
                          after=after)

    def _meter_param(self, request: web.Request) -> str:
        meter = request.match_info["meter"]
        if meter != RATE_METER and meter not in self._meter_names:
            known = ", ".join(sorted(self._meter_names | {RATE_METER}))
            raise InvalidRequest("unknown meter", errors=[{"field": "meter",
                                                           "message": f"unknown meter (known: {known})"}])
        return meter


def _is_postgres(session: AsyncSession) -> bool:
    bind = session.get_bind()
    return bind.dialect.name == "postgresql"
