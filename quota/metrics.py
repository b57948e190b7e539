"""Metrics of metering and enforcement (PRODUCT.md §7); label values come from the configuration.

`gateway_usage{tenant,meter}` would grow with the number of tenants: it is capped at
`metrics.max_tenants` tenants per process (the first seen keep their series). `gateway_limit{tenant,meter}`
beside it is the limit in force for that usage (plan or override), for the series of gateway_usage whose meter
has one: `gateway_usage / gateway_limit` is how near a tenant is to it (deploy/prometheus/alerts.yml).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from prometheus_client import Counter, Gauge

REJECTIONS = Counter("gateway_rejections_total", "Requests refused by the limiter", ["reason", "plan", "meter"])
SHADOW_REJECTIONS = Counter("gateway_shadow_rejections_total",
                            "Requests served that a shadow limit (enforce: shadow) would have refused",
                            ["reason", "plan", "meter"])
USAGE = Gauge("gateway_usage", "Usage of the current period per tenant and meter", ["tenant", "meter"],
              multiprocess_mode="mostrecent")
LIMIT = Gauge("gateway_limit", "The quota limit in force per tenant and meter (beside gateway_usage)",
              ["tenant", "meter"], multiprocess_mode="mostrecent")
STORE_ERRORS = Counter("gateway_store_errors_total", "Usage store (Redis) calls that failed")
SPOOL_PENDING = Gauge("gateway_spool_pending", "Usage records spooled to disk, waiting for Redis",
                      multiprocess_mode="livesum")
SPOOL_BYTES = Gauge("gateway_spool_bytes", "Bytes of the fail-open spool (files and buffer; redis.spool_max_bytes "
                    "caps the folder)", multiprocess_mode="livesum")
SPOOL_DROPPED = Counter("gateway_spool_dropped_total",
                        "Usage records not spooled because the spool was at its cap or the disk refused them")
USAGE_REPORT_ERRORS = Counter("gateway_usage_report_errors_total",
                              "Items of X-Cosmos-Usage headers that were ignored as malformed")


class QuotaMetrics:
    def __init__(self, plans: Iterable[str], meters: Iterable[str], *, tenant_usage: bool = True,
                 max_tenants: int = 10_000) -> None:
        self._plans = frozenset(plans)
        self._meters = frozenset(meters) | {"rate"}
        self._tenant_usage = tenant_usage
        self._max_tenants = max_tenants
        self._tenants: set[str] = set()
        # (tenant, meter) -> its gateway_usage child, and its gateway_limit child once it has had a limit
        self._children: dict[tuple[str, str], list[Any]] = {}
        self._latest: dict[tuple[str, str], tuple[float, float | None]] = {}

    def rejected(self, reason: str, plan: str | None, meter: str) -> None:
        REJECTIONS.labels(reason, plan if plan in self._plans else "other",
                          meter if meter in self._meters else "other").inc()

    def shadow_rejected(self, reason: str, plan: str | None, meter: str) -> None:
        SHADOW_REJECTIONS.labels(reason, plan if plan in self._plans else "other",
                                 meter if meter in self._meters else "other").inc()

    def usage(self, tenant: str, meter: str, value: float, limit: float | None = None) -> None:
        """Remember the value and the limit in force; `publish()` sets the gauges when Prometheus scrapes (not per
        request)."""
        if self._tenant_usage:
            self._latest[(tenant, meter)] = (value, limit)

    def publish(self) -> None:
        latest, self._latest = self._latest, {}
        for (tenant, meter), (value, limit) in latest.items():
            children = self._children.get((tenant, meter))
            if children is None:
                if tenant not in self._tenants:
                    if len(self._tenants) >= self._max_tenants:
                        continue
                    self._tenants.add(tenant)
                children = self._children[(tenant, meter)] = [USAGE.labels(tenant, meter), None]
            children[0].set(value)
            # gateway_limit only where a limit is or was in force: a 0 would read as "over it"; a limit lifted
            # since is NaN, which no ratio alert compares as near (a removed series would linger in the files of
            # a multiprocess registry).
            if limit is not None and children[1] is None:
                children[1] = LIMIT.labels(tenant, meter)
            if children[1] is not None:
                children[1].set(math.nan if limit is None else limit)

    @staticmethod
    def store_error() -> None:
        STORE_ERRORS.inc()

    @staticmethod
    def spool_pending(count: int) -> None:
        SPOOL_PENDING.set(count)

    @staticmethod
    def spool_bytes(size: int) -> None:
        SPOOL_BYTES.set(size)

    @staticmethod
    def spool_dropped(count: int) -> None:
        if count > 0:
            SPOOL_DROPPED.inc(count)

    @staticmethod
    def bad_usage_report(count: int) -> None:
        USAGE_REPORT_ERRORS.inc(count)
