"""Faults the gateway did not foresee, and dependencies that are down, on real listeners (PRODUCT.md §3-§4).

An in-process Worker with real sockets, a real redis-server and real SQLite: a collaborator is made to
fail, and the answer must still be problem+json with the request id, with no stack trace, logged with its
traceback, and the admitted units given back.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from gateway.app import Worker
from gateway.cli.devservices import RedisProcess
from tests.support import Upstream, bearer, eventually, is_, settings_for, upstream_app

ADMIN_TOKEN = "ops-token-0123456789abcdef"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
DEADLINE = 10.0


@pytest.fixture
async def private_redis() -> AsyncIterator[RedisProcess]:
    """A redis-server of this test alone, so stopping it disturbs no other test."""
    server = RedisProcess().start()
    yield server
    server.close()


@pytest.fixture
async def worker(private_redis: RedisProcess, sqlite_url: str) -> AsyncIterator[Worker]:
    upstream = await Upstream(upstream_app()).start()
    worker = Worker(settings_for(upstream.url, private_redis.url, sqlite_url, admin={"tokens": f"ops:{ADMIN_TOKEN}"},
                                 redis={"on_error": "fail_closed"}))
    await worker.start()
    yield worker
    await worker.stop()
    await upstream.close()


async def call(port: int, method: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
    timeout = aiohttp.ClientTimeout(total=DEADLINE)
    async with aiohttp.ClientSession(timeout=timeout) as session, \
            session.request(method, f"http://127.0.0.1:{port}{path}", headers=headers) as response:
        return response.status, response.headers, await response.read()


def assert_problem(status: int, headers: Any, body: bytes, expected: int, suffix: str) -> dict[str, Any]:
    assert status == expected, body[:300]
    assert headers["Content-Type"].startswith("application/problem+json"), headers
    document = json.loads(body)
    assert document["status"] == expected and document["type"].endswith("/" + suffix), document
    assert headers.get("X-Request-Id")
    assert b"Traceback" not in body and b"boom" not in body
    return document


async def used(worker: Worker, meter: str) -> float:
    status, _, body = await call(worker.admin_port, "GET", "/admin/tenants/acme", ADMIN)
    assert status == 200, body[:300]
    return json.loads(body)["meters"][meter]["used"]


# ------------------------------------------------------------------ the proxy listener's outermost handler


async def test_unforeseen_fault_is_a_problem_500_and_gives_the_units_back(
        worker: Worker, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # A request that works counts one api_calls unit: the baseline.
    status, _, _ = await call(worker.proxy_port, "GET", "/api/chains", bearer())
    assert status == 200
    await eventually(lambda: is_(used(worker, "api_calls"), 1), "the first call to be counted", DEADLINE)

    async def broken(*_: Any, **__: Any) -> Any:
        raise RuntimeError("boom: an unforeseen fault with a secret in it")

    monkeypatch.setattr(worker.pool, "request", broken)
    with caplog.at_level(logging.ERROR):
        status, headers, body = await call(worker.proxy_port, "GET", "/api/chains",
                                           {**bearer(), "X-Request-Id": "fault-1"})
    document = assert_problem(status, headers, body, 500, "internal")
    assert headers["X-Request-Id"] == "fault-1"
    assert "secret" not in document["detail"]
    logged = [r for r in caplog.records if r.exc_info and "fault-1" in r.getMessage()]
    assert logged and logged[0].exc_info[0] is RuntimeError, [r.getMessage() for r in caplog.records]
    # Admitted, then failed before the upstream had it: its unit is given back.
    await eventually(lambda: is_(used(worker, "api_calls"), 1), "the failed call's unit to be given back", DEADLINE)
    await asyncio.sleep(0.3)
    assert await used(worker, "api_calls") == 1


async def test_fault_while_recording_still_answers(worker: Worker, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*_: Any, **__: Any) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(worker.metrics, "observe", broken)
    status, _, body = await call(worker.proxy_port, "GET", "/api/chains", bearer())
    assert status == 200, body[:300]


# ------------------------------------------------------------------ /_gateway/usage with its stores down


async def test_usage_while_redis_is_down_is_503(worker: Worker, private_redis: RedisProcess) -> None:
    status, _, _ = await call(worker.proxy_port, "GET", "/_gateway/usage", bearer())
    assert status == 200
    private_redis.stop()
    status, headers, body = await call(worker.proxy_port, "GET", "/_gateway/usage", bearer())
    assert_problem(status, headers, body, 503, "limiter-unavailable")
    assert headers["Retry-After"]


async def test_usage_while_the_sql_store_fails_is_503(worker: Worker, sqlite_url: str) -> None:
    with sqlite3.connect(sqlite_url.split(":///", 1)[1]) as connection:
        connection.execute("DROP TABLE alert_events")
    status, headers, body = await call(worker.proxy_port, "GET", "/_gateway/usage", bearer())
    assert_problem(status, headers, body, 503, "database-unavailable")


# ------------------------------------------------------------------ the admin listener


async def test_admin_listener_fault_is_a_problem_500(worker: Worker, monkeypatch: pytest.MonkeyPatch,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(worker.quota_metrics, "publish", broken)
    with caplog.at_level(logging.ERROR):
        status, headers, body = await call(worker.admin_port, "GET", "/metrics")
    assert_problem(status, headers, body, 500, "internal")
    assert any(r.exc_info and r.exc_info[0] is RuntimeError for r in caplog.records)


async def test_admin_listener_unknown_path_is_a_problem_404(worker: Worker) -> None:
    status, headers, body = await call(worker.admin_port, "GET", "/nothing-here")
    assert_problem(status, headers, body, 404, "not-found")
    status, headers, body = await call(worker.admin_port, "POST", "/healthz")
    assert_problem(status, headers, body, 405, "method-not-allowed")
