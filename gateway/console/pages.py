"""The console's pages: overview, tenants, one tenant, billing sync, audit log (GET, read only).

Reads go to the same sources as the admin API (the tenant view of gateway/admin/tenants.py, the sync state
of gateway/admin/sync.py, the audit table); every list is paged and every scan bounded.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from sqlalchemy import select

from gateway.admin.input import Errors, invalid
from gateway.admin.tenants import seen
from gateway.console.app import CONSOLE, PREFIX, render, svg
from gateway.console.charts import Axis, Series, day_ticks, line_chart, usage_bar
from gateway.console.overview import forecast_line, period_usage
from gateway.errors import GatewayError, LimiterUnavailable
from metering.clock import rfc3339, utc, utcnow
from metering.keys import TENANT_ID
from metering.models import AuditEntry, Tenant, TenantOverride
from quota.plans import RATE_METER

log = logging.getLogger("cosmos_gateway.console")
TENANT_PAGE = 25
AUDIT_PAGE = 50
TENANT_AUDIT = 20  # the newest audit entries shown on a tenant's page
_TENANT_MESSAGE = "expected 1-64 characters of A-Z a-z 0-9 . _ : -"
_PREFIX_CHARS = re.compile(r"[A-Za-z0-9._:-]{0,64}")
_DONE = {  # the note after a change (a fixed text per kind, nothing reflected from the URL)
    "saved": "Plan and status saved.",
    "override-saved": "Override saved.",
    "override-removed": "Override removed: the plan's limit applies again.",
    "requeued": "The bucket is pending again: the next sync pass sends it.",
}


def done_note(request: web.Request) -> str | None:
    return _DONE.get(request.query.get("done", ""))


def tenant_id(value: str | None, field: str = "tenant") -> str:
    if value is None or not TENANT_ID.fullmatch(value):
        raise invalid(field, _TENANT_MESSAGE)
    return value


# --------------------------------------------------------------------------- overview


def _hour_ticks(start: float, end: float) -> list[tuple[float, str]]:
    first = int(start // 3600 + 1) * 3600
    return [(t, utc(t).strftime("%H:%M")) for t in range(first, int(end) + 1, 3600)]


async def overview(request: web.Request) -> web.Response:
    console = request.app[CONSOLE]
    now = console.clock()
    minutes = console.history.minutes()
    axis = Axis(now - 6 * 3600, now, _hour_ticks(now - 6 * 3600, now))
    traffic = [Series("requests per minute", [(m.start + 30, m.requests) for m in minutes], "s0")]
    reasons = sorted({r for m in minutes for r in m.rejections})
    rejected = [Series(f"{reason} per minute", [(m.start + 30, m.rejections.get(reason, 0.0)) for m in minutes],
                       f"s{i % 6 + 1}") for i, reason in enumerate(reasons)]
    last_hour = [m for m in minutes if m.start >= now - 3600]
    totals = {"requests": sum(m.requests for m in last_hour),
              "rejections": {r: sum(m.rejections.get(r, 0.0) for m in last_hour) for r in reasons}}
    spool = console.history.sample()
    nearest: list[Any] = []
    scanned = 0
    problems: list[str] = []
    try:
        found, scanned = await console.nearest.top()
        nearest = [{"item": n, "bar": svg(usage_bar(n.used, n.limit, label=f"{n.tenant} {n.meter}"))}
                   for n in found]
    except Exception as exc:  # the usage store is down: the rest of the overview still shows
        log.warning("console: tenants nearest their limits unavailable: %r", exc)
        problems.append(f"tenants nearest their limits: the usage store is unavailable ({type(exc).__name__})")
    sync = await _sync_state(console, problems)
    return render(request, "overview.html", title="Overview", section="overview",
                  traffic=svg(line_chart(traffic, axis, title="Requests per minute, last 6 hours")),
                  rejected=svg(line_chart(rejected, axis, title="Rejections per minute by reason, last 6 hours")),
                  reasons=[(r, f"s{i % 6 + 1}") for i, r in enumerate(reasons)], totals=totals, nearest=nearest,
                  scanned=scanned, sync=sync, problems=problems, spool=spool,
                  on_error=console.settings.redis.on_error, spool_max=console.settings.redis.spool_max_bytes)


async def _sync_state(console: Any, problems: list[str]) -> dict[str, Any] | None:
    if console.sync is None:
        return None
    try:
        return await console.sync.snapshot()
    except Exception as exc:  # the overview shows what it can; the sync page reports the error itself
        problems.append(f"billing sync state unavailable ({type(exc).__name__})")
        return None


# --------------------------------------------------------------------------- tenants


def _prefix_param(request: web.Request) -> str:
    text = request.query.get("q", "").strip()
    if not _PREFIX_CHARS.fullmatch(text):
        raise invalid("q", "a tenant id's beginning: up to 64 characters of A-Z a-z 0-9 . _ : -")
    return text


def _seen_after(prefix: str, after: str | None) -> str | None:
    """The exclusive lower bound for the tenant index's range read: `after`, or just below `prefix`."""
    if after is not None and after >= prefix:
        return after
    if not prefix:
        return after
    # Every valid id character sorts below "~": this bound is above every id that starts before the prefix.
    return prefix[:-1] + chr(ord(prefix[-1]) - 1) + "~"


