"""Shadow limits in the limiter: served, counted in gateway_shadow_rejections_total, logged at most once a
minute per tenant, reason and meter (a bounded map); the limiter against a real redis-server."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from gateway.cli.devservices import RedisProcess
from gateway.config import parse_settings
from metering.redis_store import RedisUsageStore
from metering.spool import Spool
from quota.limiter import Limiter, LimiterSettings, Refusal
from quota.metrics import QuotaMetrics
from quota.shadow import ShadowReports
from quota.tenants import TenantDirectory

PLANS = {
    # The rollout of a lower deployment quota: 3 reported, 5 enforced (an override could do the same per tenant).
    "starter": {"rate": {"per_second": 1000, "burst": 1000},
                "quotas": {"chain_deployments": {"limit": 3, "enforce": "shadow"}, "chains": {"limit": 5}}},
    "next": {"rate": {"per_second": 1, "burst": 2, "enforce": "shadow"},
             "quotas": {"chain_deployments": {"limit": 5}}},
}
DEPLOY = "/api/chains/c1/deployments"


class Clock:
    def __init__(self) -> None:
        self.now = time.time() // 300 * 300 + 10

    def __call__(self) -> float:
        return self.now


def shadow_count(reason: str, plan: str, meter: str) -> float:
    return REGISTRY.get_sample_value("gateway_shadow_rejections_total",
                                     {"reason": reason, "plan": plan, "meter": meter}) or 0.0


def metrics() -> QuotaMetrics:
    return QuotaMetrics(["starter", "next"], ["chain_deployments", "chains", "api_calls"])


# --------------------------------------------------------------------------- ShadowReports (pure)


def test_a_hit_is_counted_every_time_and_logged_once_a_minute(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    reports = ShadowReports(metrics(), clock)
    before = shadow_count("quota", "starter", "chain_deployments")
    with caplog.at_level(logging.INFO, logger="cosmos_gateway.shadow"):
        for _ in range(5):
            reports.report("acme", "starter", "quota", "chain_deployments")
        reports.report("globex", "starter", "quota", "chain_deployments")  # another tenant: its own line
        clock.now += 60
        reports.report("acme", "starter", "quota", "chain_deployments")
    assert shadow_count("quota", "starter", "chain_deployments") - before == 7
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3
    assert lines[0].startswith("tenant acme was served a request that a shadow limit would refuse")
    assert "reason quota, meter chain_deployments, plan starter" in lines[0]
    assert lines[2].endswith("; 4 more since the last line")


def test_labels_stay_bounded() -> None:
    before = shadow_count("quota", "other", "other")
    ShadowReports(metrics(), Clock()).report("acme", "gold-from-a-token", "quota", "no_such_meter")
    assert shadow_count("quota", "other", "other") - before == 1


def test_the_log_limit_remembers_a_bounded_number_of_tenants(caplog: pytest.LogCaptureFixture) -> None:
    reports = ShadowReports(metrics(), Clock(), max_remembered=100)
    with caplog.at_level(logging.INFO, logger="cosmos_gateway.shadow"):
        for i in range(1000):
            reports.report(f"t{i}", "starter", "rate", "rate")
        assert reports.remembered() == 100
        reports.report("t999", "starter", "rate", "rate")  # remembered: no second line within the minute
        reports.report("t0", "starter", "rate", "rate")  # forgotten first (the oldest): logged again
    assert len(caplog.records) == 1001


# --------------------------------------------------------------------------- the limiter


@pytest.fixture
async def limiter(redis_server: RedisProcess, tmp_path: Path) -> AsyncIterator[Limiter]:
    policy = parse_settings({"plans": PLANS, "auth": {"algorithms": ["HS256"], "hs256_secret": "x" * 40}}).policy
    client = Redis.from_url(redis_server.url)
    store = RedisUsageStore(client, timeout=0.5)
    spool = Spool(tmp_path / "spool.jsonl")
    yield Limiter(store, policy.matcher, policy.plans, TenantDirectory(None, None), spool,  # type: ignore[arg-type]
                  QuotaMetrics(policy.plans, [m.name for m in policy.meters]),
                  LimiterSettings(default_plan="starter", bucket_seconds=300, fail_open=True, grace_seconds=10),
                  clock=Clock())
    await store.aclose()
    await spool.aclose()
    await client.aclose()


async def test_the_limiter_serves_what_a_shadow_quota_would_refuse_and_counts_it(limiter: Limiter) -> None:
    before = shadow_count("quota", "starter", "chain_deployments")
    for _ in range(5):
        admission = await limiter.admit("shadowed", None, "POST", DEPLOY)
        assert admission.headers[0] == ("RateLimit-Policy", '"burst";q=1000;w=1')  # the enforced limits only
    assert shadow_count("quota", "starter", "chain_deployments") - before == 2
    await limiter.drain()
    assert await limiter.usage("shadowed", None, ["chain_deployments"]) == {"chain_deployments": 5}


async def test_a_shadow_rate_serves_and_an_enforced_quota_beside_it_refuses(limiter: Limiter) -> None:
    before = shadow_count("rate", "next", "rate")
    for _ in range(5):  # at one instant: a burst of 2, then the shadow rate would refuse
        policy = (await limiter.admit("rolled-out", "next", "POST", DEPLOY)).headers[0][1]
        assert policy.startswith('"chain_deployments";q=5;')  # no "burst": the only rate is a shadow one
    assert shadow_count("rate", "next", "rate") - before == 3
    with pytest.raises(Refusal) as refused:
        await limiter.admit("rolled-out", "next", "POST", DEPLOY)
    assert (refused.value.kind, refused.value.meter) == ("quota", "chain_deployments")
    assert shadow_count("rate", "next", "rate") - before == 3  # a refused request is not held against it
