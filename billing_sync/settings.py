"""`billing.stripe` of the configuration, typed and validated (PRODUCT.md §2, §8)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal
from urllib.parse import urlsplit

from metering.errors import ConfigError, expect_mapping, kind_of

DEFAULT_PLANS_BY_LOOKUP_KEY: Mapping[str, str] = MappingProxyType({
    "starter_monthly": "starter", "starter_yearly": "starter",
    "professional_monthly": "professional", "professional_yearly": "professional",
    "enterprise_monthly": "enterprise", "enterprise_yearly": "enterprise",
    "sovereign_monthly": "sovereign", "sovereign_yearly": "sovereign",
})
_KEYS = ("mode", "api_base", "max_events_per_second", "plans_by_lookup_key", "transport", "concurrency",
         "past_due_grace_days")


@dataclass(frozen=True)
class StripeSettings:
    mode: Literal["live", "dry_run"] = "dry_run"
    api_base: str | None = None
    max_events_per_second: float = 500.0  # 0 = no cap
    plans_by_lookup_key: Mapping[str, str] = field(default_factory=lambda: DEFAULT_PLANS_BY_LOOKUP_KEY)
    transport: Literal["v1", "v2_stream"] = "v1"
    concurrency: int = 8
    past_due_grace_days: float = 7.0
    api_key: str | None = field(default=None, repr=False)


def parse_stripe_settings(raw: Mapping[str, Any] | None, api_key: str | None) -> StripeSettings:
    """Validate `billing.stripe`; without `mode`, live when STRIPE_API_KEY is set, else dry_run."""
    raw = expect_mapping(raw or {}, "billing.stripe", _KEYS)
    mode = raw.get("mode", "live" if api_key else "dry_run")
    if mode not in ("live", "dry_run"):
        raise ConfigError("billing.stripe.mode", f"expected live or dry_run, got {kind_of(mode)}")
    if mode == "live" and not api_key:
        raise ConfigError("billing.stripe.mode", "live needs STRIPE_API_KEY")
    api_base = raw.get("api_base")
    if api_base is not None:
        parts = urlsplit(api_base) if isinstance(api_base, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError("billing.stripe.api_base", f"expected an http(s) URL, got {kind_of(api_base)}")
    rate = _number(raw, "max_events_per_second", 500.0, minimum=0)
    transport = raw.get("transport", "v1")
    if transport not in ("v1", "v2_stream"):
        raise ConfigError("billing.stripe.transport", f"expected v1 or v2_stream, got {kind_of(transport)}")
    concurrency = raw.get("concurrency", 8)
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or not 1 <= concurrency <= 256:
        raise ConfigError("billing.stripe.concurrency", "expected an integer from 1 to 256")
    grace = _number(raw, "past_due_grace_days", 7.0, minimum=0)
    lookup = raw.get("plans_by_lookup_key", DEFAULT_PLANS_BY_LOOKUP_KEY)
    lookup = expect_mapping(lookup, "billing.stripe.plans_by_lookup_key", lookup.keys() if isinstance(
        lookup, Mapping) else ())
    for key, plan in lookup.items():
        if not isinstance(key, str) or not isinstance(plan, str):
            raise ConfigError(f"billing.stripe.plans_by_lookup_key.{key}", "expected a plan name")
    return StripeSettings(mode, api_base, rate, MappingProxyType(dict(lookup)), transport, concurrency, grace,
                          api_key)


def _number(raw: Mapping[str, Any], key: str, default: float, *, minimum: float) -> float:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum:
        raise ConfigError(f"billing.stripe.{key}", f"expected a number >= {minimum:g}, got {kind_of(value)}")
    return float(value)