async def tenants(request: web.Request) -> web.Response:
    console = request.app[CONSOLE]
    errors = Errors()
    try:
        prefix = _prefix_param(request)
    except GatewayError:
        errors.add("q", "a tenant id's beginning: up to 64 characters of A-Z a-z 0-9 . _ : -")
        prefix = ""
    after = request.query.get("after") or None
    if after is not None and not TENANT_ID.fullmatch(after):
        errors.add("after", _TENANT_MESSAGE)
    errors.raise_if_any("invalid query")
    seen_ids = await seen(console.usage.tenants_seen_after(_seen_after(prefix, after), TENANT_PAGE + 1))
    seen_ids = [t for t in seen_ids if t.startswith(prefix) and TENANT_ID.fullmatch(t)]
    async with console.sessions() as session:
        column = Tenant.id.collate("C") if session.get_bind().dialect.name == "postgresql" else Tenant.id
        query = select(Tenant).order_by(column).limit(TENANT_PAGE + 1)
        if prefix:
            query = query.where(Tenant.id.startswith(prefix, autoescape=True))
        if after is not None:
            query = query.where(column > after)
        rows = {t.id: t for t in (await session.scalars(query)).all()}
    ids = sorted(set(rows) | set(seen_ids))[: TENANT_PAGE + 1]
    page = ids[:TENANT_PAGE]
    items = []
    for tenant in page:
        view = await console.tenants.view(tenant, console.directory.get(tenant), alerts=False, shadow=False)
        bars = [(meter, entry, svg(usage_bar(float(entry["used"]), float(entry["limit"]), label=meter)))
                for meter, entry in view["meters"].items() if entry["limit"] is not None]
        items.append({"view": view, "bars": bars, "registered": tenant in rows})
    next_after = page[-1] if len(ids) > TENANT_PAGE else None
    return render(request, "tenants.html", title="Tenants", section="tenants", items=items, q=prefix,
                  next_after=next_after, after=after)


