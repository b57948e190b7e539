"""Fixtures for the gateway tests: `cosmos-gateway serve` child processes on the test's redis-server."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Protocol

import pytest

from gateway.cli.devservices import RedisProcess
from tests.support import GatewayProcess, running_gateway


class Served(Protocol):
    """A test upstream server (`tests.support.Upstream`, `tests.rawupstream.RawServer`)."""

    @property
    def url(self) -> str: ...

    async def close(self) -> None: ...


StartGateway = Callable[..., GatewayProcess]


@pytest.fixture
async def start_gateway(redis_server: RedisProcess, tmp_path: Path) -> AsyncIterator[StartGateway]:
    """`start_gateway(upstream, **config_overrides)`: a started GatewayProcess of `config_dict` in front of
    `upstream` (a URL or a server), on the test's redis-server (or `redis_url=`), its files in tmp_path.
    At the end every gateway is stopped, then the servers given are closed: by then the gateways'
    connections to them are gone."""
    async with contextlib.AsyncExitStack() as running:

        def start(upstream: str | Served, /, *, redis_url: str | None = None, **overrides: Any) -> GatewayProcess:
            if not isinstance(upstream, str):
                running.push_async_callback(upstream.close)
                upstream = upstream.url
            return running.enter_context(running_gateway(upstream, redis_url or redis_server.url, tmp_path,
                                                         **overrides))

        yield start
