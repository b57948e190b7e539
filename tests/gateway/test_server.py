"""`cosmos-gateway serve` as a real process: workers, metrics, drain on SIGTERM, streaming memory."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.cli.devservices import RedisProcess
from tests.support import GatewayProcess, Upstream, bearer, child_pids, config_dict

MiB = 1024 * 1024


def sample(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


@pytest.fixture
async def process_factory(upstream: Upstream, redis_server: RedisProcess, tmp_path: Path):
    started: list[GatewayProcess] = []

    def make(workers: int | str = 1, **overrides: object) -> GatewayProcess:
        config = config_dict(upstream.url, redis_server.url, f"sqlite+aiosqlite:///{tmp_path}/gw.db", **overrides)
        gateway = GatewayProcess(config, tmp_path, workers=workers)
        started.append(gateway)
        return gateway.start()

    yield make
    for gateway in started:
        gateway.stop()


async def test_sigterm_drains_in_flight_requests(process_factory) -> None:
    gateway = process_factory()
    async with aiohttp.ClientSession() as session:
        slow = asyncio.ensure_future(session.get(gateway.url + "/slow?delay=1.5", headers=bearer()))
        await asyncio.sleep(0.4)
        exit_code = await asyncio.to_thread(gateway.terminate)
        response = await slow
        assert response.status == 200 and await response.text() == "slow"
    assert exit_code == 0


async def test_workers_share_ports_and_metrics_are_summed(process_factory) -> None:
    gateway = process_factory(workers=2, plans={"starter": {"rate": {"per_second": 1000, "burst": 1000}}})
    async with aiohttp.ClientSession() as session:
        for _ in range(30):  # a new connection each time: the kernel spreads them over workers
            async with session.get(gateway.url + "/api/x", headers={**bearer(), "Connection": "close"}) as r:
                assert r.status == 200
        for _ in range(3):
            async with session.get(gateway.url + "/api/x", headers={"Connection": "close"}) as r:
                assert r.status == 401
        async with session.get(gateway.admin_url + "/metrics") as r:
            text = await r.text()
    assert sample(text, "gateway_requests_total", status_class="2xx", method="GET") == 30
    assert sample(text, "gateway_requests_total", status_class="4xx") == 3
    assert sample(text, "gateway_auth_failures_total", reason="missing") == 3
    assert sample(text, "gateway_request_duration_seconds_count") == 33
    assert sample(text, "gateway_upstream_duration_seconds_count") == 30
    assert gateway.terminate() == 0


async def test_metrics_parse_single_worker(process_factory) -> None:
    gateway = process_factory()
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.url + "/api/x", headers=bearer()) as r:
            assert r.status == 200
        async with session.get(gateway.admin_url + "/metrics") as r:
            assert r.headers["Content-Type"].startswith("text/plain")
            text = await r.text()
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {"gateway_requests", "gateway_request_duration_seconds", "gateway_upstream_duration_seconds",
            "gateway_auth_failures"} <= names
    assert sample(text, "gateway_requests_total", plan="starter", meter_route="api_calls") == 1


async def test_access_log_is_json_lines_without_secrets(process_factory) -> None:
    gateway = process_factory(server={"access_log": True, "shutdown_grace_seconds": 5})
    headers = {**bearer(), "X-Request-Id": "log-check-1"}
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.url + "/api/x?access_token=secret-in-query", headers=headers) as r:
            assert r.status == 200
    gateway.terminate()
    log = gateway.log()
    assert headers["Authorization"].split()[1] not in log
    assert "secret-in-query" not in log
    line = next(json.loads(x) for x in log.splitlines() if x.startswith("{") and "log-check-1" in x)
    assert line["tenant"] == "acme" and line["status"] == 200 and line["method"] == "GET"
    assert line["path"] == "/api/x" and line["duration_ms"] >= 0 and line["upstream_ms"] >= 0


async def test_100_mib_each_way_with_flat_memory(process_factory) -> None:
    gateway = process_factory()
    size = 100 * MiB
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        async with session.get(gateway.url + "/api/warm", headers=bearer()) as r:
            await r.read()
        baseline = gateway.rss_bytes()
        peak = baseline
        done = asyncio.Event()

        async def watch() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, gateway.rss_bytes())
                await asyncio.sleep(0.05)

        watcher = asyncio.ensure_future(watch())
        block = b"u" * MiB
        expected = hashlib.sha256()
        for _ in range(100):
            expected.update(block)

        async def upload() -> AsyncIterator[bytes]:
            for _ in range(100):
                yield block

        async with session.post(gateway.url + "/api/upload", headers=bearer(), data=upload()) as r:
            echoed = await r.json()
        assert echoed["body_size"] == size and echoed["body_sha256"] == expected.hexdigest()

        received = 0
        async with session.get(gateway.url + f"/stream/{size}", headers=bearer()) as r:
            async for chunk in r.content.iter_chunked(MiB):
                received += len(chunk)
        done.set()
        await watcher
    assert received == size
    assert peak - baseline < 64 * MiB, f"gateway RSS grew by {(peak - baseline) / MiB:.1f} MiB"


async def test_workers_auto_starts_one_worker_per_core(process_factory) -> None:
    from gateway.server import worker_count

    # At most two cores for the gateway (it inherits this affinity), however many this machine has.
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, sorted(allowed)[:2])
    try:
        expected = worker_count("auto")
        gateway = process_factory(workers="auto")
    finally:
        os.sched_setaffinity(0, allowed)
    assert 1 <= expected <= 2
    assert gateway.process is not None
    # One worker runs in the process itself; more are forked by a supervisor.
    assert len(child_pids(gateway.process.pid)) == (expected if expected > 1 else 0)
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.url + "/api/chains", headers=bearer()) as response:
            assert response.status == 200
    assert gateway.terminate() == 0
    assert f"server.workers auto: {expected} worker" in gateway.log()


async def test_workers_exit_when_the_supervisor_is_killed(process_factory) -> None:
    gateway = process_factory(workers=2)
    assert gateway.process is not None
    workers = child_pids(gateway.process.pid)
    assert len(workers) == 2
    os.kill(gateway.process.pid, signal.SIGKILL)
    gateway.process.wait()
    deadline = time.monotonic() + 10
    while any(_running(pid) for pid in workers):
        states = [_state(p) for p in workers]
        assert time.monotonic() < deadline, f"orphans kept running: {states}\n{gateway.log()[-3000:]}"
        await asyncio.sleep(0.1)


def _state(pid: int) -> str:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        return " ".join(line for line in lines if line.startswith(("State", "PPid")))
    except (OSError, StopIteration):
        return "gone"


def _running(pid: int) -> bool:
    state = _state(pid)
    return state != "gone" and "zombie" not in state


# ---------------------------------------------------------------- issue 11: development services belong to the CLI
# (that nothing of the served gateway imports gateway.cli is tests/test_architecture.py's)


async def test_serve_starts_development_services_the_config_leaves_unset(tmp_path: Path) -> None:
    """`make run`: with redis.url and upstream.url null, `serve` starts a private redis-server and the demo upstream."""
    config = config_dict(None, None, f"sqlite+aiosqlite:///{tmp_path}/gw.db")  # type: ignore[arg-type]
    gateway = GatewayProcess(config, tmp_path)
    try:
        gateway.start()
        async with aiohttp.ClientSession() as session:
            async with session.get(gateway.url + "/api/chains", headers=bearer()) as r:
                assert r.status == 200 and "RateLimit" in r.headers  # served by the demo upstream, metered in Redis
            async with session.get(gateway.admin_url + "/readyz") as r:
                assert r.status == 200 and (await r.json())["status"] == "ready"
        assert gateway.terminate() == 0
    finally:
        gateway.stop()
    log = gateway.log()
    assert "started a private redis-server" in log and "serving the built-in demo upstream" in log
