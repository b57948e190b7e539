"""The in-process tenant directory: plans, status and overrides, never read from SQL per request.

Loaded whole at start, then kept fresh two ways: a change published on the Redis channel
`gw:tenants:changed` reloads that tenant on every instance at once, and an incremental reload
(tenants whose `updated_at` moved) runs every `reload_interval` seconds in case a message was
missed (Redis down, a subscriber reconnecting). The instance that made a change reloads it
before answering, so the change is effective there immediately.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from metering.clock import Clock, system_clock, utcnow
from metering.keys import TENANTS_CHANGED_CHANNEL
from metering.models import Tenant, TenantOverride
from metering.tasks import cancel_and_wait
from quota.plans import Override

log = logging.getLogger("cosmos_gateway.tenants")
# Rows changed this close to the last reload are read again: clocks of instances differ a little.
_CLOCK_MARGIN = timedelta(seconds=2)


@dataclass(frozen=True, slots=True)
class TenantRecord:
    id: str
    plan: str
    status: str
    subscription_status: str | None
    stripe_customer_id: str | None
    stripe_subscription_id: str | None
    billing_anchor_day: int | None
    overrides: tuple[Override, ...]
    updated_at: datetime | None = None
    subscription_changed_at: datetime | None = None  # the newest Stripe event applied
    # When the subscription became past due (None unless past due): the grace counts from here.
    past_due_since: datetime | None = None


def to_record(tenant: Tenant, overrides: list[TenantOverride]) -> TenantRecord:
    return TenantRecord(
        id=tenant.id, plan=tenant.plan, status=tenant.status, subscription_status=tenant.subscription_status,
        stripe_customer_id=tenant.stripe_customer_id, stripe_subscription_id=tenant.stripe_subscription_id,
        billing_anchor_day=tenant.billing_anchor_day,
        overrides=tuple(
            Override(meter=o.meter, limit=o.limit, per_second=o.per_second, burst=o.burst,
                     expires_at=o.expires_at, reason=o.reason,
                     enforce="shadow" if o.enforce == "shadow" else "on")  # NULL: a row from before 0004
            for o in overrides
        ),
        updated_at=tenant.updated_at,  # aware UTC: models.UTCDateTime
        subscription_changed_at=tenant.stripe_event_at,
        past_due_since=tenant.past_due_since,
    )


class TenantDirectory:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], redis: Any | None, *,
                 reload_interval: float = 5.0, clock: Clock = system_clock) -> None:
        self._sessions = sessions
        self._redis = redis
        self._reload_interval = reload_interval
        self._clock = clock
        self._records: dict[str, TenantRecord] = {}
        self._watermark: datetime | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def get(self, tenant: str) -> TenantRecord | None:
        return self._records.get(tenant)

    def all(self) -> dict[str, TenantRecord]:
        return dict(self._records)

    async def start(self) -> None:
        await self.reload_changed()
        self._tasks.append(asyncio.create_task(self._reload_loop()))
        if self._redis is not None:
            self._tasks.append(asyncio.create_task(self._listen()))

    async def close(self) -> None:
        await cancel_and_wait(self._tasks)
        self._tasks.clear()

    async def reload_changed(self) -> int:
        """Load tenants changed since the last load (all of them the first time)."""
        started = utcnow(self._clock)
        async with self._sessions() as session:
            query = select(Tenant)
            if self._watermark is not None:
                query = query.where(Tenant.updated_at >= self._watermark - _CLOCK_MARGIN)
            tenants = list((await session.scalars(query)).all())
            overrides: dict[str, list[TenantOverride]] = {t.id: [] for t in tenants}
            if tenants:
                rows = await session.scalars(
                    select(TenantOverride).where(TenantOverride.tenant_id.in_(list(overrides))))
                for row in rows:
                    overrides[row.tenant_id].append(row)
        for tenant in tenants:
            self._records[tenant.id] = to_record(tenant, overrides[tenant.id])
        self._watermark = started
        return len(tenants)

    async def reload(self, tenant_id: str) -> TenantRecord | None:
        """Reload one tenant now (after a change made here, or announced by another instance)."""
        async with self._sessions() as session:
            tenant = await session.get(Tenant, tenant_id)
            rows = [] if tenant is None else list(
                (await session.scalars(select(TenantOverride).where(TenantOverride.tenant_id == tenant_id))).all())
        if tenant is None:
            self._records.pop(tenant_id, None)
            return None
        record = self._records[tenant_id] = to_record(tenant, rows)
        return record

    async def announce(self, tenant_id: str) -> None:
        """Apply a change here at once, and tell the other instances."""
        await self.reload(tenant_id)
        if self._redis is not None:
            try:
                await self._redis.publish(TENANTS_CHANGED_CHANNEL, tenant_id)
            except Exception:  # the periodic reload delivers it within reload_interval
                log.warning("could not publish a tenant change; other instances pick it up by reload")

    async def _reload_loop(self) -> None:
        while True:
            await asyncio.sleep(self._reload_interval)
            try:
                await self.reload_changed()
            except Exception:
                log.exception("tenant reload failed; keeping the cached tenants")

    async def _listen(self) -> None:
        while True:
            try:
                pubsub = self._redis.pubsub()
                await pubsub.subscribe(TENANTS_CHANGED_CHANNEL)
                async for message in pubsub.listen():
                    if message.get("type") != "message":
                        continue
                    data = message["data"]
                    await self.reload(data.decode() if isinstance(data, bytes) else str(data))
            except asyncio.CancelledError:
                raise
            except Exception:
                # Redis away: the periodic reload covers us; try to subscribe again shortly.
                await asyncio.sleep(1.0)
