"""Traffic and rejections of the last hours, for the console's overview: a bounded ring of per-minute counts.

Nothing is added to the per-request path: the counts are read from the Prometheus counters the gateway
keeps anyway (`gateway_requests_total`, `gateway_rejections_total{reason}`, `gateway_auth_failures_total`).
A sampler takes their totals every few seconds and keeps the growth of each minute in a ring of
`minutes` entries. With `--workers N` the counters are read from the multiprocess files, i.e. summed over
all workers, so whichever worker serves the console shows the same traffic; the ring itself is per worker
and starts empty when that worker starts.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from prometheus_client import REGISTRY, CollectorRegistry, Metric
from prometheus_client import multiprocess as _multiprocess

from gateway.metrics import MULTIPROC_ENV

log = logging.getLogger("cosmos_gateway.console")
MINUTES = 6 * 60  # the overview shows the last six hours
SAMPLE_SECONDS = 10.0
AUTH_REASON = "invalid-token"  # credentials refused: shown beside the limiter's reasons (rate, quota, guard)
MAX_REASONS = 16  # reasons are label values from the code, not input; bounded all the same


@dataclass(frozen=True, slots=True)
class Totals:
    """Counter totals at one instant, and the spool's current gauges."""

    requests: float = 0.0
    rejections: dict[str, float] = field(default_factory=dict)
    spool_pending: float = 0.0
    spool_bytes: float = 0.0


def _collected() -> Iterable[Metric]:
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        _multiprocess.MultiProcessCollector(registry)
        return registry.collect()
    return REGISTRY.collect()


def prometheus_totals(metrics: Iterable[Metric] | None = None) -> Totals:
    """The totals from the gateway's Prometheus metrics (this process, or all workers' files)."""
    requests = pending = size = 0.0
    rejections: dict[str, float] = {}
    for metric in _collected() if metrics is None else metrics:
        for sample in metric.samples:
            if sample.name == "gateway_requests_total":
                requests += sample.value
            elif sample.name == "gateway_rejections_total":
                reason = sample.labels.get("reason", "other")
                if reason in rejections or len(rejections) < MAX_REASONS:
                    rejections[reason] = rejections.get(reason, 0.0) + sample.value
            elif sample.name == "gateway_auth_failures_total":
                rejections[AUTH_REASON] = rejections.get(AUTH_REASON, 0.0) + sample.value
            elif sample.name == "gateway_spool_pending":
                pending += sample.value
            elif sample.name == "gateway_spool_bytes":
                size += sample.value
    return Totals(requests, rejections, pending, size)


@dataclass(frozen=True, slots=True)
class Minute:
    start: int  # epoch seconds, a multiple of 60
    requests: float
    rejections: dict[str, float]


def _growth(now: Totals, before: Totals) -> tuple[float, dict[str, float]]:
    """What each counter grew by; a counter that went back (a process gone) counts 0, not negative."""
    reasons = {r: max(0.0, v - before.rejections.get(r, 0.0)) for r, v in now.rejections.items()}
    return max(0.0, now.requests - before.requests), reasons


class TrafficHistory:
    """The ring of per-minute counts; `read` gives the totals, `clock` epoch seconds."""

    def __init__(self, read: Callable[[], Totals] = prometheus_totals, *, minutes: int = MINUTES,
                 clock: Callable[[], float] = time.time) -> None:
        self._read = read
        self._clock = clock
        self._ring: deque[Minute] = deque(maxlen=minutes)
        self._base: Totals | None = None  # the totals at the start of the minute being counted
        self._minute = 0

    def sample(self) -> Totals:
        """Read the totals; when a minute has passed, close it into the ring. Returns the totals read."""
        totals = self._read()
        minute = int(self._clock()) // 60 * 60
        if self._base is None:
            self._base, self._minute = totals, minute
        elif minute > self._minute:
            requests, reasons = _growth(totals, self._base)
            self._ring.append(Minute(self._minute, requests, reasons))
            self._base, self._minute = totals, minute
        return totals

    def minutes(self) -> list[Minute]:
        """The closed minutes, oldest first, then the minute under way as counted so far."""
        totals = self.sample()
        assert self._base is not None
        requests, reasons = _growth(totals, self._base)
        return [*self._ring, Minute(self._minute, requests, reasons)]

    async def run(self, interval: float = SAMPLE_SECONDS) -> None:
        """Sample every `interval` seconds until cancelled (a failed read is logged and skipped)."""
        while True:
            try:
                self.sample()
            except Exception:
                log.exception("console: reading the request counters failed")
            await asyncio.sleep(interval)
