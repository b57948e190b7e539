"""The effective configuration as plain data with every secret masked (`cosmos-gateway check-config`).

Effective means what the gateway will run with: defaults filled in, the default meters and plan catalog
included, and the policy sections printed in the shape they are written in, so the output reads back
as a config.
"""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any
from urllib.parse import urlsplit

from billing_sync.settings import StripeSettings
from gateway.config.settings import SECRET_ENV, MetricsOptions, Settings
from metering.meters import Meter
from quota.alerts import AlertSettings
from quota.plans import Plan

MASK = "***"
_SECTIONS = ("listen", "upstream", "websocket", "redis", "database", "auth", "admin", "server", "billing")


def mask_url(url: str) -> str:
    """The URL with its password and every query value masked (`?password=…` is as secret as userinfo).

    Edited as text, not rebuilt with geturl(), which would drop the empty authority of `sqlite:///…`."""
    parts = urlsplit(url)
    if parts.password is not None:
        url = url.replace(f":{parts.password}@", f":{MASK}@", 1)
    base, sep, query = url.partition("?")
    if not sep:
        return url
    query, hash_, fragment = query.partition("#")
    masked = "&".join(f"{item.partition('=')[0]}={MASK}" if "=" in item else item for item in query.split("&"))
    return f"{base}?{masked}{hash_}{fragment}"


def _mask_webhook_url(url: str) -> str:
    """Only scheme and host: webhook URLs often carry their credential in the path (Slack, Teams)."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{host}/{MASK}" if parts.path not in ("", "/") or parts.query else url


def effective_config(settings: Settings) -> dict[str, Any]:
    """The settings as plain data with every secret masked, in the order and shape of the config keys."""
    data: dict[str, Any] = {name: asdict(getattr(settings, name)) for name in _SECTIONS}
    data["listen"]["proxy"] = str(settings.listen.proxy)
    data["listen"]["admin"] = str(settings.listen.admin)
    data["listen"]["trusted_proxies"] = [str(n) for n in settings.listen.trusted_proxies]
    # Under its config key (SECRET_ENV's), masked below like the others.
    data["billing"]["stripe_webhook_secret"] = data["billing"].pop("stripe_webhook_secrets") or None
    for section, key in SECRET_ENV.values():
        value = data[section].get(key)
        if not value:
            continue
        if key == "url":
            data[section][key] = mask_url(value)
        elif key == "tokens":
            data[section][key] = [f"{name}:{MASK}" for name, _ in settings.admin.tokens]
        elif isinstance(value, tuple):  # the webhook secrets: "***,***" tells the operator a roll is under way
            data[section][key] = ",".join(MASK for _ in value)
        else:
            data[section][key] = MASK
    for key in ("algorithms", "public_paths"):
        data["auth"][key] = list(data["auth"][key])
    if data["auth"].get("jwks_url"):
        data["auth"]["jwks_url"] = mask_url(data["auth"]["jwks_url"])
    policy = settings.policy
    billing = data["billing"]
    stripe = {**_stripe(policy.stripe), "portal_return_url": billing.pop("portal_return_url")}
    data["billing"] = {"period": billing.pop("period"), "bucket_seconds": billing.pop("bucket_seconds"),
                       "grace_seconds": billing.pop("grace_seconds"), "stripe": stripe, **billing}
    data["meters"] = {meter.name: _meter(meter) for meter in policy.meters}
    data["plans"] = {name: _plan(plan) for name, plan in policy.plans.items()}
    data["default_plan"] = settings.default_plan
    data["alerts"] = _alerts(policy.alerts)
    data["metrics"] = _metrics(policy.metrics)
    return data


def _meter(meter: Meter) -> dict[str, Any]:
    shown: dict[str, Any] = {"source": meter.source, "kind": meter.kind}
    match = {name: value for name, value in (("method", meter.method), ("path", meter.path)) if value is not None}
    if match:
        shown["match"] = match
    shown["stripe_event"] = meter.stripe_event
    shown["bill_server_errors"] = meter.bill_server_errors
    return shown


def _plan(plan: Plan) -> dict[str, Any]:
    rate = None if plan.rate is None else {"per_second": plan.rate.per_second, "burst": plan.rate.burst}
    if plan.shadow_rate is not None:  # `enforce: shadow`: a plan has one rate or the other
        rate = {"per_second": plan.shadow_rate.per_second, "burst": plan.shadow_rate.burst, "enforce": "shadow"}
    quotas: dict[str, Any] = {}
    for name, quota in plan.quotas.items():
        shown: dict[str, Any] = {"limit": quota.limit, "on_exceed": quota.on_exceed}
        if quota.shadow_limit is not None:  # `enforce: shadow`: only an override adds one beside an enforced limit
            shown.update(limit=quota.shadow_limit, enforce="shadow")
        if quota.guards:  # only gauge quotas may have the key at all
            shown["guards"] = [{"method": method, "path": path} if method is not None else {"path": path}
                               for method, path in quota.guards]
        quotas[name] = shown
    return {"rate": rate, "quotas": quotas}


def _alerts(alerts: AlertSettings) -> dict[str, Any]:
    return {
        "thresholds": list(alerts.thresholds),
        "webhook_url": None if alerts.webhook_url is None else _mask_webhook_url(alerts.webhook_url),
        "webhook_secret": None if alerts.webhook_secret is None else MASK,
        "max_attempts": alerts.max_attempts,
    }


def _metrics(metrics: MetricsOptions) -> dict[str, Any]:
    return asdict(metrics)


def _stripe(stripe: StripeSettings) -> dict[str, Any]:
    """`billing.stripe` as in effect; its key is STRIPE_API_KEY, shown masked as billing.stripe_api_key."""
    shown = {f.name: getattr(stripe, f.name) for f in fields(stripe) if f.name != "api_key"}
    shown["plans_by_lookup_key"] = dict(stripe.plans_by_lookup_key)
    if stripe.api_base is not None:
        shown["api_base"] = mask_url(stripe.api_base)
    return shown
