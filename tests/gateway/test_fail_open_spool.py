"""The fail-open spool of a real `cosmos-gateway serve` (PRODUCT.md §5): bounded by `redis.spool_max_bytes`
(503 once full, as under fail_closed), replayed exactly once when Redis is back, orphans of dead workers
replayed too, private files."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from gateway.cli.devservices import RedisProcess
from metering.periods import bucket_start, period_bounds
from metering.spool_entries import to_entry
from metering.store import Record
from tests.gateway.conftest import StartGateway
from tests.support import GatewayProcess, Upstream, bearer, upstream_app

CAP = 1 << 20  # the smallest cap the config takes
PLANS: dict[str, Any] = {"starter": {"rate": {"per_second": 100_000, "burst": 100_000},
                                     "quotas": {"chain_deployments": {"limit": 1_000_000}}}}
DEPLOY = "/api/chains/c1/deployments"


def spool_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.jsonl*")) if folder.exists() else 0


async def used(session: aiohttp.ClientSession, gateway: GatewayProcess, tenant: str) -> dict[str, Any]:
    async with session.get(gateway.url + "/_gateway/usage", headers=bearer(tenant)) as response:
        assert response.status == 200, await response.text()
        return (await response.json())["meters"]


async def wait_until_replayed(folder: Path, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while spool_bytes(folder):
        assert time.monotonic() < deadline, f"still spooled: {sorted(os.listdir(folder))}"
        await asyncio.sleep(0.1)


async def test_a_full_spool_refuses_with_503_and_everything_spooled_is_replayed_once(
        redis_server: RedisProcess, start_gateway: StartGateway, tmp_path: Path) -> None:
    seen: list[web.BaseRequest] = []
    upstream = await Upstream(upstream_app(seen)).start()
    folder = tmp_path / "spool"
    gateway = start_gateway(upstream, plans=PLANS,
                            redis={"spool_dir": str(folder), "spool_max_bytes": CAP, "on_error": "fail_open"})
    tenant = f"full-{uuid.uuid4().hex[:8]}"
    statuses: list[int] = []
    refusals: list[tuple[dict[str, str], dict[str, Any]]] = []
    largest = 0
    async with aiohttp.ClientSession() as session:
        redis_server.stop()
        try:
            async def one() -> None:
                async with session.post(gateway.url + DEPLOY, headers=bearer(tenant), data=b"{}") as response:
                    body = await response.read()
                    statuses.append(response.status)
                    if response.status == 503:
                        refusals.append((dict(response.headers), json.loads(body)))

            # ~600 spooled bytes a request: a 1 MiB spool is full after some 1,700 of them.
            for _ in range(120):
                await asyncio.gather(*(one() for _ in range(40)))
                largest = max(largest, spool_bytes(folder))
                if statuses.count(503) >= 200:
                    break
            assert statuses.count(503) >= 200, f"never refused: {len(statuses)} served, spool {largest} B"
            assert set(statuses) == {200, 503}, set(statuses)
            served = statuses.count(200)
            assert len(seen) == served, "a refused request reached the upstream"
            headers, problem = refusals[0]
            assert problem["type"].endswith("/limiter-unavailable") and problem["status"] == 503, problem
            assert "Retry-After" in headers
            await asyncio.sleep(0.3)  # the last byte records are flushed
            largest = max(largest, spool_bytes(folder))
            assert largest <= CAP, largest
            assert largest > CAP * 0.8, largest

            async with session.get(gateway.admin_url + "/metrics") as response:
                text = await response.text()
            samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
            assert CAP * 0.8 < samples["gateway_spool_bytes"] <= CAP, samples.get("gateway_spool_bytes")
            assert "% full" in gateway.log(), gateway.log()[-2000:]  # the warning past 80 %
        finally:
            redis_server.start()
        await wait_until_replayed(folder, 30)
        # The test's redis-server forgot everything when it stopped: what it holds now is the replay.
        meters = await used(session, gateway, tenant)
        assert meters["chain_deployments"]["used"] == served, (meters, served)
        assert meters["api_calls"]["used"] == served, (meters, served)


async def test_the_spool_file_of_a_worker_that_no_longer_runs_is_replayed(
        upstream: Upstream, start_gateway: StartGateway, tmp_path: Path) -> None:
    folder = tmp_path / "spool"
    folder.mkdir()
    tenant = f"orphan-{uuid.uuid4().hex[:8]}"
    now = time.time()
    start, end = (int(x.timestamp()) for x in period_bounds(datetime.fromtimestamp(now, UTC), None))
    # Left by worker 3 of an earlier `serve --workers 4`, now running with one worker.
    with (folder / "worker-3.jsonl").open("w") as file:
        for _ in range(25):
            record = Record(tenant, start, end, bucket_start(now, 300), 86_400, count=(("chain_deployments", 1),),
                            bill=(("chain_deployments", 1),), record_id=uuid.uuid4().hex)
            file.write(json.dumps(to_entry(record)) + "\n")
    gateways = [start_gateway(upstream.url, sqlite_file="var/gw.db", plans=PLANS, redis={"spool_dir": str(folder)})
                for _ in range(2)]
    await wait_until_replayed(folder, 15)
    async with aiohttp.ClientSession() as session:
        assert (await used(session, gateways[0], tenant))["chain_deployments"]["used"] == 25
    # Files and folders the gateway creates are private.
    assert stat.S_IMODE((tmp_path / "var").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "var" / "gw.db").stat().st_mode) == 0o600
