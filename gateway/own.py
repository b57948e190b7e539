"""Endpoints the gateway answers itself on the proxy listener, under `/_gateway/` (PRODUCT.md §6).

`GET /_gateway/usage` shows the caller's own tenant: usage, limits, remaining and reset times, from
the same view the admin API serves. Nothing under `/_gateway/` is ever forwarded upstream.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime

from aiohttp import web

from gateway.auth import Identity
from gateway.errors import NotFound
from metering.meters import Meter
from quota.alerts import Alerts
from quota.limiter import Limiter
from quota.plans import Plan
from quota.tenants import TenantDirectory
from quota.usage_view import tenant_view

Authenticate = Callable[[web.BaseRequest], Awaitable[Identity]]
WebhookHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


class OwnEndpoints:
    def __init__(self, *, limiter: Limiter, directory: TenantDirectory, plans: Mapping[str, Plan],
                 meters: Sequence[Meter], default_plan: str | None, alerts: Alerts | None = None,
                 stripe_webhook: WebhookHandler | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._limiter = limiter
        self._directory = directory
        self._plans = plans
        self._meters = meters
        self._meter_names = [m.name for m in meters]
        self._default_plan = default_plan
        self._alerts = alerts
        self._stripe_webhook = stripe_webhook
        self._clock = clock

    async def handle(self, request: web.BaseRequest, path: str, authenticate: Authenticate) -> web.StreamResponse:
        if path == "/_gateway/usage" and request.method in ("GET", "HEAD"):
            identity = await authenticate(request)
            return await self._usage(identity)
        if path == "/_gateway/webhooks/stripe" and request.method == "POST" and self._stripe_webhook is not None:
            return await self._stripe_webhook(request)
        raise NotFound("no such gateway endpoint")

    async def _usage(self, identity: Identity) -> web.Response:
        tenant = identity.tenant
        record = self._directory.get(tenant)
        now = self._clock()
        usage = await self._limiter.usage(tenant, record, self._meter_names)
        view = tenant_view(tenant_id=tenant, record=record, plans=self._plans, default_plan=self._default_plan,
                           meters=self._meters, usage=usage, now=datetime.fromtimestamp(now, UTC))
        if self._alerts is not None:
            start, _ = self._limiter.period(record.billing_anchor_day if record else None, now)
            view["alerts"] = await self._alerts.alerts_for(tenant, datetime.fromtimestamp(start, UTC))
        return web.Response(body=json.dumps(view).encode(), content_type="application/json")
