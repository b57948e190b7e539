"""Plans: rate limit and period quotas per plan, the default catalog, and operator overrides (pure).

A quota, a rate or an override may say `enforce: shadow`: its limit only reports what it would refuse
(PRODUCT.md §6a). Internally a limit is either enforced (`Quota.limit`, `Plan.rate`) or only reported
(`Quota.shadow_limit`, `Plan.shadow_rate`); a meter may have both, when a shadow override tries out another
limit while the plan's still holds.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType
from typing import Any, Literal, NamedTuple, cast

from metering.errors import ConfigError, expect_mapping, kind_of
from metering.meters import Meter, check_method, check_path

OnExceed = Literal["reject", "overage"]
Enforce = Literal["on", "shadow"]
ENFORCE_VALUES: tuple[Enforce, ...] = ("on", "shadow")
Guard = tuple[str | None, str]  # (method or None = any, path glob)

PLAN_NAME = re.compile(r"[a-z0-9_-]{1,64}")
RATE_METER = "rate"  # the override "meter" that carries per_second/burst


@dataclass(frozen=True, slots=True)
class Rate:
    per_second: float
    burst: int


@dataclass(frozen=True, slots=True)
class Quota:
    meter: str
    limit: float | None  # None = unlimited; an int for counter meters
    on_exceed: OnExceed = "reject"
    guards: tuple[Guard, ...] = ()  # gauge quotas only: requests refused while the gauge >= limit
    # Reported, never enforced (`enforce: shadow`): what would pass it is served and counted as usual.
    # `limit` is what is enforced; a quota of `enforce: shadow` in the config has limit None.
    shadow_limit: float | None = None


@dataclass(frozen=True, slots=True)
class Plan:
    name: str
    rate: Rate | None  # None = no rate limit
    quotas: Mapping[str, Quota]
    shadow_rate: Rate | None = None  # `rate: {..., enforce: shadow}`: reported, never enforced

    def __post_init__(self) -> None:
        # Plans are shared by every request (and the catalog by every config): make them read-only.
        object.__setattr__(self, "quotas", MappingProxyType(dict(self.quotas)))


_CHAINS_GUARD: tuple[Guard, ...] = (("POST", "/api/chains"),)


def _catalog_plan(
    name: str, rate: Rate, chains: int | None, deployments: int | None, storage_gb: int | None
) -> Plan:
    return Plan(
        name,
        rate,
        {
            "chain_deployments": Quota("chain_deployments", deployments),
            # Kept with limit None too, so an override of `chains` on a big plan still guards creation.
            "chains": Quota("chains", chains, guards=_CHAINS_GUARD),
            "storage_gb": Quota("storage_gb", storage_gb),
        },
    )


DEFAULT_CATALOG: Mapping[str, Plan] = MappingProxyType(
    {
        plan.name: plan
        for plan in (
            _catalog_plan("starter", Rate(10, 20), 1, 100, 10),
            _catalog_plan("professional", Rate(50, 100), 5, 500, 50),
            _catalog_plan("enterprise", Rate(200, 400), None, None, 500),
            _catalog_plan("sovereign", Rate(1000, 2000), None, None, None),
        )
    }
)


# --------------------------------------------------------------------------- parsing `plans:`


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _parse_enforce(spec: Mapping[str, Any], key: str) -> Enforce:
    value = spec.get("enforce", "on")
    if value not in ENFORCE_VALUES:
        raise ConfigError(f"{key}.enforce", f"must be on or shadow, got {kind_of(value)}")
    return cast(Enforce, value)


def _parse_rate(raw: Any, key: str) -> tuple[Rate | None, Enforce]:
    """The rate and whether it is enforced (`enforce: on`, the default) or only reported (`shadow`)."""
    if raw is None:
        return None, "on"
    spec = expect_mapping(raw, key, {"per_second", "burst", "enforce"})
    for name in ("per_second", "burst"):
        if name not in spec:
            raise ConfigError(f"{key}.{name}", "required")
    per_second, burst = spec["per_second"], spec["burst"]
    if not _is_number(per_second) or per_second <= 0:
        raise ConfigError(f"{key}.per_second", f"expected a number > 0, got {kind_of(per_second)}")
    if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
        raise ConfigError(f"{key}.burst", f"expected an integer >= 1, got {kind_of(burst)}")
    return Rate(per_second, burst), _parse_enforce(spec, key)


def _parse_guards(raw: Any, key: str) -> tuple[Guard, ...]:
    items = raw if isinstance(raw, list) else [raw]
    guards: list[Guard] = []
    for i, item in enumerate(items):
        where = f"{key}[{i}]" if isinstance(raw, list) else key
        spec = expect_mapping(item, where, {"method", "path"})
        if "path" not in spec:
            raise ConfigError(f"{where}.path", "required")
        guards.append(
            (check_method(spec.get("method"), f"{where}.method"), check_path(spec["path"], f"{where}.path"))
        )
    return tuple(guards)


def _parse_quota(meter: Meter, raw: Any, key: str) -> Quota:
    spec = expect_mapping(raw, key, {"limit", "on_exceed", "guards", "enforce"})
    if "limit" not in spec:
        raise ConfigError(f"{key}.limit", "required (null = unlimited)")
    limit = spec["limit"]
    if limit is not None:
        if not _is_number(limit) or limit < 0:
            raise ConfigError(f"{key}.limit", f"expected a number >= 0 or null, got {kind_of(limit)}")
        if meter.kind == "counter":
            # Counters move in whole units; a fractional limit would read differently in every place.
            if limit != int(limit):
                raise ConfigError(f"{key}.limit", f"{meter.name} counts whole units, got {limit!r}")
            limit = int(limit)
    on_exceed = spec.get("on_exceed", "reject")
    if on_exceed not in ("reject", "overage"):
        raise ConfigError(f"{key}.on_exceed", f"must be reject or overage, got {kind_of(on_exceed)}")
    enforce = _parse_enforce(spec, key)
    if enforce == "shadow" and on_exceed == "overage":
        raise ConfigError(f"{key}.enforce", "shadow reports what the quota would refuse; on_exceed: overage "
                                            "refuses nothing")
    guards: tuple[Guard, ...] = ()
    if spec.get("guards") is not None:
        if meter.kind != "gauge":
            raise ConfigError(
                f"{key}.guards", f"only gauge meters have guards; {meter.name} is a counter"
            )
        if on_exceed == "overage":
            raise ConfigError(
                f"{key}.guards", "guards reject requests, which contradicts on_exceed: overage"
            )
        guards = _parse_guards(spec["guards"], f"{key}.guards")
    if enforce == "shadow":
        return Quota(meter.name, None, cast(OnExceed, on_exceed), guards, shadow_limit=limit)
    return Quota(meter.name, limit, cast(OnExceed, on_exceed), guards)


def _parse_plan(name: Any, raw: Any, meters: Mapping[str, Meter]) -> Plan:
    key = f"plans.{name}"
    if not isinstance(name, str) or not PLAN_NAME.fullmatch(name):
        raise ConfigError(key, "a plan name is 1-64 characters of a-z, 0-9, _ and -")
    spec = expect_mapping(raw, key, {"rate", "quotas"})
    rate, rate_enforce = _parse_rate(spec.get("rate"), f"{key}.rate")
    quotas: dict[str, Quota] = {}
    raw_quotas = spec.get("quotas")
    if raw_quotas is not None:
        if not isinstance(raw_quotas, Mapping):
            raise ConfigError(
                f"{key}.quotas", f"expected a mapping of meter to quota, got {kind_of(raw_quotas)}"
            )
        for meter_name, quota in raw_quotas.items():
            qkey = f"{key}.quotas.{meter_name}"
            if meter_name not in meters:
                known = ", ".join(sorted(meters)) or "none"
                raise ConfigError(qkey, f"unknown meter (defined under meters: {known})")
            quotas[meter_name] = _parse_quota(meters[meter_name], quota, qkey)
    if rate_enforce == "shadow":
        return Plan(name, None, quotas, shadow_rate=rate)
    return Plan(name, rate, quotas)


def _check_catalog_plan(plan: Plan, meters: Mapping[str, Meter]) -> None:
    """A catalog plan kept as is must still fit the configured meters."""
    for quota in plan.quotas.values():
        meter = meters.get(quota.meter)
        key = f"plans.{plan.name}.quotas.{quota.meter}"
        if meter is None:
            raise ConfigError(
                key,
                f"the default {plan.name} plan limits {quota.meter}, which is not defined under meters: "
                f"define the meter or replace plan {plan.name}",
            )
        if quota.guards and meter.kind != "gauge":
            raise ConfigError(
                key,
                f"the default {plan.name} plan guards {quota.meter}, which is not a gauge here: "
                f"replace plan {plan.name}",
            )


def parse_plans(raw: Mapping[str, Any] | None, meters: Sequence[Meter]) -> dict[str, Plan]:
    """The effective catalog: DEFAULT_CATALOG with every plan named under `plans:` replaced whole."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError("plans", f"expected a mapping of plan name to plan, got {kind_of(raw)}")
    by_name = {m.name: m for m in meters}
    plans: dict[str, Plan] = {}
    for name, plan in DEFAULT_CATALOG.items():
        if name not in raw:
            _check_catalog_plan(plan, by_name)
            plans[name] = plan
    for name, spec in raw.items():
        plans[name] = _parse_plan(name, spec, by_name)
    return plans


