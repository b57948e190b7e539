"""The operator console at /admin/ui/ on the admin listener (PRODUCT.md §6a): server-rendered HTML.

    add_console(admin_app, settings=..., sessions=..., directory=..., authenticator=..., usage_reader=...,
                plans=..., meters=..., clock=..., sync=..., history=...)

Sign-in with an admin token or an admin-scoped JWT (the admin API's check), then a signed session cookie
(session.py); pages in pages.py, changes in actions.py through the admin API's operations, charts drawn as
SVG by charts.py, templates and the one stylesheet beside them. Nothing is fetched from elsewhere: the
console works on an air-gapped network.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gateway.admin.auth import AdminAuth
from gateway.admin.sync import SyncAdmin
from gateway.admin.tenants import TenantHandlers, UsageReader
from gateway.auth.tokens import Authenticator
from gateway.config.settings import Settings
from gateway.console.app import PREFIX, Console, console_app
from gateway.console.history import TrafficHistory
from gateway.console.overview import NearestLimits
from gateway.console.pages import routes
from gateway.console.session import Sessions, session_key
from metering.clock import Clock
from metering.meters import Meter
from metering.usage_history import UsageHistory
from quota.plans import Plan
from quota.tenants import TenantDirectory


def add_console(app: web.Application, *, settings: Settings, sessions: async_sessionmaker[AsyncSession],
                directory: TenantDirectory, authenticator: Authenticator, usage_reader: UsageReader,
                plans: Mapping[str, Plan], meters: Sequence[Meter], clock: Clock,
                sync: SyncAdmin | None = None, history: UsageHistory | None = None) -> web.Application:
    """Mount the console at /admin/ui on the admin listener's app (beside the admin API at /admin)."""
    tenants = TenantHandlers(sessions=sessions, directory=directory, usage_reader=usage_reader, plans=plans,
                             meters=meters, default_plan=settings.default_plan, clock=clock)
    console = Console(
        auth=AdminAuth(settings.admin.tokens, settings.admin.scope, authenticator),
        keys=Sessions(session_key(settings.admin.tokens, settings.auth.hs256_secret)),
        tenants=tenants, sync=sync, sessions=sessions, usage=usage_reader, directory=directory,
        plans=tuple(sorted(plans)), meters=tuple(sorted(m.name for m in meters)), history=TrafficHistory(),
        nearest=NearestLimits(tenants, usage_reader, directory), settings=settings, clock=clock,
        type_base=settings.server.problem_type_base, usage_history=history,
    )
    sub = console_app(console, routes())
    app.add_subapp(PREFIX, sub)
    return sub
