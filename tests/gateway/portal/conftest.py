"""Fixtures of the usage page tests: in-process gateway workers (real Redis, SQLite, upstream) in live Stripe mode
against the Stripe emulator, a clock the tests move, and a client that keeps cookies like a browser."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from gateway.app import Worker
from gateway.cli.devservices import RedisProcess
from tests.billing_sync.stripe_emulator import StripeEmulator
from tests.support import Upstream, settings_for

OPS_TOKEN = "ops-portal-token-0123456789"
CUSTOMER = "cus_portal_acme"
RETURN_URL = "https://app.cosmosbuilder.example/billing"
StartWorker = Callable[..., Awaitable[Worker]]


class MovableClock:
    """time.time(), moved on by `advance` (a link's expiry without waiting 10 minutes)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


@pytest.fixture
def clock() -> MovableClock:
    return MovableClock()


@pytest.fixture
async def stripe_emulator() -> AsyncIterator[StripeEmulator]:
    async with StripeEmulator() as emulator:
        emulator.add_customer(CUSTOMER)
        yield emulator


def portal_config(stripe_api_base: str | None, **stripe: Any) -> dict[str, Any]:
    """The `billing` section: live against the emulator (None: dry run), with the portal's return URL."""
    if stripe_api_base is None:
        return {"stripe": {"mode": "dry_run", "portal_return_url": RETURN_URL, **stripe}}
    return {"stripe_api_key": "sk_test_portal", "stripe": {"mode": "live", "api_base": stripe_api_base,
                                                           "portal_return_url": RETURN_URL, **stripe}}


@pytest.fixture
async def start_worker(upstream: Upstream, redis_server: RedisProcess, sqlite_url: str, clock: MovableClock,
                       stripe_emulator: StripeEmulator) -> AsyncIterator[StartWorker]:
    """`await start_worker(**config_overrides)`: a started in-process worker, live against the emulator unless
    `billing=` says otherwise; every worker of a test shares the SQLite file, Redis and the clock."""
    started: list[Worker] = []

    async def start(**overrides: Any) -> Worker:
        config: dict[str, Any] = {"admin": {"tokens": f"ops:{OPS_TOKEN}"},
                                  "billing": portal_config(stripe_emulator.url)}
        config.update(overrides)
        redis_url = config.pop("redis_url", redis_server.url)
        worker = Worker(settings_for(upstream.url, redis_url, sqlite_url, **config), clock=clock)
        await worker.start()
        started.append(worker)
        return worker

    yield start
    for worker in started:
        await worker.stop()


async def set_customer(worker: Worker, tenant: str, customer: str | None) -> None:
    """The operator binds the tenant to a Stripe customer through the admin API."""
    async with aiohttp.ClientSession() as http, http.put(
            f"http://127.0.0.1:{worker.admin_port}/admin/tenants/{tenant}", json={"stripe_customer_id": customer},
            headers={"Authorization": f"Bearer {OPS_TOKEN}"}) as response:
        assert response.status in (200, 201), await response.text()
