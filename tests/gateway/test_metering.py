"""Metering and quotas end to end (PRODUCT.md §4-§7): real gateways, a real redis-server, a real upstream."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio
import yaml
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import Worker
from gateway.cli.devservices import RedisProcess
from quota.alerts import verify_signature
from tests.faultproxy import FaultProxy
from tests.gateway.conftest import StartGateway
from tests.support import BUSY_SCRIPT, GatewayProcess, Upstream, bearer, config_dict, settings_for

ADMIN = {"Authorization": "Bearer ops-token-0123456789"}
PLANS: dict[str, Any] = {
    "starter": {
        "rate": {"per_second": 1000, "burst": 1000},
        "quotas": {
            "chain_deployments": {"limit": 50},
            "chains": {"limit": 1, "guards": {"method": "POST", "path": "/api/chains"}},
            "storage_gb": {"limit": 10},
        },
    },
    "trickle": {"rate": {"per_second": 1, "burst": 3}, "quotas": {"chain_deployments": {"limit": 5}}},
    "monthly": {"rate": {"per_second": 1000, "burst": 1000}, "quotas": {"chain_deployments": {"limit": 2}}},
    "overage": {"rate": {"per_second": 1000, "burst": 1000},
                "quotas": {"chain_deployments": {"limit": 2, "on_exceed": "overage"}}},
}
DEPLOY = "/api/chains/c1/deployments"
UNTHROTTLED: dict[str, Any] = {"starter": {"rate": {"per_second": 100000, "burst": 100000}}}


def overrides(**extra: Any) -> dict[str, Any]:
    return {"plans": PLANS, "auth": {"plan_claim": "plan"}, "admin": {"tokens": "ops:ops-token-0123456789"}, **extra}


class Clock:
    """A settable clock for the limiter: periods are crossed by moving it, never by waiting."""

    def __init__(self, now: datetime) -> None:
        self.now = now.timestamp()

    def __call__(self) -> float:
        return self.now

    def set(self, when: datetime) -> None:
        self.now = when.timestamp()


MakeGateway = Callable[..., Awaitable[Worker]]


@pytest.fixture
async def make_gateway(upstream: Upstream, redis_server: RedisProcess, tmp_path: Path) -> AsyncIterator[MakeGateway]:
    started: list[Worker] = []

    async def make(*, clock: Callable[[], float] = time.time, name: str = "a", **extra: Any) -> Worker:
        extra.setdefault("redis", {"spool_dir": str(tmp_path / f"spool-{name}")})
        settings = settings_for(upstream.url, redis_server.url, f"sqlite+aiosqlite:///{tmp_path}/gw.db",
                                **overrides(**extra))
        worker = Worker(settings, clock=clock)
        await worker.start()
        started.append(worker)
        return worker

    yield make
    for worker in started:
        await worker.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def url(worker: Worker, path: str) -> str:
    return f"http://127.0.0.1:{worker.proxy_port}{path}"


def admin_url(worker: Worker, path: str) -> str:
    return f"http://127.0.0.1:{worker.admin_port}{path}"


async def usage(session: aiohttp.ClientSession, worker: Worker, tenant: str, **claims: Any) -> dict[str, Any]:
    async with session.get(url(worker, "/_gateway/usage"), headers=bearer(tenant, **claims)) as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def post_deploy(session: aiohttp.ClientSession, base: str, tenant: str, **claims: Any) -> int:
    async with session.post(base + DEPLOY, headers=bearer(tenant, **claims), data=b"{}") as response:
        await response.read()
        return response.status


# ------------------------------------------------------------------ exactness


async def test_exactly_the_limit_admitted_across_two_processes(upstream: Upstream, start_gateway: StartGateway,
                                                                tmp_path: Path) -> None:
    first = start_gateway(upstream.url, **overrides(redis={"spool_dir": str(tmp_path / "s1")}))
    second = start_gateway(upstream.url, **overrides(redis={"spool_dir": str(tmp_path / "s2")}))
    connector = aiohttp.TCPConnector(limit=400)
    async with aiohttp.ClientSession(connector=connector) as session:
        statuses = await asyncio.gather(*(
            post_deploy(session, (first if i % 2 else second).url, "exact") for i in range(300)))
        assert statuses.count(200) == 50
        assert statuses.count(429) == 250
        async with session.get(first.url + "/_gateway/usage", headers=bearer("exact")) as response:
            view = await response.json()
    assert view["meters"]["chain_deployments"]["used"] == 50
    assert view["meters"]["chain_deployments"]["remaining"] == 0


async def test_ratelimit_headers_on_a_streamed_response(make_gateway: MakeGateway,
                                                        session: aiohttp.ClientSession) -> None:
    """A response too large to be written in one piece carries the same RateLimit headers."""
    worker = await make_gateway()
    async with session.get(url(worker, "/api/stream/300000"), headers=bearer("streamer")) as response:
        assert response.status == 200
        assert response.headers["Transfer-Encoding"] == "chunked"
        assert response.headers["RateLimit-Policy"] == '"burst";q=1000;w=1'
        assert response.headers["RateLimit"] == '"burst";r=999;t=1'
        assert len(await response.read()) == 300000


async def test_quota_exceeded_answer_and_headers(make_gateway: MakeGateway, session: aiohttp.ClientSession) -> None:
    worker = await make_gateway()
    now = datetime.now(UTC)
    month = (datetime(now.year + (now.month == 12), now.month % 12 + 1, 1, tzinfo=UTC)
             - datetime(now.year, now.month, 1, tzinfo=UTC))
    async with session.post(url(worker, DEPLOY), headers=bearer("heads"), data=b"{}") as response:
        assert response.status == 200
        assert response.headers["RateLimit-Policy"] == (
            f'"burst";q=1000;w=1, "chain_deployments";q=50;w={int(month.total_seconds())}')
        assert '"chain_deployments";r=49;t=' in response.headers["RateLimit"]
    for _ in range(49):
        assert await post_deploy(session, url(worker, ""), "heads") == 200
    async with session.post(url(worker, DEPLOY), headers=bearer("heads"), data=b"{}") as response:
        assert response.status == 429
        assert response.content_type == "application/problem+json"
        body = await response.json()
        now = datetime.now(UTC)
        reset = datetime(now.year + (now.month == 12), now.month % 12 + 1, 1, tzinfo=UTC)
        assert body["type"].endswith("/quota-exceeded")
        assert (body["meter"], body["limit"], body["used"]) == ("chain_deployments", 50, 50)
        assert body["resets_at"] == reset.strftime("%Y-%m-%dT%H:%M:%SZ")
        assert body["violated-policies"] == ["chain_deployments"]
        assert abs(int(response.headers["Retry-After"]) - (reset - now).total_seconds()) < 5
        assert response.headers["X-Request-Id"]


async def test_rate_limited_and_rejected_requests_count_nothing(make_gateway: MakeGateway,
                                                                session: aiohttp.ClientSession) -> None:
    clock = Clock(datetime(2026, 12, 10, 12, 0, tzinfo=UTC))
    worker = await make_gateway(clock=clock)
    statuses = [await post_deploy(session, url(worker, ""), "slow", plan="trickle") for _ in range(5)]
    assert statuses == [200, 200, 200, 429, 429]  # burst 3
    async with session.post(url(worker, DEPLOY), headers=bearer("slow", plan="trickle")) as response:
        body = await response.json()
        assert body["type"].endswith("/rate-limited")
        assert body["violated-policies"] == ["burst"] and body["retry_after"] >= 1
        assert int(response.headers["Retry-After"]) >= 1
    view = await usage(session, worker, "slow", plan="trickle")
    assert view["meters"]["chain_deployments"]["used"] == 3
    assert view["meters"]["api_calls"]["used"] == 3  # the refused ones were not counted either
    clock.set(datetime(2026, 12, 10, 12, 0, 2, tzinfo=UTC))  # two tokens back
    assert await post_deploy(session, url(worker, ""), "slow", plan="trickle") == 200


async def test_period_resets_at_the_boundary(make_gateway: MakeGateway, session: aiohttp.ClientSession) -> None:
    clock = Clock(datetime(2026, 12, 31, 23, 59, 58, tzinfo=UTC))
    worker = await make_gateway(clock=clock)
    assert [await post_deploy(session, url(worker, ""), "boundary", plan="monthly") for _ in range(3)] == [
        200, 200, 429]
    clock.set(datetime(2026, 12, 31, 23, 59, 59, 999000, tzinfo=UTC))
    assert await post_deploy(session, url(worker, ""), "boundary", plan="monthly") == 429
    clock.set(datetime(2027, 1, 1, 0, 0, 0, tzinfo=UTC))  # the first instant of the new period
    assert await post_deploy(session, url(worker, ""), "boundary", plan="monthly") == 200
    view = await usage(session, worker, "boundary", plan="monthly")
    assert view["period"] == {"start": "2027-01-01T00:00:00Z", "end": "2027-02-01T00:00:00Z"}
    assert view["meters"]["chain_deployments"]["used"] == 1


async def test_overage_serves_and_counts_past_the_limit(make_gateway: MakeGateway,
                                                       session: aiohttp.ClientSession) -> None:
    worker = await make_gateway()
    assert [await post_deploy(session, url(worker, ""), "big", plan="overage") for _ in range(5)] == [200] * 5
    assert (await usage(session, worker, "big", plan="overage"))["meters"]["chain_deployments"]["used"] == 5


async def test_server_errors_give_units_back(make_gateway: MakeGateway, session: aiohttp.ClientSession) -> None:
    worker = await make_gateway()
    for status in (500, 503, 200, 404):
        async with session.post(url(worker, DEPLOY + f"?status={status}"), headers=bearer("flaky")) as response:
            assert response.status == status
    await worker.limiter.drain()
    view = await usage(session, worker, "flaky")
    assert view["meters"]["chain_deployments"]["used"] == 2  # the 200 and the 404


async def test_bytes_and_reported_gauges(make_gateway: MakeGateway, session: aiohttp.ClientSession) -> None:
    worker = await make_gateway()
    async with session.get(url(worker, "/api/x?usage=chains%3D1,%20storage_gb%3D2.5,%20bogus%3D1"),
                           headers=bearer("gauges")) as response:
        body = await response.read()
        assert "X-Cosmos-Usage" not in response.headers
    await worker.limiter.drain()
    view = await usage(session, worker, "gauges")
    assert view["meters"]["chains"]["used"] == 1 and view["meters"]["storage_gb"]["used"] == 2.5
    assert view["meters"]["bandwidth_bytes"]["used"] == len(body)
    # The chains gauge is at the starter limit (1): creating a chain is refused, reading is not.
    async with session.post(url(worker, "/api/chains"), headers=bearer("gauges")) as response:
        assert response.status == 429
        assert (await response.json())["meter"] == "chains"
    async with session.get(url(worker, "/api/chains"), headers=bearer("gauges")) as response:
        assert response.status == 200


async def test_usage_endpoint_shows_only_the_caller(make_gateway: MakeGateway, session: aiohttp.ClientSession) -> None:
    worker = await make_gateway()
    await post_deploy(session, url(worker, ""), "alpha")
    await post_deploy(session, url(worker, ""), "alpha")
    await post_deploy(session, url(worker, ""), "beta")
    assert (await usage(session, worker, "alpha"))["meters"]["chain_deployments"]["used"] == 2
    beta = await usage(session, worker, "beta")
    assert beta["tenant"] == "beta" and beta["meters"]["chain_deployments"]["used"] == 1
    async with session.get(url(worker, "/_gateway/usage?tenant=alpha"), headers=bearer("beta")) as response:
        assert (await response.json())["tenant"] == "beta"
    async with session.get(url(worker, "/_gateway/usage")) as response:
        assert response.status == 401
    async with session.get(url(worker, "/_gateway/other"), headers=bearer("beta")) as response:
        assert response.status == 404


# ------------------------------------------------------------------ operators


async def test_override_applies_at_once_and_expires(make_gateway: MakeGateway,
                                                    session: aiohttp.ClientSession) -> None:
    clock = Clock(datetime(2026, 12, 10, tzinfo=UTC))
    worker = await make_gateway(clock=clock)
    body = {"limit": 1, "expires_at": "2026-12-11T00:00:00Z", "reason": "test"}
    async with session.put(admin_url(worker, "/admin/tenants/ovr/overrides/chain_deployments"), json=body,
                           headers=ADMIN) as response:
        assert response.status == 200, await response.text()
    assert await post_deploy(session, url(worker, ""), "ovr") == 200
    assert await post_deploy(session, url(worker, ""), "ovr") == 429
    clock.set(datetime(2026, 12, 11, 0, 0, 1, tzinfo=UTC))  # expired: back to the plan's 50
    assert await post_deploy(session, url(worker, ""), "ovr") == 200
    async with session.get(admin_url(worker, "/admin/audit?tenant=ovr"), headers=ADMIN) as response:
        actions = [e["action"] for e in (await response.json())["entries"]]
        assert "override.put" in actions


async def test_changes_reach_another_instance_within_five_seconds(make_gateway: MakeGateway,
                                                                  session: aiohttp.ClientSession) -> None:
    first = await make_gateway(name="a")
    second = await make_gateway(name="b")
    assert await post_deploy(session, url(second, ""), "moving") == 200
    async with session.put(admin_url(first, "/admin/tenants/moving"), json={"status": "suspended"},
                           headers=ADMIN) as response:
        assert response.status in (200, 201)
    assert await post_deploy(session, url(first, ""), "moving") == 403  # the instance that took the call: at once
    started = time.monotonic()
    while await post_deploy(session, url(second, ""), "moving") != 403:
        assert time.monotonic() - started < 5, "the suspension did not reach the second instance in 5 s"
        await asyncio.sleep(0.05)
    async with session.post(url(first, DEPLOY), headers=bearer("moving")) as response:
        body = await response.json()
        assert body["type"].endswith("/forbidden") and body["tenant"] == "moving"


async def test_unknown_tenant_without_default_plan_is_forbidden(make_gateway: MakeGateway,
                                                                session: aiohttp.ClientSession) -> None:
    worker = await make_gateway(default_plan=None)
    assert await post_deploy(session, url(worker, ""), "stranger") == 403
    async with session.put(admin_url(worker, "/admin/tenants/stranger"), json={"plan": "starter"},
                           headers=ADMIN) as response:
        assert response.status in (200, 201)
    assert await post_deploy(session, url(worker, ""), "stranger") == 200


async def test_rejections_and_usage_metrics(make_gateway: MakeGateway, session: aiohttp.ClientSession) -> None:
    worker = await make_gateway()
    for _ in range(6):
        await post_deploy(session, url(worker, ""), "metered", plan="trickle")
    async with session.get(admin_url(worker, "/metrics")) as response:
        text = await response.text()
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    assert any(s.name == "gateway_rejections_total" and s.labels.get("plan") == "trickle" and s.value >= 1
               for s in samples)
    assert any(s.name == "gateway_usage" and s.labels == {"tenant": "metered", "meter": "chain_deployments"}
               for s in samples)


async def _tenant_series(session: aiohttp.ClientSession, worker: Worker, tenant: str) -> dict[tuple[str, str], float]:
    async with session.get(admin_url(worker, "/metrics")) as response:
        text = await response.text()
    return {(s.name, s.labels["meter"]): s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name in ("gateway_usage", "gateway_limit") and s.labels.get("tenant") == tenant}


async def test_the_limit_in_force_is_published_beside_the_usage(make_gateway: MakeGateway,
                                                               session: aiohttp.ClientSession) -> None:
    """gateway_usage / gateway_limit is how near a tenant is (the GatewayTenantNearLimit alert): the plan's limit,
    an override's once it is set, NaN once an override lifts it; no gateway_limit for a meter without one."""
    worker = await make_gateway()
    for _ in range(2):
        assert await post_deploy(session, url(worker, ""), "near", plan="starter") == 200
    series = await _tenant_series(session, worker, "near")
    assert series[("gateway_usage", "chain_deployments")] == 2
    assert series[("gateway_limit", "chain_deployments")] == 50  # the starter plan's (of this file)
    assert ("gateway_usage", "api_calls") in series and ("gateway_limit", "api_calls") not in series

    async def override(limit: int | None) -> None:
        async with session.put(admin_url(worker, "/admin/tenants/near/overrides/chain_deployments"),
                               json={"limit": limit}, headers=ADMIN) as response:
            assert response.status in (200, 201), await response.text()

    async with session.put(admin_url(worker, "/admin/tenants/near"), json={"plan": "starter"},
                           headers=ADMIN) as response:
        assert response.status in (200, 201), await response.text()
    await override(80)
    assert await post_deploy(session, url(worker, ""), "near", plan="starter") == 200
    assert (await _tenant_series(session, worker, "near"))[("gateway_limit", "chain_deployments")] == 80
    await override(None)  # unlimited
    assert await post_deploy(session, url(worker, ""), "near", plan="starter") == 200
    assert math.isnan((await _tenant_series(session, worker, "near"))[("gateway_limit", "chain_deployments")])


