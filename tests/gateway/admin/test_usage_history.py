"""`GET /admin/tenants/{tenant}/usage` through the real admin API: a real aiohttp server, SQLite and PostgreSQL,
a real redis-server, the real sync worker's moves; JSON, CSV (read back with the csv module), every 400, auth."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from billing_sync.ledger import move_closed_buckets
from gateway.admin.api import add_admin_api
from gateway.admin.health import admin_app
from gateway.admin.openapi import admin_openapi
from gateway.admin.usage_history import wants_csv
from gateway.auth.tokens import Authenticator
from gateway.cli.devservices import RedisProcess
from metering import keys
from metering.db import create_engine, session_factory
from metering.migrate import upgrade_async
from metering.models import Tenant
from metering.redis_store import RedisUsageStore
from metering.usage_history import UsageHistory
from quota.tenants import TenantDirectory
from tests.metering.conftest import db_url, postgres_database  # noqa: F401  (fixtures: SQLite and PostgreSQL)
from tests.support import settings_for, token

OPS_TOKEN = "ops-secret-token-0123456789"
PROBLEM = "application/problem+json"
NOW = datetime(2026, 3, 15, 10, 0, 5, tzinfo=UTC)  # the 09:55 bucket is in its grace


def at(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp())


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now.timestamp()

    def __call__(self) -> float:
        return self.now


@dataclass
class Admin:
    client: TestClient
    redis: Redis
    sessions: async_sessionmaker[AsyncSession]
    clock: Clock

    async def get(self, path: str, *, auth: str | None = OPS_TOKEN, accept: str | None = None,
                  params: Any = None) -> tuple[int, str, Any]:
        headers = {} if auth is None else {"Authorization": f"Bearer {auth}"}
        if accept is not None:
            headers["Accept"] = accept
        response = await self.client.get(path, headers=headers, params=params)
        return response.status, response.headers.get("Content-Type", ""), await response.text()

    async def move(self) -> None:
        await move_closed_buckets(self.redis, self.sessions, {m.name: m for m in METERS}, now=self.clock(),
                                  bucket_seconds=300, grace_seconds=10)


SETTINGS = settings_for("http://127.0.0.1:9", "redis://127.0.0.1:1/0", "sqlite+aiosqlite:///unused.db",
                        admin={"tokens": f"ops:{OPS_TOKEN}"})
METERS = SETTINGS.policy.meters


@pytest.fixture
async def admin(db_url: str, redis_server: RedisProcess, aiohttp_client: Any) -> AsyncIterator[Admin]:  # noqa: F811
    engine = create_engine(db_url)
    await upgrade_async(engine)
    sessions = session_factory(engine)
    async with sessions() as session, session.begin():
        session.add(Tenant(id="acme", plan="starter", billing_anchor_day=15))
    directory = TenantDirectory(sessions, None)
    await directory.reload_changed()
    redis = Redis.from_url(redis_server.url)
    store = RedisUsageStore(redis)
    clock = Clock(NOW)
    history = UsageHistory(sessions, redis, METERS, bucket_seconds=300, clock=clock)
    app = admin_app(redis_check=_ok, database_check=_ok, fail_closed=False)
    authenticator = Authenticator(SETTINGS.auth)
    add_admin_api(app, settings=SETTINGS, sessions=sessions, directory=directory, authenticator=authenticator,
                  usage_reader=store, plans=SETTINGS.policy.plans, meters=METERS, clock=clock, history=history)
    client = await aiohttp_client(app)
    yield Admin(client, redis, sessions, clock)
    await directory.close()
    await store.aclose()
    await redis.aclose()
    await engine.dispose()


async def _ok() -> None:
    return None


async def traffic(admin: Admin) -> None:
    """The day before the anchor day (15th) and the morning after it; the 09:55 bucket is still in its grace."""
    for when, fields in [("2026-03-14T23:55:00", {"api_calls": 4, "storage_gb": "11"}),
                         ("2026-03-15T00:00:00", {"api_calls": 6}),
                         ("2026-03-15T09:05:00", {"api_calls": 7, "storage_gb": "12.5"}),
                         ("2026-03-15T09:55:00", {"api_calls": -2}),  # a refund
                         ("2026-03-15T10:00:00", {"api_calls": 1})]:
        await admin.redis.hset(keys.bucket_key("acme", at(when)), mapping=fields)
    await admin.move()


async def test_json_series_from_the_ledger_and_the_open_buckets(admin: Admin) -> None:
    await traffic(admin)
    status, content_type, text = await admin.get(
        "/admin/tenants/acme/usage?step=hour&from=2026-03-14T23:00:00Z&to=2026-03-15T11:00:00Z"
        "&meter=api_calls,storage_gb")
    assert status == 200, text
    assert content_type == "application/json"
    body = json.loads(text)
    assert body["tenant"] == "acme" and body["step"] == "hour"
    assert (body["from"], body["to"]) == ("2026-03-14T23:00:00Z", "2026-03-15T11:00:00Z")
    calls = {p["start"]: p["value"] for p in body["series"]["api_calls"]}
    assert len(calls) == 12
    assert calls["2026-03-14T23:00:00Z"] == 4
    assert calls["2026-03-15T00:00:00Z"] == 6
    assert calls["2026-03-15T09:00:00Z"] == 5  # 7, and the refund of 2 still in Redis
    assert calls["2026-03-15T10:00:00Z"] == 1  # the open bucket
    assert calls["2026-03-15T05:00:00Z"] == 0
    storage = {p["start"]: p["value"] for p in body["series"]["storage_gb"]}
    assert storage["2026-03-15T09:00:00Z"] == 12.5 and storage["2026-03-15T05:00:00Z"] is None
    assert '"value":12.5}' in text  # written exactly, not through a float's repr


async def test_the_default_is_the_current_billing_period_by_day(admin: Admin) -> None:
    await traffic(admin)
    status, _, text = await admin.get("/admin/tenants/acme/usage")
    assert status == 200, text
    body = json.loads(text)
    # Anchor day 15: the period started today at 00:00; the 14th belongs to the previous one.
    assert (body["from"], body["to"]) == ("2026-03-15T00:00:00Z", "2026-03-16T00:00:00Z")
    assert body["series"]["api_calls"] == [{"start": "2026-03-15T00:00:00Z", "value": 12}]
    assert sorted(body["series"]) == ["api_calls", "bandwidth_bytes", "chain_deployments", "storage_gb"]
    status, _, text = await admin.get("/admin/tenants/acme/usage?from=2026-03-14&meter=api_calls")
    assert [p["value"] for p in json.loads(text)["series"]["api_calls"]] == [4, 12]


async def test_csv_for_finance(admin: Admin) -> None:
    await traffic(admin)
    status, content_type, text = await admin.get(
        "/admin/tenants/acme/usage?from=2026-03-14T00:00:00%2B01:00&to=2026-03-16T00:00:00Z&step=day"
        "&meter=storage_gb&meter=api_calls", accept="text/csv")
    assert status == 200, text
    assert content_type == "text/csv; charset=utf-8"
    rows = list(csv.reader(io.StringIO(text, newline="")))
    assert rows[0] == ["start", "meter", "value"]
    # from 2026-03-13T23:00Z rounded down to its day: three days, by start then meter.
    assert rows[1:] == [["2026-03-13T00:00:00Z", "api_calls", "0"], ["2026-03-13T00:00:00Z", "storage_gb", ""],
                        ["2026-03-14T00:00:00Z", "api_calls", "4"], ["2026-03-14T00:00:00Z", "storage_gb", "11"],
                        ["2026-03-15T00:00:00Z", "api_calls", "12"], ["2026-03-15T00:00:00Z", "storage_gb", "12.5"]]
    assert text.endswith("\r\n")


async def test_a_plus_sign_left_unencoded_is_read_as_plus(admin: Admin) -> None:
    # aiohttp's client would encode it; the raw query is what a curl user sends.
    status, _, text = await admin.get("/admin/tenants/acme/usage?from=2026-03-15T01:00:00+01:00&step=hour")
    assert status == 200, text
    assert json.loads(text)["from"] == "2026-03-15T00:00:00Z"


@pytest.mark.parametrize(("accept", "csv_wanted"), [
    ("", False), ("*/*", False), ("application/json", False), ("text/csv", True), ("text/csv; charset=utf-8", True),
    ("application/json, text/csv;q=0.5", False), ("application/json;q=0.4, text/csv", True),
    ("text/*, text/csv;q=0", False), ("text/html", False), ("TEXT/CSV", True), ("text/csv;q=abc", False),
])
def test_accept_is_weighed(accept: str, csv_wanted: bool) -> None:
    assert wants_csv(accept) is csv_wanted


@pytest.mark.parametrize(("query", "fields"), [
    ("step=week", ["step"]),
    ("step=hour&step=day", ["step"]),
    ("meter=bogus", ["meter"]),
    ("meter=chains", ["meter"]),  # configured but not billed: the ledger has no history of it
    ("meter=api_calls,%00x", ["meter"]),
    ("from=yesterday", ["from"]),
    ("to=2026-13-01T00:00:00Z", ["to"]),
    ("from=2026-03-15T00:00:00", ["from"]),  # no offset
    ("from=2026-03-15T10:00:00Z&to=2026-03-15T10:00:00Z", ["from", "to"]),
    ("from=2026-03-16T00:00:00Z&to=2026-03-15T00:00:00Z", ["from", "to"]),
    ("step=hour&from=2026-03-01T00:00:00Z&to=2026-03-18T00:00:00Z", ["from", "to"]),  # 408 hours
    ("from=2025-01-01", ["from"]),  # 439 days up to today
    ("from=1969-12-31T00:00:00Z", ["from"]),
    ("to=99999-01-01T00:00:00Z", ["to"]),
    ("from=" + "9" * 5000, ["from"]),
    ("step=week&meter=bogus&from=x", ["step", "meter", "from"]),
])
async def test_bad_queries_are_400_naming_the_field(admin: Admin, query: str, fields: list[str]) -> None:
    status, content_type, text = await admin.get(f"/admin/tenants/acme/usage?{query}")
    assert status == 400, text
    assert content_type == PROBLEM
    body = json.loads(text)
    assert body["type"].endswith("/invalid-request")
    assert [error["field"] for error in body["errors"]] == fields


async def test_unknown_tenants_are_404_and_bad_ids_400(admin: Admin) -> None:
    status, content_type, text = await admin.get("/admin/tenants/nobody/usage")
    assert (status, content_type) == (404, PROBLEM), text
    status, _, text = await admin.get("/admin/tenants/" + "x" * 65 + "/usage")
    assert status == 400 and json.loads(text)["errors"][0]["field"] == "tenant"
    # Known by traffic only (no record): its history is served.
    await admin.redis.zadd(keys.TENANTS_LAST_SEEN_KEY, {"walkin": admin.clock()})
    assert (await admin.get("/admin/tenants/walkin/usage"))[0] == 200
    # Known by its ledger rows only (its record deleted, idle beyond the tenant index): served too.
    await admin.redis.hset(keys.bucket_key("gone", at("2026-03-15T09:00:00")), mapping={"api_calls": 1})
    await admin.move()
    assert (await admin.get("/admin/tenants/gone/usage"))[0] == 200


async def test_credentials_are_required(admin: Admin) -> None:
    status, content_type, _ = await admin.get("/admin/tenants/acme/usage", auth=None)
    assert (status, content_type) == (401, PROBLEM)
    status, _, _ = await admin.get("/admin/tenants/acme/usage", auth="wrong-token-0123456789")
    assert status == 401
    tenant_jwt = token("acme")  # a valid JWT without the admin scope
    status, content_type, _ = await admin.get("/admin/tenants/acme/usage", auth=tenant_jwt)
    assert (status, content_type) == (403, PROBLEM)


async def test_redis_down_is_503(admin: Admin, redis_server: RedisProcess) -> None:
    redis_server.stop()
    try:
        status, content_type, text = await admin.get("/admin/tenants/acme/usage")
    finally:
        redis_server.start()
    assert (status, content_type) == (503, PROBLEM), text
    assert json.loads(text)["type"].endswith("/limiter-unavailable")


def test_both_endpoints_are_in_the_openapi_document() -> None:
    doc = admin_openapi("https://x/", history=True)
    assert doc["paths"]["/admin/tenants/{tenant}/usage"]["get"]["operationId"] == "getTenantUsageHistory"
    own = doc["paths"]["/_gateway/usage/history"]
    assert own["get"]["security"] == [{"tenant_jwt": []}]
    assert "text/csv" in own["get"]["responses"]["200"]["content"]
    assert "/admin/tenants/{tenant}/usage" not in admin_openapi("https://x/")["paths"]
