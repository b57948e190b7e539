"""The admin API's tenant and override handlers (PRODUCT.md §6): the tenant view, PUT of a tenant, PUT and
DELETE of an override.

Each is an operation (`view`, `update_tenant`, `set_override`, `remove_override`) that the admin API's
handlers and the operator console (gateway/console) both call, so a change made either way is validated,
written and audited the same way; the caller names the actor.

Every change is written with its audit entry in one transaction (the tenant row through
metering.tenant_rows, like the Stripe webhooks), then announced through the TenantDirectory, so it is
effective on this instance before the answer and on the others within seconds.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol, TypeVar

from aiohttp import web
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gateway.admin.input import meter_param, overrides_body, read_object, tenant_body, tenant_param
from gateway.errors import LimiterUnavailable, NotFound
from metering.clock import Clock, rfc3339, utcnow
from metering.meters import Meter
from metering.models import AlertEvent, AuditEntry, Tenant, TenantOverride
from metering.periods import period_bounds
from metering.tenant_rows import TenantChange, write_tenant
from quota.plans import RATE_METER, Plan
from quota.tenants import TenantDirectory, TenantRecord
from quota.usage_view import number, tenant_view

log = logging.getLogger("cosmos_gateway.admin")
ACTOR = web.RequestKey("actor", str)  # "token:<name>" or "jwt:<subject>", set by the admin API's auth middleware
# What an audit entry of an operator's tenant change shows of the tenant.
OPERATOR_FIELDS = ("plan", "status", "stripe_customer_id", "billing_anchor_day")
T = TypeVar("T")


class UsageReader(Protocol):
    """Current usage from the counting store (the Redis store implements it)."""

    async def usage(self, tenant: str, period_start: int, meters: Sequence[str]) -> dict[str, float]: ...

    async def tenant_seen(self, tenant: str) -> bool: ...

    async def tenants_seen_after(self, after: str | None, limit: int) -> list[str]: ...

    async def shadow_hits(self, tenant: str, period_start: int) -> dict[tuple[str, str], int]: ...


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda o: json.dumps(o, separators=(",", ":")))


async def seen(read: Awaitable[T]) -> T:
    """`read` of the tenant index, or 503 when the store is down."""
    try:
        return await read
    except Exception as exc:
        log.warning("admin API: tenants seen unavailable: %r", exc)
        raise LimiterUnavailable("the usage store is unavailable; try again shortly") from None


class TenantHandlers:
    """`/tenants/{tenant}` and `/tenants/{tenant}/overrides/{meter}`; `clock` gives epoch seconds."""

    def __init__(self, *, sessions: async_sessionmaker[AsyncSession], directory: TenantDirectory,
                 usage_reader: UsageReader, plans: Mapping[str, Plan], meters: Sequence[Meter],
                 default_plan: str | None, clock: Clock) -> None:
        self._sessions = sessions
        self._directory = directory
        self._usage = usage_reader
        self._plans = plans
        self._meters = tuple(meters)
        self._meter_names = frozenset(m.name for m in meters)
        self._default_plan = default_plan
        self._clock = clock

    # ---- the operations: the admin API's handlers below and the operator console both call these

    async def find(self, tenant: str) -> TenantRecord | None:
        """The tenant's record; NotFound when it has none and has sent no traffic."""
        record = self._directory.get(tenant)
        if record is None:
            # Created on another instance moments ago, or never: ask the store (admin path, not per request).
            record = await self._directory.reload(tenant)
        if record is None and not await seen(self._usage.tenant_seen(tenant)):
            raise NotFound(f"tenant {tenant!r} has no record and has sent no traffic", tenant=tenant)
        return record

    async def view(self, tenant: str, record: TenantRecord | None, *, alerts: bool = True,
                   shadow: bool = True) -> dict[str, Any]:
        """The tenant view (PRODUCT.md §6); `alerts=False` skips the SQL read of this period's alerts,
        `shadow=False` the read of its shadow rejections (lists of many tenants show neither)."""
        now = utcnow(self._clock)
        start, _ = period_bounds(now, record.billing_anchor_day if record is not None else None)
        names = sorted(self._meter_names)
        hits: dict[tuple[str, str], int] | None = None
        try:
            usage = await self._usage.usage(tenant, int(start.timestamp()), names)
            if shadow:
                hits = await self._usage.shadow_hits(tenant, int(start.timestamp()))
        except Exception as exc:
            log.warning("admin API: usage of %s unavailable: %r", tenant, exc)
            raise LimiterUnavailable("the usage store is unavailable; try again shortly") from None
        shown: list[dict[str, Any]] = []
        if alerts:
            async with self._sessions() as session:
                rows = (await session.scalars(
                    select(AlertEvent).where(AlertEvent.tenant_id == tenant, AlertEvent.period_start == start)
                    .order_by(AlertEvent.meter, AlertEvent.threshold))).all()
            shown = [{"meter": a.meter, "threshold": a.threshold, "at": rfc3339(a.at)} for a in rows]
        return tenant_view(tenant_id=tenant, record=record, plans=self._plans, default_plan=self._default_plan,
                           meters=self._meters, usage=usage, now=now, alerts=shown, shadow_hits=hits)

    async def update_tenant(self, tenant: str, body: Mapping[str, Any], actor: str) -> tuple[dict[str, Any], bool]:
        """PUT of a tenant: `body` as the API takes it (validated here); returns (view, created)."""
        values = tenant_body(body, self._plans)

        async def write() -> TenantChange:
            async with self._sessions() as session, session.begin():
                return await self._write_tenant(session, tenant, values, actor, utcnow())

        change = await _with_retry(write)
        if change.changed:
            await self._directory.announce(tenant)
        return await self.view(tenant, self._directory.get(tenant)), change.created

    async def set_override(self, tenant: str, meter: str, body: Mapping[str, Any], actor: str) -> dict[str, Any]:
        """PUT of an override: `meter` already checked (`meter_param`), `body` validated here; returns the view."""
        values = overrides_body(body, meter, utcnow(self._clock))

        async def write() -> None:
            async with self._sessions() as session, session.begin():
                now = utcnow()
                # Created when it has none; its updated_at moves either way, so the others reload its overrides.
                await self._write_tenant(session, tenant, {"updated_at": now}, actor, now)
                override = await session.get(TenantOverride, (tenant, meter))
                before = _override_state(override)
                if override is None:
                    override = TenantOverride(tenant_id=tenant, meter=meter)
                    session.add(override)
                for field in ("limit", "per_second", "burst", "expires_at", "reason", "enforce"):
                    setattr(override, field, values.get(field))
                override.updated_at = now
                session.add(self._audit(actor, tenant, "override.put", before, _override_state(override)))

        await _with_retry(write)
        await self._directory.announce(tenant)
        return await self.view(tenant, self._directory.get(tenant))

    async def remove_override(self, tenant: str, meter: str, actor: str) -> None:
        """DELETE of an override (back to the plan's limit); NotFound when there is none."""
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

    @property
    def meter_names(self) -> frozenset[str]:
        return self._meter_names

    # ---- the admin API's handlers

    async def get_tenant(self, request: web.Request) -> web.Response:
        tenant = tenant_param(request)
        return json_response(await self.view(tenant, await self.find(tenant)))

    async def put_tenant(self, request: web.Request) -> web.Response:
        tenant = tenant_param(request)
        view, created = await self.update_tenant(tenant, await read_object(request), request[ACTOR])
        return json_response(view, status=201 if created else 200)

    async def put_override(self, request: web.Request) -> web.Response:
        tenant = tenant_param(request)
        meter = meter_param(request, self._meter_names)
        return json_response(await self.set_override(tenant, meter, await read_object(request), request[ACTOR]))

    async def delete_override(self, request: web.Request) -> web.Response:
        tenant = tenant_param(request)
        meter = meter_param(request, self._meter_names)
        await self.remove_override(tenant, meter, request[ACTOR])
        return web.Response(status=204)

    async def _write_tenant(self, session: AsyncSession, tenant: str, values: Mapping[str, Any], actor: str,
                            now: datetime) -> TenantChange:
        """The operator's change of the tenant row (created, on `values` or the default plan, if it has none).

        `now` is the row's updated_at: the real time, not the injected clock, because the other instances
        reload the rows whose updated_at passed their own real-time watermark.
        """
        return await write_tenant(session, tenant, values, audited=OPERATOR_FIELDS, actor=actor,
                                  action="tenant.update", create_action="tenant.create", at=utcnow(self._clock),
                                  updated_at=now, defaults={"plan": self._default_plan or "starter"})

    def _audit(self, actor: str, tenant: str, action: str, before: dict[str, Any] | None,
               after: dict[str, Any] | None) -> AuditEntry:
        return AuditEntry(at=utcnow(self._clock), actor=actor, tenant_id=tenant, action=action, before=before,
                          after=after)


def _override_state(row: TenantOverride | None) -> dict[str, Any] | None:
    if row is None:
        return None
    if row.meter == RATE_METER:
        values: dict[str, Any] = {"per_second": number(row.per_second), "burst": row.burst}
    else:
        values = {"limit": row.limit}
    return {"meter": row.meter, **values, "expires_at": rfc3339(row.expires_at), "reason": row.reason,
            "enforce": row.enforce or "on"}


async def _with_retry(action: Callable[[], Awaitable[T]]) -> T:
    """Run a write transaction; a concurrent creation of the same tenant is retried once."""
    try:
        return await action()
    except IntegrityError:
        return await action()
