"""Metrics of the billing sync (PRODUCT.md §7); every label value comes from a fixed set or the config.

    billing_sync_events_sent_total{meter}            buckets Stripe holds (sent or duplicate), per meter
    billing_sync_failures_total{reason}              failed sends and parked buckets, per bounded reason
    billing_sync_pending_buckets                     ledger rows waiting to be sent
    billing_sync_parked_buckets                      ledger rows waiting for an operator
    billing_sync_lag_seconds                         age of the oldest pending bucket (0 when none)
    billing_sync_last_success_timestamp_seconds      end of the last pass that left nothing to retry
    billing_sync_webhook_refused_total{reason}       subscription webhooks not applied (tenant bound to another
                                                     customer, no tenant, ...), per bounded reason
    billing_sync_meter_error_parked_total            ledger rows parked by Stripe's asynchronous rejections (v2 stream)
    billing_sync_meter_error_unattributed_total      rejected events Stripe counted but named no bucket of
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import Counter, Gauge

FAILURE_REASONS = frozenset({
    # retried
    "network", "timeout", "rate_limited", "conflict", "server_error", "auth", "session_expired", "other",
    # parked
    "no_customer", "too_old", "customer_not_found", "in_future", "no_meter", "invalid_value", "unknown_meter",
    "rejected", "refund_not_netted", "summary_mismatch",
    # the pass itself
    "store",
})

EVENTS_SENT = Counter("billing_sync_events_sent_total", "Meter events Stripe holds (sent or duplicate)", ["meter"])
FAILURES = Counter("billing_sync_failures_total", "Failed meter event sends and parked buckets", ["reason"])
PENDING = Gauge("billing_sync_pending_buckets", "Ledger rows waiting to be sent to Stripe",
                multiprocess_mode="mostrecent")
PARKED = Gauge("billing_sync_parked_buckets", "Ledger rows parked for an operator", multiprocess_mode="mostrecent")
LAG = Gauge("billing_sync_lag_seconds", "Age of the oldest pending bucket", multiprocess_mode="mostrecent")
WEBHOOK_REFUSED_REASONS = frozenset({
    "bound_to_other_customer", "no_tenant", "invalid_tenant_id", "customer_shared_by_tenants"})
WEBHOOK_REFUSED = Counter("billing_sync_webhook_refused_total",
                          "Stripe subscription webhooks acknowledged but not applied", ["reason"])
METER_ERROR_PARKED = Counter("billing_sync_meter_error_parked_total",
                             "Ledger rows parked because Stripe rejected their meter events after accepting them")
METER_ERROR_UNATTRIBUTED = Counter("billing_sync_meter_error_unattributed_total",
                                   "Meter events Stripe reported rejected without naming them or their meter")
LAST_SUCCESS = Gauge("billing_sync_last_success_timestamp_seconds",
                     "End of the last sync pass that left nothing to retry", multiprocess_mode="mostrecent")


class SyncMetrics:
    def __init__(self, meters: Iterable[str]) -> None:
        self._meters = frozenset(meters)

    def sent(self, meter: str, count: int = 1) -> None:
        EVENTS_SENT.labels(meter if meter in self._meters else "other").inc(count)

    @staticmethod
    def failed(reason: str | None, count: int = 1) -> None:
        FAILURES.labels(reason if reason in FAILURE_REASONS else "other").inc(count)

    @staticmethod
    def webhook_refused(reason: str) -> None:
        WEBHOOK_REFUSED.labels(reason if reason in WEBHOOK_REFUSED_REASONS else "other").inc()

    @staticmethod
    def state(*, pending: int, parked: int, lag_seconds: float) -> None:
        PENDING.set(pending)
        PARKED.set(parked)
        LAG.set(lag_seconds)

    @staticmethod
    def success(at: float) -> None:
        LAST_SUCCESS.set(at)
