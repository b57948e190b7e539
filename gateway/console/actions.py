"""The console's changes (POST): plan and status, overrides, re-queueing a parked bucket.

Each calls the admin API's own operation (gateway/admin/tenants.py `TenantHandlers`, gateway/admin/sync.py
`SyncAdmin.requeue`) with the signed-in actor, so it is validated, written, audited and announced to every
instance exactly as the same call through the API. The middleware has checked the session and the CSRF token
and read the form; a change ends in a 303 back to the page (a reload never posts twice), bad input in the
page again with the errors beside their fields (400).
"""

from __future__ import annotations

from urllib.parse import urlencode

from aiohttp import web

from gateway.admin.input import invalid, quoted
from gateway.console import forms
from gateway.console.app import CONSOLE, FORM, PREFIX, SESSION
from gateway.console.pages import tenant, tenant_id
from gateway.console.session import Session
from gateway.errors import InvalidRequest, LimiterUnavailable, NotFound
from quota.plans import RATE_METER

_MAX_IDENTIFIER = 100  # a ledger row's identifier (billing_sync.buckets: at most 100 characters)


def _actor(request: web.Request) -> str:
    session = request[SESSION]
    assert isinstance(session, Session)  # the middleware let no POST without a session through
    return session.actor


def _back(name: str, done: str) -> web.HTTPSeeOther:
    return web.HTTPSeeOther(f"{PREFIX}/tenant?{urlencode({'id': name, 'done': done})}")


async def _again(request: web.Request, name: str, error: InvalidRequest) -> web.Response:
    """The tenant's page again with the problems of the form beside its fields (a 400); for a tenant that does
    not exist yet (the change would have created it), the error page with the problems."""
    try:
        return await tenant(request, errors=error.extra.get("errors") or [], status=400, form=request[FORM],
                            tenant_name=name)
    except NotFound:
        raise error from None


async def update_tenant(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE]
    form = request[FORM]
    name = tenant_id(form.get("tenant"))
    try:
        await console.tenants.update_tenant(name, forms.tenant_body(form), _actor(request))
    except InvalidRequest as error:
        return await _again(request, name, error)
    raise _back(name, "saved")


async def set_override(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE]
    form = request[FORM]
    name = tenant_id(form.get("tenant"))
    meter = form.get("meter", "")
    try:
        if meter != RATE_METER and meter not in console.tenants.meter_names:
            raise InvalidRequest(f"unknown meter {quoted(meter)}",
                                 errors=[{"field": "meter", "message": f"unknown meter {quoted(meter)}"}])
        await console.tenants.set_override(name, meter, forms.override_body(form, meter), _actor(request))
    except InvalidRequest as error:
        return await _again(request, name, error)
    raise _back(name, "override-saved")


async def remove_override(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE]
    form = request[FORM]
    name = tenant_id(form.get("tenant"))
    meter = form.get("meter", "")
    if meter != RATE_METER and meter not in console.tenants.meter_names:
        raise invalid("meter", f"unknown meter {quoted(meter)}")
    await console.tenants.remove_override(name, meter, _actor(request))
    raise _back(name, "override-removed")


async def requeue(request: web.Request) -> web.StreamResponse:
    console = request.app[CONSOLE]
    if console.sync is None:
        raise LimiterUnavailable("the billing sync is not available on this gateway")
    identifier = request[FORM].get("identifier", "")
    if not identifier or len(identifier) > _MAX_IDENTIFIER or not identifier.isprintable():
        raise invalid("identifier", f"expected a ledger row's identifier (1-{_MAX_IDENTIFIER} characters)")
    await console.sync.requeue(identifier, _actor(request))
    raise web.HTTPSeeOther(f"{PREFIX}/sync?done=requeued")


def routes() -> list[web.RouteDef]:
    return [
        web.post("/tenant/plan", update_tenant),
        web.post("/tenant/override", set_override),
        web.post("/tenant/override/delete", remove_override),
        web.post("/sync/requeue", requeue),
    ]