# --------------------------------------------------------------------------- overrides


@dataclass(frozen=True, slots=True)
class Override:
    """An operator's per-tenant limit; meter "rate" carries per_second/burst instead of limit."""

    meter: str
    limit: float | None = None  # None = unlimited
    per_second: float | None = None  # rate only; None = no rate limit
    burst: int | None = None  # rate only; None = the plan's burst
    expires_at: datetime | None = None
    reason: str | None = None
    enforce: Enforce = "on"  # "shadow": the limit only reports, beside the plan's enforced one

    def __post_init__(self) -> None:
        # Compared with an aware `now` on every lookup; a naive one would raise there instead.
        if self.expires_at is not None and self.expires_at.utcoffset() is None:
            raise ValueError("expires_at must be timezone-aware")


class Effective(NamedTuple):
    """A tenant's limits: its plan with the live overrides applied."""

    rate: Rate | None  # enforced
    quotas: dict[str, Quota]
    sources: dict[str, str]  # "plan" or "override", per meter and for "rate"
    shadow_rate: Rate | None  # only reported


def _override_rate(override: Override, plan_rate: Rate | None) -> Rate | None:
    if override.per_second is None:
        return None
    if override.burst is not None:
        burst = override.burst
    elif plan_rate is not None:
        burst = plan_rate.burst
    else:
        burst = max(1, math.ceil(override.per_second))
    return Rate(override.per_second, burst)