# ------------------------------------------------------------------ failures


async def test_redis_down_fail_open_spools_and_replays(make_gateway: MakeGateway, redis_server: RedisProcess,
                                                       session: aiohttp.ClientSession) -> None:
    worker = await make_gateway()
    assert await post_deploy(session, url(worker, ""), "spooled") == 200
    redis_server.stop()
    try:
        started = time.monotonic()
        for _ in range(10):
            assert await post_deploy(session, url(worker, ""), "spooled") == 200
        assert time.monotonic() - started < 5, "an outage must not hold requests up"
        assert worker.spool.pending() >= 10, f"spooled: {worker.spool.pending()}"
    finally:
        redis_server.start()
    deadline = time.monotonic() + 10
    while worker.spool.pending():
        assert time.monotonic() < deadline, "the spool was not replayed"
        await asyncio.sleep(0.1)
    # The test's redis-server keeps nothing on disk, so the restart forgot the first request's count:
    # what is there now is exactly the ten requests served during the outage, replayed once.
    view = await usage(session, worker, "spooled")
    assert view["meters"]["chain_deployments"]["used"] == 10, (view["meters"], worker.spool.skipped)


async def test_redis_down_fail_closed_refuses(make_gateway: MakeGateway, redis_server: RedisProcess,
                                              session: aiohttp.ClientSession, upstream: Upstream) -> None:
    worker = await make_gateway(redis={"on_error": "fail_closed"})
    redis_server.stop()
    try:
        async with session.post(url(worker, DEPLOY), headers=bearer("closed")) as response:
            assert response.status == 503
            assert (await response.json())["type"].endswith("/limiter-unavailable")
            assert response.headers["Retry-After"] == "1"
        async with session.get(admin_url(worker, "/readyz")) as response:
            assert response.status == 503
    finally:
        redis_server.start()
    deadline = time.monotonic() + 5
    while await post_deploy(session, url(worker, ""), "closed") != 200:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    assert (await usage(session, worker, "closed"))["meters"]["chain_deployments"]["used"] == 1


