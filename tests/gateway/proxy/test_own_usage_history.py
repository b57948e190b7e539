"""`GET /_gateway/usage/history`: a tenant's own usage history on the proxy listener, through real gateways (in
process with a settable clock, and `cosmos-gateway serve --workers 2`), a real redis-server and SQLite."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.app import Worker
from gateway.cli.devservices import RedisProcess
from tests.gateway.conftest import StartGateway
from tests.support import Upstream, bearer, settings_for

ADMIN = {"Authorization": "Bearer ops-token-0123456789"}
HISTORY = "/_gateway/usage/history?step=hour&from=2026-03-15T08:00:00Z&to=2026-03-15T11:00:00Z&meter=api_calls"


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now.timestamp()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def worker(upstream: Upstream, redis_server: RedisProcess, tmp_path: Path) -> AsyncIterator[Worker]:
    settings = settings_for(upstream.url, redis_server.url, f"sqlite+aiosqlite:///{tmp_path}/gw.db",
                            admin={"tokens": "ops:ops-token-0123456789"}, redis={"spool_dir": str(tmp_path / "s")})
    started = Worker(settings, clock=Clock(datetime(2026, 3, 15, 9, 58, tzinfo=UTC)))
    await started.start()
    yield started
    await started.stop()


async def call(session: aiohttp.ClientSession, base: str, path: str, headers: dict[str, str] | None = None,
               ) -> tuple[int, str, str]:
    async with session.get(base + path, headers=headers or {}) as response:
        return response.status, response.headers.get("Content-Type", ""), await response.text()


def hours(text: str) -> dict[str, Any]:
    return {p["start"][11:16]: p["value"] for p in json.loads(text)["series"]["api_calls"]}


async def test_a_tenant_sees_its_own_history_open_buckets_and_ledger_alike(worker: Worker) -> None:
    proxy, admin = f"http://127.0.0.1:{worker.proxy_port}", f"http://127.0.0.1:{worker.admin_port}"
    async with aiohttp.ClientSession() as session:
        for tenant, calls in (("acme", 3), ("beta", 1)):
            for _ in range(calls):
                assert (await call(session, proxy, "/api/chains", bearer(tenant)))[0] == 200
        status, content_type, text = await call(session, proxy, HISTORY, bearer("acme"))
        assert (status, content_type) == (200, "application/json"), text
        assert json.loads(text)["tenant"] == "acme"
        assert hours(text) == {"08:00": 0, "09:00": 3, "10:00": 0}  # the open bucket, from Redis

        assert isinstance(worker.clock, Clock)
        worker.clock.now = datetime(2026, 3, 15, 10, 5, tzinfo=UTC).timestamp()  # the 09:55 bucket is closed
        async with session.post(admin + "/admin/sync/run", headers=ADMIN) as response:
            assert response.status == 200, await response.text()
        assert await worker.redis.exists("gw:{t:acme}:b:" + str(int(datetime(2026, 3, 15, 9, 55, tzinfo=UTC)
                                                                     .timestamp()))) == 0
        status, _, text = await call(session, proxy, HISTORY, bearer("acme"))
        assert hours(text) == {"08:00": 0, "09:00": 3, "10:00": 0}  # now from the ledger: the same

        # Only the caller's own tenant, whatever the query says.
        status, _, text = await call(session, proxy, HISTORY + "&tenant=acme", bearer("beta"))
        assert status == 200 and hours(text)["09:00"] == 1

        status, content_type, text = await call(session, proxy, HISTORY, {**bearer("acme"), "Accept": "text/csv"})
        assert (status, content_type) == (200, "text/csv; charset=utf-8")
        rows = list(csv.DictReader(io.StringIO(text, newline="")))
        assert [(r["start"], r["meter"], r["value"]) for r in rows] == [
            ("2026-03-15T08:00:00Z", "api_calls", "0"), ("2026-03-15T09:00:00Z", "api_calls", "3"),
            ("2026-03-15T10:00:00Z", "api_calls", "0")]


async def test_without_a_token_401_and_bad_queries_400(worker: Worker) -> None:
    proxy = f"http://127.0.0.1:{worker.proxy_port}"
    async with aiohttp.ClientSession() as session:
        status, content_type, text = await call(session, proxy, HISTORY)
        assert (status, content_type) == (401, "application/problem+json"), text
        for query, field in (("step=minute", "step"), ("meter=chains", "meter"), ("from=2020-01-01", "from"),
                             ("from=2026-03-15T10:00:00Z&to=2026-03-15T09:00:00Z", "from")):
            status, content_type, text = await call(session, proxy, "/_gateway/usage/history?" + query,
                                                    bearer("acme"))
            assert (status, content_type) == (400, "application/problem+json"), text
            assert field in [error["field"] for error in json.loads(text)["errors"]]
        # Other spellings of the path reach the same endpoint; nothing under /_gateway/ goes upstream.
        status, _, text = await call(session, proxy, "/_gateway//usage/history/?step=day", bearer("acme"))
        assert status == 200 and json.loads(text)["step"] == "day"


async def test_every_worker_process_answers_the_same(upstream: Upstream, start_gateway: StartGateway) -> None:
    gateway = start_gateway(upstream, server={"workers": 2})
    path = "/_gateway/usage/history?step=hour&meter=api_calls"
    async with aiohttp.ClientSession() as session:
        for _ in range(5):
            assert (await call(session, gateway.url, "/api/chains", bearer("multi")))[0] == 200
    answers = []
    for _ in range(8):  # a connection each: SO_REUSEPORT spreads them over both workers
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
            status, _, text = await call(session, gateway.url, path, bearer("multi"))
            assert status == 200, text
            answers.append(sum(p["value"] for p in json.loads(text)["series"]["api_calls"]))
    assert answers == [5] * 8
