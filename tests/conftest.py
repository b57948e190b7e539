"""Shared fixtures: a real redis-server on a free port, a Redis Cluster of real servers (per test module), a real
upstream, a gateway worker."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis

from gateway.app import Worker
from gateway.cli.devservices import RedisProcess
from tests.metering.redis_cluster import RedisClusterProcess
from tests.support import Listeners, Upstream, settings_for, upstream_app


@pytest.fixture(scope="session")
def redis_process() -> Iterator[RedisProcess]:
    server = RedisProcess().start()
    yield server
    server.close()


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[RedisClusterProcess]:
    if shutil.which("redis-cli") is None or shutil.which("redis-server") is None:
        pytest.skip("redis-cli/redis-server not installed: cannot build a Redis Cluster")
    cluster = RedisClusterProcess().start()
    yield cluster
    cluster.close()


@pytest.fixture
def redis_server(redis_process: RedisProcess) -> RedisProcess:
    """The session's redis-server, emptied: counts and rate state of one test never leak into the next."""
    if not redis_process.running:
        redis_process.start()
    client = redis.Redis.from_url(redis_process.url)
    try:
        client.flushall()
    finally:
        client.close()
    return redis_process


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    server = await Upstream(upstream_app()).start()
    yield server
    await server.close()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}"


class RunningGateway(Listeners):
    """An in-process worker, started (its ports are known)."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.proxy_port, self.admin_port = worker.proxy_port, worker.admin_port


@pytest.fixture
async def gateway(upstream: Upstream, redis_server: RedisProcess, sqlite_url: str) -> AsyncIterator[RunningGateway]:
    worker = Worker(settings_for(upstream.url, redis_server.url, sqlite_url))
    await worker.start()
    yield RunningGateway(worker)
    await worker.stop()