Send = Callable[[aiohttp.ClientSession, str], AbstractAsyncContextManager[aiohttp.ClientResponse]]


async def _load_until_sigkill(victim: GatewayProcess, send: Send, seconds: float,
                              enough: Callable[[list[int]], bool] = lambda received: True,
                              ) -> tuple[list[int], float]:
    """Sixteen clients `send(session, victim.url)` over and over until the victim is killed with SIGKILL
    `seconds` into the load, or later once `enough(received)` (a loaded machine answers fewer requests in
    the same time; 30 s at most): the body sizes of the 200s they received, and how long the load ran."""
    received: list[int] = []
    started = time.monotonic()

    async def client(session: aiohttp.ClientSession) -> None:
        while True:
            try:
                async with send(session, victim.url) as response:
                    body = await response.read()
            except (TimeoutError, aiohttp.ClientError):
                return
            if response.status == 200:
                received.append(len(body))

    async with aiohttp.ClientSession() as session:
        clients = [asyncio.ensure_future(client(session)) for _ in range(16)]
        await asyncio.sleep(seconds)
        for _ in range(300):  # 30 s at most
            if enough(received):
                break
            await asyncio.sleep(0.1)
        assert victim.process is not None
        elapsed = time.monotonic() - started
        os.kill(victim.process.pid, signal.SIGKILL)
        await asyncio.gather(*clients)
    victim.stop()
    return received, elapsed


