"""Shared fixtures: a real redis-server on a free port, a real upstream, a gateway worker."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.app import Worker
from gateway.devservices import RedisProcess
from tests.support import Upstream, settings_for, upstream_app


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisProcess]:
    server = RedisProcess().start()
    yield server
    server.close()


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    server = await Upstream(upstream_app()).start()
    yield server
    await server.close()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}"


@dataclass
class RunningGateway:
    worker: Worker

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.worker.proxy_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.worker.admin_port}"


@pytest.fixture
async def gateway(upstream: Upstream, redis_server: RedisProcess, sqlite_url: str) -> AsyncIterator[RunningGateway]:
    worker = Worker(settings_for(upstream.url, redis_server.url, sqlite_url))
    await worker.start()
    yield RunningGateway(worker)
    await worker.stop()
