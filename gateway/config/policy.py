"""The metering policy of a configuration, typed: meters, plans, alerts, metrics options and Stripe settings.

`gateway.config.parse` calls `build_policy` once at load with the raw `meters:`, `plans:`, `alerts:`,
`metrics:` and `billing.stripe` sections; the result travels in `Settings.policy`, so nothing parses them
again. Each section is parsed by the layer that owns it (metering, quota, billing_sync); this module adds
the checks across sections. A bad entry raises ConfigError naming its key.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from billing_sync.settings import parse_stripe_settings
from gateway.config.settings import MetricsOptions, Policy
from metering.errors import ConfigError
from metering.meters import parse_meters
from quota.alerts import parse_alert_settings
from quota.plans import parse_plans


def build_policy(*, meters: Mapping[str, Any] | None, plans: Mapping[str, Any], alerts: Mapping[str, Any],
                 metrics: Mapping[str, Any], stripe: Mapping[str, Any], stripe_api_key: str | None,
                 default_plan: str | None) -> Policy:
    """The typed policy; `meters` None (no `meters:` key) means the default meters."""
    parsed_meters = parse_meters(meters)
    parsed_plans = parse_plans(plans, parsed_meters)
    alert_settings = parse_alert_settings(alerts)
    stripe_settings = parse_stripe_settings(stripe, stripe_api_key)
    for key, plan in stripe_settings.plans_by_lookup_key.items():
        if plan not in parsed_plans:
            raise ConfigError(f"billing.stripe.plans_by_lookup_key.{key}", f"unknown plan {plan!r}")
    if default_plan is not None and default_plan not in parsed_plans:
        raise ConfigError("default_plan", f"unknown plan {default_plan!r} (known: {', '.join(sorted(parsed_plans))})")
    return Policy(meters=parsed_meters, plans=parsed_plans, alerts=alert_settings, metrics=_metrics(metrics),
                  stripe=stripe_settings)


def _metrics(raw: Mapping[str, Any]) -> MetricsOptions:
    for key in raw:
        if key not in ("tenant_usage", "max_tenants"):
            raise ConfigError(f"metrics.{key}", "unknown key (allowed: max_tenants, tenant_usage)")
    tenant_usage = raw.get("tenant_usage", True)
    if not isinstance(tenant_usage, bool):
        raise ConfigError("metrics.tenant_usage", "expected true or false")
    max_tenants = raw.get("max_tenants", 10_000)
    if isinstance(max_tenants, bool) or not isinstance(max_tenants, int) or not 0 <= max_tenants <= 1_000_000:
        raise ConfigError("metrics.max_tenants", "expected an integer from 0 to 1000000")
    return MetricsOptions(tenant_usage, max_tenants)