async def tenant(request: web.Request, *, errors: list[dict[str, str]] | None = None, status: int = 200,
                 form: dict[str, str] | None = None, tenant_name: str | None = None) -> web.Response:
    console = request.app[CONSOLE]
    name = tenant_name or tenant_id(request.query.get("id"), "id")
    record = await console.tenants.find(name)
    view = await console.tenants.view(name, record)
    now = utcnow(console.clock)
    start = datetime.fromisoformat(view["period"]["start"])
    end = datetime.fromisoformat(view["period"]["end"])
    axis = Axis(start.timestamp(), end.timestamp(), day_ticks(start, end))
    charts = []
    for meter, entry in view["meters"].items():
        if entry["limit"] is None:
            continue
        used = float(entry["used"])
        history = await period_usage(name, meter, start=start, now=now, used=used,
                                     gauge=entry["resets_at"] is None, history=console.usage_history)
        series = [Series(f"{meter} used", history, "s0"),
                  Series(f"{meter} forecast", forecast_line(now, end, used, float(entry["forecast"])), "s2",
                         dashed=True)]
        charts.append((meter, svg(line_chart(series, axis, limit=float(entry["limit"]),
                                             title=f"{meter}: used this period, forecast and limit"))))
    overrides = sorted(record.overrides, key=lambda o: o.meter) if record is not None else []
    async with console.sessions() as session:
        audit = list((await session.scalars(
            select(AuditEntry).where(AuditEntry.tenant_id == name).order_by(AuditEntry.id.desc())
            .limit(TENANT_AUDIT))).all())
    return render(request, "tenant.html", status=status, title=f"Tenant {name}", section="tenants", view=view,
                  tenant=name, charts=charts, overrides=overrides, audit=[_audit_row(e) for e in audit],
                  plans=console.plans, meters=[*console.meters, RATE_METER], errors=errors or [], form=form or {},
                  done=done_note(request), rfc3339=rfc3339, overrides_model=TenantOverride)


# --------------------------------------------------------------------------- billing sync, audit


async def sync_page(request: web.Request) -> web.Response:
    console = request.app[CONSOLE]
    if console.sync is None:
        raise LimiterUnavailable("the billing sync is not available on this gateway")
    state = await console.sync.snapshot()
    return render(request, "sync.html", title="Billing sync", section="sync", sync=state, done=done_note(request))


def _audit_row(entry: AuditEntry) -> dict[str, Any]:
    def shown(value: Any) -> str:
        return "" if value is None else json.dumps(value, separators=(", ", ": "), sort_keys=True, default=str)

    return {"id": entry.id, "at": rfc3339(entry.at.astimezone(UTC), whole_seconds=True), "actor": entry.actor,
            "tenant": entry.tenant_id, "action": entry.action, "before": shown(entry.before),
            "after": shown(entry.after)}


async def audit(request: web.Request) -> web.Response:
    console = request.app[CONSOLE]
    errors = Errors()
    filters = {name: request.query.get(name, "").strip() for name in ("tenant", "actor", "action")}
    if filters["tenant"] and not TENANT_ID.fullmatch(filters["tenant"]):
        errors.add("tenant", _TENANT_MESSAGE)
    if len(filters["actor"]) > 255:
        errors.add("actor", "at most 255 characters")
    if len(filters["action"]) > 64:
        errors.add("action", "at most 64 characters")
    before_text = request.query.get("before", "")
    if before_text and not re.fullmatch(r"[0-9]{1,18}", before_text):
        errors.add("before", "expected an entry id")
    errors.raise_if_any("invalid query")
    query = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(AUDIT_PAGE + 1)
    if filters["tenant"]:
        query = query.where(AuditEntry.tenant_id == filters["tenant"])
    if filters["actor"]:
        query = query.where(AuditEntry.actor == filters["actor"])
    if filters["action"]:
        query = query.where(AuditEntry.action == filters["action"])
    if before_text:
        query = query.where(AuditEntry.id < int(before_text))
    async with console.sessions() as session:
        rows = list((await session.scalars(query)).all())
    next_before = rows[AUDIT_PAGE - 1].id if len(rows) > AUDIT_PAGE else None
    return render(request, "audit.html", title="Audit log", section="audit", entries=[_audit_row(e) for e in
                  rows[:AUDIT_PAGE]], filters=filters, next_before=next_before, actions=_ACTIONS)


_ACTIONS = ("tenant.create", "tenant.update", "override.put", "override.delete", "sync.requeue")


def routes() -> list[web.RouteDef]:
    from gateway.console import actions

    return [
        web.get("/", overview, name="overview"),
        web.get("/tenants", tenants, name="tenants"),
        web.get("/tenant", tenant, name="tenant"),
        web.get("/sync", sync_page, name="sync"),
        web.get("/audit", audit, name="audit"),
        *actions.routes(),
    ]


__all__ = ["PREFIX", "routes"]
