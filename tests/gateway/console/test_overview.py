"""The period chart's lines (gateway/console/overview.py): from the usage history for billed meters (a real
UsageHistory on SQLite and the test's redis-server), the usage view's straight line otherwise."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
import redis.asyncio as aioredis

from gateway.cli.devservices import RedisProcess, free_port
from gateway.console.overview import period_series, period_usage
from metering.db import create_engine, session_factory
from metering.meters import DEFAULT_METERS
from metering.migrate import upgrade_async
from metering.models import LedgerEntry
from metering.usage_history import UsageHistory

START = datetime(2026, 12, 1, tzinfo=UTC)
GAUGES = {"storage_gb"}


@pytest.fixture
async def history_parts(sqlite_url: str, redis_server: RedisProcess) -> AsyncIterator[tuple[object, object]]:
    engine = create_engine(sqlite_url)
    await upgrade_async(engine)
    sessions = session_factory(engine)
    async with sessions() as session, session.begin():
        for hours, meter, value in ((5, "chain_deployments", 3), (5, "chain_deployments", 2),
                                    (30, "chain_deployments", 4), (30, "storage_gb", 7.5), (50, "storage_gb", 9)):
            at = START + timedelta(hours=hours, minutes=5 * len(session.new))
            session.add(LedgerEntry(tenant_id="acme", meter=meter, bucket_start=at, value=Decimal(str(value)),
                                    kind="gauge" if meter in GAUGES else "counter", state="sent",
                                    identifier=f"t-{meter}-{int(at.timestamp())}", attempts=1))
    redis = aioredis.Redis.from_url(redis_server.url)
    yield sessions, redis
    await redis.aclose()
    await engine.dispose()


def history(parts: tuple[object, object], now: datetime, redis: object | None = None) -> UsageHistory:
    sessions, live = parts
    return UsageHistory(sessions, redis or live, DEFAULT_METERS, bucket_seconds=300,  # type: ignore[arg-type]
                        clock=lambda: now.timestamp())


async def test_a_billed_counter_is_its_running_total_by_hour(history_parts: tuple[object, object]) -> None:
    now = START + timedelta(days=3, minutes=30)
    points = await period_usage("acme", "chain_deployments", start=START, now=now, used=9,
                                history=history(history_parts, now))
    assert points[0] == (START.timestamp(), 0.0)
    assert len(points) == 1 + 73  # every hour of the period so far, the last one ending now
    assert points[-1] == (now.timestamp(), 9.0)
    by_time = dict(points)
    assert by_time[(START + timedelta(hours=5)).timestamp()] == 0.0
    assert by_time[(START + timedelta(hours=6)).timestamp()] == 5.0  # both buckets of the 05:00 hour
    assert by_time[(START + timedelta(hours=31)).timestamp()] == 9.0


async def test_a_billed_gauge_is_its_reported_values_and_a_long_period_goes_by_day(
        history_parts: tuple[object, object]) -> None:
    now = START + timedelta(days=20)  # 480 hours: more steps than a history read gives, so days
    found = await period_series(history(history_parts, now), "acme", ["storage_gb", "chain_deployments", "chains"],
                                start=START, now=now, gauges=GAUGES)
    assert set(found) == {"storage_gb", "chain_deployments"}  # `chains` is not billed: no history
    day = 86_400
    assert found["storage_gb"] == [(START.timestamp() + 2 * day, 7.5), (START.timestamp() + 3 * day, 9.0)]  # step ends
    assert len(found["chain_deployments"]) == 1 + 21 and found["chain_deployments"][-1] == (now.timestamp(), 9.0)


async def test_the_straight_line_where_there_is_no_history(history_parts: tuple[object, object]) -> None:
    now = START + timedelta(days=2)
    line = [(START.timestamp(), 0.0), (now.timestamp(), 4.0)]
    assert await period_usage("acme", "chain_deployments", start=START, now=now, used=4) == line  # no history
    assert await period_usage("acme", "chains", start=START, now=now, used=1, gauge=True,
                              history=history(history_parts, now)) == [(now.timestamp(), 1.0)]  # not billed
    down = aioredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0")
    try:  # the open buckets cannot be read: the chart falls back instead of failing the page
        assert await period_usage("acme", "chain_deployments", start=START, now=now, used=4,
                                  history=history(history_parts, now, down)) == line
    finally:
        await down.aclose()
