"""The metering policy of a configuration, typed: meters, plans, alerts and metrics options.

`gateway.config.settings` keeps `meters:`, `plans:`, `alerts:` and `metrics:` as plain data; this module turns
them into the objects of `metering` and `quota` and reports a bad entry as a ConfigError naming its key.
`parse_settings` calls `build_policy` once to validate at start-up; the worker builds it again to use.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from billing_sync.settings import StripeSettings, parse_stripe_settings
from gateway.config.settings import ConfigError, Settings
from metering.errors import ConfigurationError
from metering.meters import Meter, MeterMatcher, parse_meters
from quota.alerts import AlertSettings, parse_alert_settings
from quota.plans import Plan, parse_plans


@dataclass(frozen=True)
class MetricsOptions:
    tenant_usage: bool = True
    max_tenants: int = 10_000


@dataclass(frozen=True)
class Policy:
    meters: tuple[Meter, ...]
    matcher: MeterMatcher
    plans: Mapping[str, Plan]
    alerts: AlertSettings
    metrics: MetricsOptions
    stripe: StripeSettings


def build_policy(settings: Settings) -> Policy:
    try:
        meters = parse_meters(settings.meters)
        plans = parse_plans(settings.plans, meters)
        alerts = parse_alert_settings(settings.alerts)
        stripe = parse_stripe_settings(settings.billing.stripe, settings.billing.stripe_api_key)
    except ConfigurationError as exc:
        raise ConfigError(str(exc)) from None
    for key, plan in stripe.plans_by_lookup_key.items():
        if plan not in plans:
            raise ConfigError(f"billing.stripe.plans_by_lookup_key.{key}: unknown plan {plan!r}")
    if settings.default_plan is not None and settings.default_plan not in plans:
        raise ConfigError(f"default_plan: unknown plan {settings.default_plan!r} "
                          f"(known: {', '.join(sorted(plans))})")
    return Policy(meters, MeterMatcher(meters), plans, alerts, _metrics(settings.metrics), stripe)


def _metrics(raw: Mapping[str, Any]) -> MetricsOptions:
    for key in raw:
        if key not in ("tenant_usage", "max_tenants"):
            raise ConfigError(f"metrics.{key}: unknown key (allowed: max_tenants, tenant_usage)")
    tenant_usage = raw.get("tenant_usage", True)
    if not isinstance(tenant_usage, bool):
        raise ConfigError("metrics.tenant_usage: expected true or false")
    max_tenants = raw.get("max_tenants", 10_000)
    if isinstance(max_tenants, bool) or not isinstance(max_tenants, int) or not 0 <= max_tenants <= 1_000_000:
        raise ConfigError("metrics.max_tenants: expected an integer from 0 to 1000000")
    return MetricsOptions(tenant_usage, max_tenants)