async def test_sigkill_under_load_loses_no_counted_response(upstream: Upstream, start_gateway: StartGateway) -> None:
    config = overrides(plans=UNTHROTTLED)
    received, _ = await _load_until_sigkill(
        start_gateway(upstream.url, **config),
        lambda session, url: session.get(url + "/api/load", headers=bearer("killed")), 1.0,
        lambda received: len(received) > 50)
    ok = len(received)
    survivor = start_gateway(upstream.url, **config)
    async with aiohttp.ClientSession() as session:
        counted = (await usage(session, survivor, "killed"))["meters"]["api_calls"]["used"]
    assert ok > 50
    assert counted >= ok  # every response a client received was counted (in-flight ones may be too)
    assert counted <= ok + 16


# ------------------------------------------------------------------ alerts


async def test_threshold_alert_delivered_once_with_signature(make_gateway: MakeGateway,
                                                             session: aiohttp.ClientSession) -> None:
    received: list[tuple[dict[str, Any], str, bytes]] = []

    async def hook(request: web.Request) -> web.Response:
        raw = await request.read()
        received.append((json.loads(raw), request.headers["X-Cosmos-Signature"], raw))
        return web.Response()

    app = web.Application()
    app.router.add_post("/hook", hook)
    receiver = await Upstream(app).start()
    try:
        worker = await make_gateway(alerts={"thresholds": [0.8], "webhook_url": receiver.url + "/hook",
                                            "webhook_secret": "whsec-test"})
        for _ in range(45):  # 80 % of 50 is crossed at 40
            await post_deploy(session, url(worker, ""), "alerted")
        deadline = time.monotonic() + 5
        while not received:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # nothing else may follow
        assert len(received) == 1
        body, signature, raw = received[0]
        assert (body["tenant"], body["meter"], body["threshold"]) == ("alerted", "chain_deployments", 0.8)
        assert verify_signature(signature, raw, "whsec-test", now=time.time())
        view = await usage(session, worker, "alerted")
        assert [a["threshold"] for a in view["alerts"]] == [0.8]
    finally:
        await receiver.close()


