"""Metrics of metering and enforcement (PRODUCT.md §7); label values come from the configuration.

`gateway_usage{tenant,meter}` would grow with the number of tenants: it is capped at
`metrics.max_tenants` tenants per process (the first seen keep their series).
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import Counter, Gauge

REJECTIONS = Counter("gateway_rejections_total", "Requests refused by the limiter", ["reason", "plan", "meter"])
SHADOW_REJECTIONS = Counter("gateway_shadow_rejections_total",
                            "Requests served that a shadow limit (enforce: shadow) would have refused",
                            ["reason", "plan", "meter"])
USAGE = Gauge("gateway_usage", "Usage of the current period per tenant and meter", ["tenant", "meter"],
              multiprocess_mode="mostrecent")
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
        self._usage_children: dict[tuple[str, str], Gauge] = {}
        self._latest: dict[tuple[str, str], float] = {}

    def rejected(self, reason: str, plan: str | None, meter: str) -> None:
        REJECTIONS.labels(reason, plan if plan in self._plans else "other",
                          meter if meter in self._meters else "other").inc()

    def shadow_rejected(self, reason: str, plan: str | None, meter: str) -> None:
        SHADOW_REJECTIONS.labels(reason, plan if plan in self._plans else "other",
                                 meter if meter in self._meters else "other").inc()

    def usage(self, tenant: str, meter: str, value: float) -> None:
        """Remember the value; `publish()` sets the gauges when Prometheus scrapes (not per request)."""
        if self._tenant_usage:
            self._latest[(tenant, meter)] = value

    def publish(self) -> None:
        latest, self._latest = self._latest, {}
        for (tenant, meter), value in latest.items():
            child = self._usage_children.get((tenant, meter))
            if child is None:
                if tenant not in self._tenants:
                    if len(self._tenants) >= self._max_tenants:
                        continue
                    self._tenants.add(tenant)
                child = self._usage_children[(tenant, meter)] = USAGE.labels(tenant, meter)
            child.set(value)

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