def _override_quota(quota: Quota | None, override: Override) -> Quota:
    """The quota of a meter with its override: an enforced override replaces the plan's limits (a shadow
    one of the plan included: the tenant's own limit is what a plan's rollout would meet); a shadow
    override keeps the enforced limit and reports against its own."""
    if quota is None:
        quota = Quota(override.meter, None)
    if override.enforce == "shadow":
        return dataclasses.replace(quota, shadow_limit=override.limit)
    return dataclasses.replace(quota, limit=override.limit, shadow_limit=None)


def effective(plan: Plan, overrides: Iterable[Override], now: datetime) -> Effective:
    """The plan with the live overrides applied: (rate, quotas, source per meter and "rate", shadow rate).

    An override expires at `expires_at` (that instant included). An override of a meter the plan
    does not limit adds a quota that rejects; it has no guards, since the plan names none. A rate
    override of `enforce: shadow` keeps the plan's rate enforced and reports against its own.
    """
    if now.utcoffset() is None:
        raise ValueError("now must be timezone-aware")
    rate, shadow_rate = plan.rate, plan.shadow_rate
    quotas = dict(plan.quotas)
    sources = dict.fromkeys(quotas, "plan")
    sources[RATE_METER] = "plan"
    for override in overrides:
        if override.expires_at is not None and override.expires_at <= now:
            continue
        if override.meter == RATE_METER:
            if override.enforce == "shadow":
                shadow_rate = _override_rate(override, plan.rate or plan.shadow_rate)
            else:
                rate, shadow_rate = _override_rate(override, plan.rate or plan.shadow_rate), None
        else:
            quotas[override.meter] = _override_quota(quotas.get(override.meter), override)
        sources[override.meter] = "override"
    return Effective(rate, quotas, sources, shadow_rate)