# ------------------------------------------------------------------ Redis Cluster


async def test_cluster_mode_is_exact(upstream: Upstream, tmp_path: Path) -> None:
    from tests.metering.redis_cluster import RedisClusterProcess

    cluster = RedisClusterProcess()
    try:
        await asyncio.to_thread(cluster.start)
    except Exception as exc:  # pragma: no cover - redis-cli missing
        pytest.skip(f"cannot start a Redis Cluster here: {exc}")
    try:
        settings = settings_for(upstream.url, cluster.url.replace("redis://", "redis+cluster://", 1),
                                f"sqlite+aiosqlite:///{tmp_path}/gw.db", **overrides(
                                    redis={"spool_dir": str(tmp_path / "spool")}))
        frozen = time.time()
        worker = Worker(settings, clock=lambda: frozen)  # no token comes back while the test runs
        await worker.start()
        try:
            async with aiohttp.ClientSession() as session:
                for tenant in ("c-one", "c-two", "c-three"):
                    statuses = await asyncio.gather(*(post_deploy(session, url(worker, ""), tenant, plan="trickle")
                                                      for _ in range(3)))
                    assert statuses.count(200) == 3
                    extra = [await post_deploy(session, url(worker, ""), tenant, plan="trickle") for _ in range(3)]
                    assert 200 not in extra  # burst used up
                    view = await usage(session, worker, tenant, plan="trickle")
                    assert view["meters"]["chain_deployments"]["used"] == 3
        finally:
            await worker.stop()
    finally:
        await asyncio.to_thread(cluster.close)


