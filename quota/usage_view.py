"""The tenant view and the plan catalog as the admin API and `/_gateway/usage` show them (pure).

Shapes are PRODUCT.md §6. Every instant is RFC 3339 in UTC with a `Z`; `limit`/`remaining` are
null when unlimited, and are the enforced limit: a limit of `enforce: shadow` is `shadow_limit` beside
it (`rate.shadow` for the rate), null when there is none. A gauge holds its last reported value and
never resets, so its `resets_at` is null and its forecast is its current value; a counter's forecast
extrapolates the period so far.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from metering.clock import rfc3339
from metering.meters import Meter
from metering.periods import period_bounds
from quota.plans import RATE_METER, Plan, Quota, Rate, effective
from quota.tenants import TenantRecord


def number(value: float | None) -> float | int | None:
    """An integral float as an int (JSON `3`, not `3.0`), other values unchanged."""
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def forecast(used: float, start: datetime, end: datetime, now: datetime) -> float | int:
    """End-of-period value of a counter if it keeps growing at its average rate so far."""
    elapsed = (now - start).total_seconds()
    length = (end - start).total_seconds()
    if used <= 0 or elapsed <= 0 or length <= 0:
        return number(float(used)) or 0
    projected = max(float(used), used / elapsed * length)
    if float(used).is_integer():
        return round(projected)  # whole units stay whole
    return number(round(projected, 3)) or 0


def _meter_entry(quota: Quota | None, used: float, source: str, *, gauge: bool, start: datetime,
                 end: datetime, now: datetime) -> dict[str, Any]:
    limit = None if quota is None else quota.limit
    shadow = None if quota is None else quota.shadow_limit
    return {
        "used": number(float(used)),
        "limit": number(None if limit is None else float(limit)),
        "shadow_limit": number(None if shadow is None else float(shadow)),
        "remaining": None if limit is None else number(max(0.0, float(limit) - float(used))),
        "resets_at": None if gauge else rfc3339(end),
        "on_exceed": None if quota is None else quota.on_exceed,
        "source": source,
        "forecast": number(float(used)) if gauge else forecast(used, start, end, now),
    }


def _rate(rate: Rate | None) -> dict[str, Any] | None:
    return None if rate is None else {"per_second": number(float(rate.per_second)), "burst": rate.burst}


def _rate_entry(rate: Rate | None, source: str, shadow: Rate | None) -> dict[str, Any]:
    return {
        "per_second": None if rate is None else number(float(rate.per_second)),
        "burst": None if rate is None else rate.burst,
        "source": source,
        "shadow": _rate(shadow),
    }


def shadow_rejections(hits: Mapping[tuple[str, str], int]) -> list[dict[str, Any]]:
    """The period's shadow hits as the admin view lists them: most first, then by reason and meter."""
    return [{"reason": reason, "meter": meter, "count": count}
            for (reason, meter), count in sorted(hits.items(), key=lambda item: (-item[1], item[0]))]


def tenant_view(*, tenant_id: str, record: TenantRecord | None, plans: Mapping[str, Plan],
                default_plan: str | None, meters: Sequence[Meter], usage: Mapping[str, float],
                now: datetime, alerts: Sequence[Mapping[str, Any]] = (),
                shadow_hits: Mapping[tuple[str, str], int] | None = None) -> dict[str, Any]:
    """The tenant view: plan, status, Stripe ids, period, effective limits and usage per meter.

    Shows every quota meter of the effective plan (overrides applied), plus every counter meter
    with usage this period. A tenant without a record (it only sent traffic) is on `default_plan`.
    With `shadow_hits` (the admin view; a tenant's own view has none) it lists them as `shadow_rejections`.
    """
    plan_name = record.plan if record is not None else default_plan
    plan = plans.get(plan_name) if plan_name is not None else None
    if plan is None:  # no plan (or one dropped from the config): nothing limits it
        plan = Plan(plan_name or "", None, {})
    rate, quotas, sources, shadow_rate = effective(plan, record.overrides if record is not None else (), now)
    start, end = period_bounds(now, record.billing_anchor_day if record is not None else None)
    kinds = {m.name: m.kind for m in meters}

    names = list(quotas)
    names += sorted(m for m in usage if m not in quotas and kinds.get(m) == "counter")
    meter_view = {
        name: _meter_entry(quotas.get(name), usage.get(name, 0.0), sources.get(name, "plan"),
                           gauge=kinds.get(name) == "gauge", start=start, end=end, now=now)
        for name in names
    }
    view = {
        "tenant": tenant_id,
        "plan": plan_name,
        "status": record.status if record is not None else "active",
        "subscription_status": record.subscription_status if record is not None else None,
        "stripe_customer_id": record.stripe_customer_id if record is not None else None,
        "stripe_subscription_id": record.stripe_subscription_id if record is not None else None,
        "billing_anchor_day": record.billing_anchor_day if record is not None else None,
        "period": {"start": rfc3339(start), "end": rfc3339(end)},
        "rate": _rate_entry(rate, sources.get(RATE_METER, "plan"), shadow_rate),
        "meters": meter_view,
        "alerts": [dict(alert) for alert in alerts],
    }
    if shadow_hits is not None:
        view["shadow_rejections"] = shadow_rejections(shadow_hits)
    return view


def _quota_entry(quota: Quota) -> dict[str, Any]:
    return {
        "limit": number(None if quota.limit is None else float(quota.limit)),
        "shadow_limit": number(None if quota.shadow_limit is None else float(quota.shadow_limit)),
        "on_exceed": quota.on_exceed,
        "guards": [{"method": method, "path": path} for method, path in quota.guards],
    }


def plan_catalog_view(plans: Mapping[str, Plan], default_plan: str | None = None) -> dict[str, Any]:
    """The effective plan catalog for `GET /admin/plans`."""
    return {
        "default_plan": default_plan,
        "plans": {
            name: {
                "rate": _rate(plan.rate),
                "shadow_rate": _rate(plan.shadow_rate),
                "quotas": {meter: _quota_entry(quota) for meter, quota in plan.quotas.items()},
            }
            for name, plan in sorted(plans.items())
        },
    }
