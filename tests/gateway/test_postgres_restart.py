"""A PostgreSQL restart under traffic (PRODUCT.md §4, §9): the gateway answers 503 problem+json while the
database is down, never a 500, and recovers by itself; what was answered 2xx is stored, what was answered
503 is applied when retried (as Stripe and an operator's client do), nothing is lost.

The server is the test's own (`postgres_server`: initdb and pg_ctl in a tmp dir, a free port of 127.0.0.1),
stopped with a fast shutdown, as a restart or failover ends the gateway's sessions.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import stripe
from sqlalchemy import select

from gateway.app import Worker
from gateway.cli.devservices import RedisProcess
from metering.db import create_engine, session_factory
from metering.migrate import upgrade_async
from metering.models import Tenant
from tests.metering.conftest import PostgresServer, postgres_server  # noqa: F401  (fixture)
from tests.support import Upstream, settings_for

WEBHOOK_SECRET = "whsec_restart_0123456789abcdef"
OPS_TOKEN = "ops-restart-token-0123456789"
PROBLEM = "application/problem+json"


@pytest.fixture
async def worker(postgres_server: PostgresServer, upstream: Upstream,  # noqa: F811
                 redis_server: RedisProcess) -> AsyncIterator[Worker]:
    engine = create_engine(postgres_server.url)
    await upgrade_async(engine)  # `cosmos-gateway db upgrade`, the deploy step for PostgreSQL
    await engine.dispose()
    settings = settings_for(upstream.url, redis_server.url, postgres_server.url,
                            admin={"tokens": f"ops:{OPS_TOKEN}"},
                            billing={"stripe_webhook_secret": WEBHOOK_SECRET})
    worker = Worker(settings)
    await worker.start()
    yield worker
    await worker.stop()


def subscription_event(n: int) -> str:
    return json.dumps({
        "id": f"evt_restart_{n}", "object": "event", "type": "customer.subscription.created", "created": 1_700_000_000,
        "data": {"object": {"id": f"sub_{n}", "object": "subscription", "status": "active",
                            "customer": f"cus_{n}", "metadata": {"tenant_id": f"hook-{n}"},
                            "items": {"data": [{"price": {"lookup_key": "professional_monthly"}}]}}}})


async def post_webhook(http: aiohttp.ClientSession, worker: Worker, n: int) -> tuple[int, str, Any]:
    body = subscription_event(n)
    signature = stripe.WebhookSignature.generate_signature_header(body, WEBHOOK_SECRET)
    async with http.post(f"http://127.0.0.1:{worker.proxy_port}/_gateway/webhooks/stripe", data=body,
                         headers={"Stripe-Signature": signature, "Content-Type": "application/json"}) as response:
        return response.status, response.content_type, await response.json(content_type=None)


async def put_tenant(http: aiohttp.ClientSession, worker: Worker, n: int) -> tuple[int, str, Any]:
    async with http.put(f"http://127.0.0.1:{worker.admin_port}/admin/tenants/ops-{n}", json={"plan": "enterprise"},
                        headers={"Authorization": f"Bearer {OPS_TOKEN}"}) as response:
        return response.status, response.content_type, await response.json(content_type=None)


async def get_tenant(http: aiohttp.ClientSession, worker: Worker, name: str) -> tuple[int, str, Any]:
    async with http.get(f"http://127.0.0.1:{worker.admin_port}/admin/tenants/{name}",
                        headers={"Authorization": f"Bearer {OPS_TOKEN}"}) as response:
        return response.status, response.content_type, await response.json(content_type=None)


async def terminate_other_sessions(server: PostgresServer) -> None:
    import asyncpg

    connection = await asyncpg.connect(server.url.replace("+asyncpg", ""))
    try:
        await connection.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                 "WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'")
    finally:
        await connection.close()


def assert_unavailable(result: tuple[int, str, Any]) -> None:
    status, content_type, body = result
    assert (status, content_type) == (503, PROBLEM), result
    assert body["status"] == 503 and body["type"].endswith("/database-unavailable")


async def test_postgres_restart_mid_traffic_is_503_then_recovers_and_loses_nothing(
        worker: Worker, postgres_server: PostgresServer) -> None:  # noqa: F811
    answered: dict[str, int] = {}
    async with aiohttp.ClientSession() as http:
        for n in range(3):  # before: the pool holds live connections to the server
            assert (await post_webhook(http, worker, n))[0] == 200
            assert (await put_tenant(http, worker, n))[0] in (200, 201)
        assert (await get_tenant(http, worker, "ops-0"))[0] == 200

        # A failover or an operator ends the gateway's sessions while the server stays up: the pooled
        # connections die with 57P01 (asyncpg's AdminShutdownError, a DBAPIError to SQLAlchemy).
        await terminate_other_sessions(postgres_server)
        for n in range(100, 103):
            status, content_type, _ = await post_webhook(http, worker, n)
            assert (status, content_type) in ((200, "application/json"), (503, PROBLEM))
            answered[f"hook-{n}"] = status
            status, content_type, _ = await put_tenant(http, worker, n)
            assert (status, content_type) in ((200, "application/json"), (201, "application/json"), (503, PROBLEM))
            answered[f"ops-{n}"] = status
            if answered[f"hook-{n}"] == 503:  # Stripe retries
                answered[f"hook-{n}"] = (await post_webhook(http, worker, n))[0]
            if answered[f"ops-{n}"] == 503:
                answered[f"ops-{n}"] = (await put_tenant(http, worker, n))[0]

        postgres_server.stop()  # a restart: every session of the gateway is ended by the server
        for n in range(3, 6):
            assert_unavailable(await post_webhook(http, worker, n))
            assert_unavailable(await put_tenant(http, worker, n))
        status, content_type, _ = await get_tenant(http, worker, "never-seen")
        assert (status, content_type) in ((503, PROBLEM), (404, PROBLEM))

        postgres_server.start()
        for n in range(3, 6):  # the retries of what got 503, on connections the pool makes anew
            answered[f"hook-{n}"] = (await post_webhook(http, worker, n))[0]
            answered[f"ops-{n}"] = (await put_tenant(http, worker, n))[0]
        for n in range(6, 9):
            answered[f"hook-{n}"] = (await post_webhook(http, worker, n))[0]
    assert set(answered.values()) <= {200, 201}, answered
    engine = create_engine(postgres_server.url)
    try:
        async with session_factory(engine)() as session:
            rows = {t.id: t for t in (await session.scalars(select(Tenant))).all()}
    finally:
        await engine.dispose()
    assert sorted(rows) == sorted([f"hook-{n}" for n in [*range(9), *range(100, 103)]]
                                  + [f"ops-{n}" for n in [*range(6), *range(100, 103)]])
    assert all(rows[f"ops-{n}"].plan == "enterprise" for n in range(6))
    assert all((rows[f"hook-{n}"].plan, rows[f"hook-{n}"].stripe_customer_id) == ("professional", f"cus_{n}")
               for n in range(9))


async def test_a_session_ended_by_the_server_is_a_store_outage_not_a_bug(postgres_server: PostgresServer) -> None:  # noqa: F811
    """What a restart does to a query in flight: PostgreSQL ends the session (57P01); SQLAlchemy hands it on
    as a plain DBAPIError wrapping asyncpg's AdminShutdownError, which must map to 503, not 500."""
    from sqlalchemy import text
    from sqlalchemy.exc import DBAPIError

    from metering.sql_errors import store_unavailable

    engine = create_engine(postgres_server.url)
    try:
        async with engine.connect() as connection:
            with pytest.raises(DBAPIError) as caught:
                await connection.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))
    except DBAPIError:
        pass
    finally:
        await engine.dispose()
    assert store_unavailable(caught.value), repr(caught.value)