async def test_the_upstream_is_told_the_effective_plan(make_gateway: MakeGateway,
                                                       session: aiohttp.ClientSession) -> None:
    """X-Cosmos-Plan is the plan an operator (or Stripe) set, not the token's claim (PRODUCT.md §3)."""
    worker = await make_gateway()

    async def plan_seen(**claims: Any) -> list[str]:
        async with session.get(url(worker, "/api/chains"), headers=bearer("upgraded", **claims)) as response:
            assert response.status == 200, await response.text()
            echoed = await response.json()
        return [v for k, v in echoed["headers"] if k.lower() == "x-cosmos-plan"]

    assert await plan_seen(plan="trickle") == ["trickle"]  # no record yet: the token's claim
    assert await plan_seen() == ["starter"]  # no claim: the default plan
    async with session.put(admin_url(worker, "/admin/tenants/upgraded"), json={"plan": "overage"},
                           headers=ADMIN) as response:
        assert response.status in (200, 201), await response.text()
    assert await plan_seen(plan="trickle") == ["overage"]
    assert await plan_seen() == ["overage"]


async def test_a_429_carries_ratelimit_headers_with_the_violated_policy_at_zero(
        make_gateway: MakeGateway, session: aiohttp.ClientSession) -> None:
    """PRODUCT.md §4: a 429 carries RateLimit-Policy and RateLimit, `r=0` for the violated policy."""
    worker = await make_gateway()
    for _ in range(2):
        assert await post_deploy(session, url(worker, ""), "capped", plan="monthly") == 200
    async with session.post(url(worker, DEPLOY), headers=bearer("capped", plan="monthly"), data=b"{}") as response:
        assert response.status == 429
        assert (await response.json())["type"].endswith("/quota-exceeded")
        assert response.headers["RateLimit-Policy"].startswith('"burst";q=1000;w=1, "chain_deployments";q=2;w=')
        burst, deployments = response.headers["RateLimit"].split(", ")
        assert burst.startswith('"burst";r=') and burst != '"burst";r=0;t=1'
        assert deployments.startswith('"chain_deployments";r=0;t=')
        assert int(deployments.rsplit("=", 1)[1]) == int(response.headers["Retry-After"])

    statuses = [await post_deploy(session, url(worker, ""), "hasty", plan="trickle") for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
    async with session.get(url(worker, "/api/chains"), headers=bearer("hasty", plan="trickle")) as response:
        assert response.status == 429
        assert (await response.json())["type"].endswith("/rate-limited")
        assert response.headers["RateLimit-Policy"] == '"burst";q=3;w=1'
        assert response.headers["RateLimit"] == '"burst";r=0;t=1'


async def test_sigterm_while_redis_stalls_loses_nothing(upstream: Upstream, redis_server: RedisProcess,
                                                        start_gateway: StartGateway) -> None:
    """PRODUCT.md §5: SIGTERM loses nothing. Under load, Redis stalls past the check timeout (checks wait
    for late replies, byte counts wait in the store) and the gateway gets SIGTERM meanwhile: every request
    a client got is counted once, and every byte it got is billed, after the late replies and the spool."""
    config = overrides(plans=UNTHROTTLED)
    victim = start_gateway(upstream.url, **config)
    ok = received = 0
    stop = asyncio.Event()

    async def client(session: aiohttp.ClientSession, i: int) -> None:
        nonlocal ok, received
        n = 0
        while not stop.is_set():
            n += 1
            try:
                async with session.get(f"{victim.url}/api/load/{i}/{n}", headers=bearer("drained")) as response:
                    body = await response.read()
            except (TimeoutError, aiohttp.ClientError):
                return
            if response.status == 200:
                ok += 1
                received += len(body)

    stall = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
            clients = [asyncio.ensure_future(client(session, i)) for i in range(16)]
            await asyncio.sleep(0.5)
            # Redis busy for 3 s: checks time out after 50 ms and their late replies come after the stall,
            # long after the last request was answered.
            stalled = asyncio.ensure_future(stall.eval(BUSY_SCRIPT, 0, 3_000_000))
            await asyncio.sleep(0.3)
            assert victim.process is not None
            victim.process.send_signal(signal.SIGTERM)
            stop.set()
            await asyncio.gather(*clients)
            await stalled
        assert victim.terminate(timeout=30) == 0
    finally:
        await stall.aclose()
        victim.stop()
    survivor = start_gateway(upstream.url, **config)  # replays what the first one spooled
    async with aiohttp.ClientSession() as session:
        deadline = time.monotonic() + 10
        while True:
            async with session.get(survivor.url + "/_gateway/usage", headers=bearer("drained")) as response:
                meters = (await response.json())["meters"]
            if (meters["api_calls"]["used"], meters["bandwidth_bytes"]["used"]) == (ok, received):
                break
            assert time.monotonic() < deadline, (meters["api_calls"], meters["bandwidth_bytes"], ok, received)
            await asyncio.sleep(0.2)
    assert ok > 50


async def test_sigterm_spools_checks_whose_replies_never_came(upstream: Upstream, redis_server: RedisProcess,
                                                              start_gateway: StartGateway) -> None:
    """SIGTERM waits for the outcome of checks that timed out (their late replies, LATE_REPLY_SECONDS at
    most) and spools those Redis never ran, before the spool closes: every request served is counted."""
    proxy = await FaultProxy(redis_server.port).start()
    victim = start_gateway(upstream.url, redis_url=proxy.url, **overrides(plans=UNTHROTTLED))
    served = 0
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(5):
                served += await post_deploy(session, victim.url, "blackholed") == 200
            proxy.blackhole = True  # Redis never sees what the gateway sends from now on
            statuses = await asyncio.gather(*(post_deploy(session, victim.url, "blackholed") for _ in range(20)))
            assert statuses == [200] * 20  # fail_open: served, their checks timed out unanswered
            served += 20
            assert victim.process is not None
            victim.process.send_signal(signal.SIGTERM)
            assert victim.terminate(timeout=30) == 0
    finally:
        victim.stop()
        await proxy.close()
    survivor = start_gateway(upstream.url, **overrides(plans=UNTHROTTLED))  # replays what the first one spooled
    async with aiohttp.ClientSession() as session:
        deadline = time.monotonic() + 10
        while (used := (await usage(session, survivor, "blackholed"))["meters"]["chain_deployments"]["used"]) \
                != served:
            assert time.monotonic() < deadline, (used, served)
            await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def _behind_a_fault_proxy(upstream: Upstream, redis_server: RedisProcess, tmp_path: Path,
                                **redis: Any) -> AsyncIterator[tuple[GatewayProcess, FaultProxy]]:
    """A gateway whose Redis is reached through a fault proxy; both stopped at the end."""
    proxy = await FaultProxy(redis_server.port).start()
    plans = {"starter": {"rate": {"per_second": 100000, "burst": 100000},
                         "quotas": {"chain_deployments": {"limit": 1000}}}}
    config = config_dict(upstream.url, proxy.url, f"sqlite+aiosqlite:///{tmp_path}/gw.db",
                         **overrides(plans=plans, redis=redis))
    gateway = GatewayProcess(config, tmp_path).start()
    try:
        yield gateway, proxy
    finally:
        gateway.terminate()
        await proxy.close()


async def _deployments_used(session: aiohttp.ClientSession, gateway: GatewayProcess, tenant: str,
                            expected: int) -> int:
    """The tenant's deployments once they settle at `expected` (spool replays run every second)."""
    deadline = time.monotonic() + 15
    while True:
        try:
            used = (await usage(session, gateway, tenant))["meters"]["chain_deployments"]["used"]
        except AssertionError:  # 503 while the store is unreachable
            used = None
        if used == expected or time.monotonic() > deadline:
            return used
        await asyncio.sleep(0.2)


async def _deploy_losing_replies(session: aiohttp.ClientSession, gateway: GatewayProcess, proxy: FaultProxy,
                                 tenant: str, *, before: int, lost: int) -> list[int]:
    """`before` deployments answered normally, then `lost` whose replies from Redis are dropped (Redis runs
    them) before their connection is cut; the statuses of those."""
    assert [await post_deploy(session, gateway.url, tenant) for _ in range(before)] == [200] * before
    proxy.drop_replies = True
    statuses = await asyncio.gather(*(post_deploy(session, gateway.url, tenant) for _ in range(lost)))
    await asyncio.sleep(0.3)
    proxy.cut()  # the connection that carried them is gone
    proxy.drop_replies = False
    return list(statuses)


async def _assert_settles_at(session: aiohttp.ClientSession, gateway: GatewayProcess, tenant: str,
                             expected: int) -> None:
    assert await _deployments_used(session, gateway, tenant, expected) == expected
    await asyncio.sleep(1.5)  # a replay or give-back that came later would show now
    assert await _deployments_used(session, gateway, tenant, expected) == expected


async def test_checks_whose_replies_were_lost_count_once(upstream: Upstream, redis_server: RedisProcess,
                                                         tmp_path: Path) -> None:
    """Redis runs the checks but their replies are lost (then the connection is cut): the requests are
    served (fail_open) and spooled, and each counts exactly once — the call marker tells the replay that
    Redis counted them already (PRODUCT.md §5: no unit counted twice)."""
    async with _behind_a_fault_proxy(upstream, redis_server, tmp_path) as (gateway, proxy), \
            aiohttp.ClientSession() as session:
        assert await _deploy_losing_replies(session, gateway, proxy, "lossy", before=5, lost=20) == [200] * 20
        assert [await post_deploy(session, gateway.url, "lossy") for _ in range(5)] == [200] * 5
        await _assert_settles_at(session, gateway, "lossy", 30)


async def test_refused_checks_whose_replies_were_lost_are_given_back_once(
        upstream: Upstream, redis_server: RedisProcess, tmp_path: Path) -> None:
    """Under fail_closed a check without an answer is refused with 503; Redis did run it, so what it counted
    is given back — exactly once, though the give-back's own reply is lost too."""
    async with _behind_a_fault_proxy(upstream, redis_server, tmp_path, on_error="fail_closed") as (gateway, proxy), \
            aiohttp.ClientSession() as session:
        statuses = await _deploy_losing_replies(session, gateway, proxy, "closed-lossy", before=3, lost=10)
        assert statuses == [503] * 10
        await _assert_settles_at(session, gateway, "closed-lossy", 3)


async def test_sigkill_under_load_loses_at_most_100_ms_of_byte_counts(
        upstream: Upstream, start_gateway: StartGateway) -> None:
    """PRODUCT.md §5: SIGKILL loses at most the byte records of the last 100 ms. Byte counts wait in memory
    for the next pipeline only; what clients received is compared with what was billed."""
    config = overrides(plans=UNTHROTTLED)
    body = b"x" * 4000
    largest = len(body) * 3  # one echoed response (the body and its JSON around it), generously
    sizes, elapsed = await _load_until_sigkill(
        start_gateway(upstream.url, **config),
        lambda session, url: session.post(url + "/api/bytes", headers=bearer("bytes-killed"), data=body), 1.5,
        lambda sizes: sum(sizes) > 100 * largest)
    received = sum(sizes)
    survivor = start_gateway(upstream.url, **config)
    async with aiohttp.ClientSession() as session:
        meters = (await usage(session, survivor, "bytes-killed"))["meters"]
    billed = meters["bandwidth_bytes"]["used"]
    per_100_ms = received / elapsed / 10
    assert received > 100 * largest
    # Lost: at most what the last 100 ms brought; extra: the responses in flight when it died.
    assert received - per_100_ms <= billed <= received + 16 * largest, (billed, received, per_100_ms)


async def test_sigkill_right_after_fail_open_answers_loses_no_deployment(
        upstream: Upstream, redis_server: RedisProcess, tmp_path: Path) -> None:
    """PRODUCT.md §5: SIGKILL loses nothing counted at admission. Under fail_open an admission is counted in
    the spool, and it is on disk before the request goes on: a gateway killed the moment its answers went
    out has lost none of them (the chaos harness found one lost within the spool's 50 ms flush interval)."""
    async with _behind_a_fault_proxy(upstream, redis_server, tmp_path) as (gateway, proxy), \
            aiohttp.ClientSession() as session:
        config = yaml.safe_load(gateway.config_path.read_text())
        assert [await post_deploy(session, gateway.url, "killed-open") for _ in range(3)] == [200] * 3
        proxy.blackhole = True  # checks time out: served fail-open, counted in the spool
        statuses = await asyncio.gather(*(post_deploy(session, gateway.url, "killed-open") for _ in range(20)))
        assert statuses == [200] * 20
        assert gateway.process is not None
        os.kill(gateway.process.pid, signal.SIGKILL)
    config["redis"]["url"] = redis_server.url
    survivor = GatewayProcess(config, tmp_path).start()  # same spool folder: replays the dead one's file
    try:
        async with aiohttp.ClientSession() as session:
            assert await _deployments_used(session, survivor, "killed-open", 23) == 23
    finally:
        survivor.terminate()
