"""Prometheus metrics of the gateway (PRODUCT.md §7).

With `--workers N` every worker writes to files in PROMETHEUS_MULTIPROC_DIR (prometheus_client's
multiprocess mode), which `serve` sets before any worker imports this module; one scrape of any
worker then returns the sum over all workers. Label values are bounded: methods outside the
standard set become OTHER and plans/meters come from the configuration, never from raw input.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as _multiprocess

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"})
STATUS_CLASSES = ("1xx", "1xx", "2xx", "3xx", "4xx", "5xx")
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
AUTH_FAILURE_REASONS = frozenset({
    "missing", "malformed", "expired", "not_yet_valid", "bad_signature", "bad_issuer", "bad_audience",
    "disallowed_alg", "unknown_key", "no_keys", "invalid_claim", "missing_tenant",
})

REQUESTS = Counter(
    "gateway_requests_total", "Requests answered by the proxy listener",
    ["method", "status_class", "plan", "meter_route"],
)
REQUEST_DURATION = Histogram(
    "gateway_request_duration_seconds", "Whole request duration at the proxy listener",
    buckets=DURATION_BUCKETS,
)
UPSTREAM_DURATION = Histogram(
    "gateway_upstream_duration_seconds", "Time from sending the request upstream to its response head",
    buckets=DURATION_BUCKETS,
)
AUTH_FAILURES = Counter("gateway_auth_failures_total", "Rejected credentials by reason", ["reason"])


class RequestMetrics:
    """Records one request with cached label children (the per-request path does one dict lookup)."""

    def __init__(self, plans: Iterable[str] = ()) -> None:
        self._plans = frozenset(plans)
        self._children: dict[tuple[str, str, str, str], Counter] = {}

    def observe(self, method: str, status: int, plan: str | None, meter_route: str,
                duration: float, upstream_duration: float | None) -> None:
        if method not in KNOWN_METHODS:
            method = "OTHER"
        status_class = STATUS_CLASSES[status // 100] if 100 <= status < 600 else "5xx"
        plan_label = plan if plan in self._plans else ("none" if plan is None else "other")
        key = (method, status_class, plan_label, meter_route)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = REQUESTS.labels(*key)
        child.inc()
        REQUEST_DURATION.observe(duration)
        if upstream_duration is not None:
            UPSTREAM_DURATION.observe(upstream_duration)

    @staticmethod
    def auth_failure(reason: str) -> None:
        AUTH_FAILURES.labels(reason if reason in AUTH_FAILURE_REASONS else "other").inc()


def render() -> tuple[bytes, str]:
    """The exposition text: summed over all workers in multiprocess mode."""
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        _multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST


def mark_worker_dead(pid: int) -> None:
    if os.environ.get(MULTIPROC_ENV):
        _multiprocess.mark_process_dead(pid)
