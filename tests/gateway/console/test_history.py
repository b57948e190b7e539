"""gateway/console/history.py: per-minute counts from the Prometheus counters, in a bounded ring."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from gateway.console.history import AUTH_REASON, Totals, TrafficHistory, prometheus_totals


class Feed:
    def __init__(self) -> None:
        self.totals = Totals()
        self.now = 600.0

    def read(self) -> Totals:
        return self.totals

    def clock(self) -> float:
        return self.now


def test_totals_are_read_from_the_gateways_counters() -> None:
    registry = CollectorRegistry()
    requests = Counter("gateway_requests_total", "r", ["method", "status_class", "plan", "meter_route"],
                       registry=registry)
    rejections = Counter("gateway_rejections_total", "x", ["reason", "plan", "meter"], registry=registry)
    auth = Counter("gateway_auth_failures_total", "a", ["reason"], registry=registry)
    spool = Gauge("gateway_spool_bytes", "b", registry=registry)
    requests.labels("GET", "2xx", "starter", "api").inc(5)
    requests.labels("POST", "4xx", "starter", "api").inc(2)
    rejections.labels("quota", "starter", "api_calls").inc(2)
    rejections.labels("rate", "starter", "rate").inc()
    auth.labels("expired").inc(3)
    spool.set(4096)
    totals = prometheus_totals(registry.collect())
    assert totals.requests == 7 and totals.spool_bytes == 4096
    assert totals.rejections == {"quota": 2, "rate": 1, AUTH_REASON: 3}


def test_each_minute_keeps_its_growth_and_the_ring_is_bounded() -> None:
    feed = Feed()
    history = TrafficHistory(feed.read, minutes=3, clock=feed.clock)
    history.sample()
    for minute in range(1, 6):
        feed.totals = Totals(requests=10.0 * minute, rejections={"quota": float(minute)})
        feed.now = 600.0 + 60 * minute
        history.sample()
    feed.totals = Totals(requests=53.0, rejections={"quota": 5.0, "rate": 1.0})
    minutes = history.minutes()
    assert [m.start for m in minutes] == [720, 780, 840, 900]  # three closed, and the one under way
    assert [m.requests for m in minutes] == [10, 10, 10, 3]
    assert minutes[-1].rejections == {"quota": 0.0, "rate": 1.0}


def test_a_counter_that_goes_back_counts_nothing() -> None:
    feed = Feed()
    history = TrafficHistory(feed.read, clock=feed.clock)
    feed.totals = Totals(requests=100.0)
    history.sample()
    feed.totals, feed.now = Totals(requests=40.0), 660.0
    history.sample()
    assert history.minutes()[0].requests == 0
