"""Endpoints the gateway answers itself on the proxy listener, under `/_gateway/` (PRODUCT.md §6).

`GET /_gateway/usage` shows the caller's own tenant: usage, limits, remaining and reset times, from
the same view the admin API serves; `GET /_gateway/usage/history` its usage history, as the admin API's
`/admin/tenants/{tenant}/usage` (gateway/admin/usage_history.py). The tenant's usage page, its one-time links
and Stripe's billing portal (`/_gateway/portal-link`, `/_gateway/portal…`, `/_gateway/billing/portal`) are
gateway/portal/'s. Nothing under `/_gateway/` is ever forwarded upstream.
A store that is down is a 503 (`limiter-unavailable` for Redis, `database-unavailable` for SQL), never a 500.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from redis.exceptions import RedisError

from gateway.admin.usage_history import history_response
from gateway.auth.tokens import Identity
from gateway.errors import DatabaseUnavailable, LimiterUnavailable, NotFound
from gateway.portal.endpoints import TenantPortal
from metering.meters import Meter
from metering.sql_errors import store_unavailable
from metering.store import StoreUnavailable
from metering.usage_history import UsageHistory
from quota.alerts import Alerts
from quota.limiter import Limiter
from quota.plans import Plan
from quota.tenants import TenantDirectory
from quota.usage_view import tenant_view

log = logging.getLogger("cosmos_gateway.own")
Authenticate = Callable[[web.BaseRequest], Awaitable[Identity]]
RETRY_AFTER = "1"
WebhookHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


class OwnEndpoints:
    def __init__(self, *, limiter: Limiter, directory: TenantDirectory, plans: Mapping[str, Plan],
                 meters: Sequence[Meter], default_plan: str | None, alerts: Alerts | None = None,
                 stripe_webhook: WebhookHandler | None = None, history: UsageHistory | None = None,
                 portal: TenantPortal | None = None, clock: Callable[[], float] = time.time) -> None:
        self._limiter = limiter
        self._directory = directory
        self._plans = plans
        self._meters = meters
        self._meter_names = [m.name for m in meters]
        self._default_plan = default_plan
        self._alerts = alerts
        self._stripe_webhook = stripe_webhook
        self._history = history
        self._portal = portal
        self._clock = clock

    async def handle(self, request: web.BaseRequest, path: str, authenticate: Authenticate) -> web.StreamResponse:
        if path == "/_gateway/usage" and request.method in ("GET", "HEAD"):
            identity = await authenticate(request)
            return await self._usage(identity)
        if path == "/_gateway/usage/history" and request.method in ("GET", "HEAD") and self._history is not None:
            identity = await authenticate(request)
            record = self._directory.get(identity.tenant)
            return await history_response(self._history, request, identity.tenant,
                                          record.billing_anchor_day if record is not None else None, self._clock)
        if path == "/_gateway/webhooks/stripe" and request.method == "POST" and self._stripe_webhook is not None:
            return await self._stripe_webhook(request)
        if self._portal is not None and self._portal.handles(path):
            return await self._portal.handle(request, path, authenticate, self._page_view)
        raise NotFound("no such gateway endpoint")

    async def _usage(self, identity: Identity) -> web.Response:
        view = await self.usage_view(identity.tenant)
        return web.Response(body=json.dumps(view).encode(), content_type="application/json")

    async def _page_view(self, tenant: str) -> dict[str, Any]:
        return await self.usage_view(tenant, alerts=False)

    async def usage_view(self, tenant: str, *, alerts: bool = True) -> dict[str, Any]:
        """The tenant view of `tenant` (with its alerts of this period when `alerts`); a store down is a 503."""
        record = self._directory.get(tenant)
        now = self._clock()
        try:
            usage = await self._limiter.usage(tenant, record, self._meter_names)
        except (StoreUnavailable, RedisError, OSError, TimeoutError) as exc:
            log.warning("usage of %s: the usage store is unavailable (%r)", tenant, exc)
            raise LimiterUnavailable("the usage store is unavailable; try again shortly",
                                     headers={"Retry-After": RETRY_AFTER}) from None
        view = tenant_view(tenant_id=tenant, record=record, plans=self._plans, default_plan=self._default_plan,
                           meters=self._meters, usage=usage, now=datetime.fromtimestamp(now, UTC))
        if alerts and self._alerts is not None:
            start, _ = self._limiter.period(record.billing_anchor_day if record else None, now)
            try:
                view["alerts"] = await self._alerts.alerts_for(tenant, datetime.fromtimestamp(start, UTC))
            except Exception as exc:
                if not store_unavailable(exc):  # PostgreSQL restarting included; anything else is a bug
                    raise
                log.warning("usage of %s: the SQL store failed (%r)", tenant, exc)
                raise DatabaseUnavailable("the SQL store is unavailable; try again shortly",
                                          headers={"Retry-After": RETRY_AFTER}) from None
        return view
