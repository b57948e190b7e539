"""Fixtures of the console tests: a gateway worker with admin tokens, a client that keeps cookies, a parked row."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import aiohttp
import pytest

from gateway.app import Worker
from gateway.cli.devservices import RedisProcess
from metering.models import LedgerEntry
from tests.support import Upstream, settings_for

OPS_TOKEN = "ops-console-token-0123456789"
CI_TOKEN = "ci-console-token-9876543210ab"
ADMIN_TOKENS = f"ops:{OPS_TOKEN},ci:{CI_TOKEN}"
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def csrf_of(html: str) -> str:
    match = _CSRF.search(html)
    assert match is not None, "the page has no form with a CSRF token"
    return match.group(1)


class ConsoleClient:
    """A browser-like HTTP client of one worker's console: it keeps cookies and asks for HTML."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.base = f"http://127.0.0.1:{worker.admin_port}"
        self.http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True),
                                          headers={"Accept": "text/html"})

    async def get(self, path: str, **kwargs: Any) -> tuple[int, str, aiohttp.ClientResponse]:
        async with self.http.get(self.base + path, allow_redirects=False, **kwargs) as response:
            return response.status, await response.text(), response

    async def post(self, path: str, data: dict[str, str], **kwargs: Any) -> tuple[int, str, aiohttp.ClientResponse]:
        async with self.http.post(self.base + path, data=data, allow_redirects=False, **kwargs) as response:
            return response.status, await response.text(), response

    async def sign_in(self, token: str = OPS_TOKEN) -> str:
        """Signs in; returns the CSRF token of the session (read from the sign-out form of the audit page, which
        unlike the overview caches nothing)."""
        _, page, _ = await self.get("/admin/ui/sign-in")
        status, _, _ = await self.post("/admin/ui/sign-in", {"csrf": csrf_of(page), "token": token,
                                                             "next": "/admin/ui/"})
        assert status == 303
        status, page, _ = await self.get("/admin/ui/audit")
        assert status == 200, page
        return csrf_of(page)

    async def close(self) -> None:
        await self.http.close()


@pytest.fixture
async def console_worker(upstream: Upstream, redis_server: RedisProcess, sqlite_url: str) -> AsyncIterator[Worker]:
    worker = Worker(settings_for(upstream.url, redis_server.url, sqlite_url, admin={"tokens": ADMIN_TOKENS}))
    await worker.start()
    yield worker
    await worker.stop()


@pytest.fixture
async def console(console_worker: Worker) -> AsyncIterator[ConsoleClient]:
    client = ConsoleClient(console_worker)
    yield client
    await client.close()


async def park_row(worker: Worker, tenant: str = "acme", meter: str = "api_calls",
                   start: datetime = datetime(2026, 1, 5, 10, 0, tzinfo=UTC)) -> str:
    """A ledger row parked by the sync worker for want of a Stripe customer; returns its identifier."""
    identifier = f"test-{tenant}-{meter}-{int(start.timestamp())}"
    async with worker.sessions() as session, session.begin():
        session.add(LedgerEntry(tenant_id=tenant, meter=meter, bucket_start=start, value=Decimal(7),
                                kind="counter", state="parked", identifier=identifier, attempts=1,
                                last_error="no_customer: tenant has no Stripe customer"))
    return identifier
