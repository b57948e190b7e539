"""Moving closed buckets into the ledger: late writes, late refunds, an interrupted move."""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import pytest
from redis.asyncio import Redis
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from billing_sync.ledger import STAGING_SUFFIX, move_closed_buckets
from gateway.devservices import RedisProcess
from metering import db, keys
from metering.meters import DEFAULT_METERS
from metering.migrate import upgrade_async
from metering.models import LedgerEntry

METERS = {m.name: m for m in DEFAULT_METERS}
BUCKET = 1_796_000_100 // 300 * 300
NOW = BUCKET + 300 + 20  # the bucket is closed (300 s + 10 s grace)


@pytest.fixture
async def stores(redis_server: RedisProcess,
                 tmp_path: Path) -> AsyncIterator[tuple[Redis, async_sessionmaker[AsyncSession]]]:
    engine = db.create_engine(f"sqlite+aiosqlite:///{tmp_path}/ledger.db")
    await upgrade_async(engine)
    client = Redis.from_url(redis_server.url)
    yield client, db.session_factory(engine)
    await client.aclose()
    await engine.dispose()


async def move(client: Redis, sessions: async_sessionmaker[AsyncSession], now: float = NOW) -> int:
    return await move_closed_buckets(client, sessions, METERS, now=now, bucket_seconds=300, grace_seconds=10)


async def ledger(sessions: async_sessionmaker[AsyncSession]) -> dict[tuple[str, str, int], Decimal]:
    async with sessions() as session:
        rows = (await session.scalars(select(LedgerEntry))).all()
    return {(r.tenant_id, r.meter, int(r.bucket_start.timestamp())): r.value for r in rows}


async def test_a_write_after_the_move_is_billed_by_the_next_pass(stores) -> None:
    client, sessions = stores
    key = keys.bucket_key("acme", BUCKET)
    await client.hset(key, mapping={"api_calls": 5})
    assert await move(client, sessions) == 1
    await client.hincrby(key, "api_calls", 2)  # written after the bucket was billed (clock skew, a late replay)
    assert await move(client, sessions) == 1
    assert (await ledger(sessions))[("acme", "api_calls", BUCKET)] == 5  # a billed row never changes...
    carried = await client.hgetall(keys.bucket_key("acme", BUCKET + 300))
    assert carried == {b"api_calls": b"2"}  # ...the late units are billed with the next bucket
    await move(client, sessions, now=BUCKET + 600 + 20)
    assert (await ledger(sessions))[("acme", "api_calls", BUCKET + 300)] == 2


async def test_a_late_refund_is_carried_into_the_next_bucket(stores) -> None:
    client, sessions = stores
    await client.hset(keys.bucket_key("acme", BUCKET), mapping={"api_calls": 3, "chain_deployments": 1})
    # The refund of a request admitted in BUCKET arrived after it closed: it landed in the next bucket.
    await client.hset(keys.bucket_key("acme", BUCKET + 300), mapping={"api_calls": -1, "chain_deployments": -1})
    await move(client, sessions, now=BUCKET + 600 + 20)
    rows = await ledger(sessions)
    assert rows[("acme", "api_calls", BUCKET)] == 3
    # The debit is not sent (Stripe takes no negative events): it waits in the bucket after.
    assert ("acme", "api_calls", BUCKET + 300) not in rows
    carried = await client.hgetall(keys.bucket_key("acme", BUCKET + 600))
    assert {k.decode(): int(v) for k, v in carried.items()} == {"api_calls": -1, "chain_deployments": -1}
    await client.hincrby(keys.bucket_key("acme", BUCKET + 600), "api_calls", 4)
    await move(client, sessions, now=BUCKET + 900 + 20)
    assert (await ledger(sessions))[("acme", "api_calls", BUCKET + 600)] == 3  # 4 new units, 1 given back


async def test_an_interrupted_move_is_finished_and_never_doubled(stores) -> None:
    client, sessions = stores
    key = keys.bucket_key("acme", BUCKET)
    await client.hset(key, mapping={"api_calls": 7})
    await client.rename(key, key + STAGING_SUFFIX)  # a pass stopped right after staging the bucket
    await client.hset(key, mapping={"api_calls": 1})  # and a late write recreated the live key
    await move(client, sessions)
    assert (await ledger(sessions))[("acme", "api_calls", BUCKET)] == 7
    assert await client.exists(key, key + STAGING_SUFFIX) == 0
