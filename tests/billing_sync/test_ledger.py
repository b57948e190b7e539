"""Moving closed buckets into the ledger: late writes, late refunds, interrupted and stalled moves."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import RedisCluster
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from billing_sync import ledger as ledger_module
from billing_sync import staged as staged_module
from billing_sync.ledger import LOCK_SUFFIX, STAGING_SUFFIX, move_closed_buckets
from billing_sync.state import sync_state
from gateway.cli.devservices import RedisProcess
from metering import db, keys
from metering.meters import DEFAULT_METERS
from metering.migrate import upgrade_async
from metering.models import LedgerEntry, Tenant
from tests.metering.conftest import db_url, postgres_database  # noqa: F401  (fixtures: SQLite and PostgreSQL)
from tests.metering.redis_cluster import RedisClusterProcess

METERS = {m.name: m for m in DEFAULT_METERS}
BUCKET = 1_796_000_100 // 300 * 300
NOW = BUCKET + 300 + 20  # the bucket is closed (300 s + 10 s grace)


class PipelinedRedis(Redis):
    """A plain client but for its type: the mover sends its batches to it as redis-py pipelines, as it does to a
    Redis Cluster or over TLS, instead of on its lean hiredis connection (billing_sync.redis_batches)."""


@pytest.fixture(params=["lean", "pipelined"])
async def stores(request: pytest.FixtureRequest, redis_server: RedisProcess,
                 db_url: str) -> AsyncIterator[tuple[Redis, async_sessionmaker[AsyncSession]]]:  # noqa: F811
    engine = db.create_engine(db_url)
    await upgrade_async(engine)
    client = (Redis if request.param == "lean" else PipelinedRedis).from_url(redis_server.url)
    yield client, db.session_factory(engine)
    await client.aclose()
    await engine.dispose()


async def move(client: Redis, sessions: async_sessionmaker[AsyncSession], now: float = NOW) -> int:
    return (await move_closed_buckets(client, sessions, METERS, now=now, bucket_seconds=300, grace_seconds=10)).moved


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
    # The late unit is billed with the next bucket, not dropped and not added to the billed one.
    assert await client.hgetall(keys.bucket_key("acme", BUCKET + 300)) == {b"api_calls": b"1"}


async def test_late_units_survive_a_crash_after_the_commit(stores) -> None:
    client, sessions = stores
    key = keys.bucket_key("acme", BUCKET)
    await client.hset(key, mapping={"api_calls": 7})
    await move(client, sessions)
    await client.hset(key, mapping={"api_calls": 2})  # late units: their bucket is billed already
    crashing = CrashBeforeCarry.from_url(_url(client))
    with pytest.raises(ConnectionError):  # the pass committed, then died before carrying and deleting
        await move(crashing, sessions)
    await crashing.aclose()
    assert await client.exists(key + STAGING_SUFFIX) == 1
    await move(client, sessions)  # the next pass finishes the staged bucket
    assert (await ledger(sessions))[("acme", "api_calls", BUCKET)] == 7
    assert await client.hgetall(keys.bucket_key("acme", BUCKET + 300)) == {b"api_calls": b"2"}
    assert await client.exists(key, key + STAGING_SUFFIX) == 0


async def test_a_staged_late_write_found_after_a_crash_is_carried(stores) -> None:
    client, sessions = stores
    key = keys.bucket_key("acme", BUCKET)
    await client.hset(key, mapping={"api_calls": 7})
    await move(client, sessions)
    await client.hset(key, mapping={"api_calls": 3})
    await client.rename(key, key + STAGING_SUFFIX)  # a pass staged the late write, then died
    await move(client, sessions)
    assert (await ledger(sessions))[("acme", "api_calls", BUCKET)] == 7
    assert await client.hgetall(keys.bucket_key("acme", BUCKET + 300)) == {b"api_calls": b"3"}


async def test_an_unreadable_plan_is_replaced_before_the_commit(stores) -> None:
    """A staged bucket whose plan cannot be read (torn, or written by another version) is planned again; that plan
    must be stored before the commit, or a crash after the commit plans a third time, finds the committed row and
    takes the bucket's own units for late ones: carried, billed twice."""
    client, sessions = stores
    key = keys.bucket_key("acme", BUCKET)
    await client.hset(key + STAGING_SUFFIX, mapping={"api_calls": 7, "~plan": "not a plan"})
    crashing = CrashBeforeCarry.from_url(_url(client))
    with pytest.raises(ConnectionError):  # planned, committed, then died before carrying and deleting
        await move(crashing, sessions)
    await crashing.aclose()
    assert await move(client, sessions) == 1
    assert await ledger(sessions) == {("acme", "api_calls", BUCKET): Decimal(7)}
    assert await client.exists(keys.bucket_key("acme", BUCKET + 300), key + STAGING_SUFFIX) == 0  # nothing carried


# -- a pass in groups ----------------------------------------------------------------------------------------


async def test_groups_of_a_large_pass_move_every_bucket_once(stores, monkeypatch: pytest.MonkeyPatch) -> None:
    client, sessions = stores
    monkeypatch.setattr(ledger_module, "MOVE_GROUP", 4)  # many groups, and a bucket's two names in two of them
    expected: dict[tuple[str, str, int], Decimal] = {}
    for t in range(6):
        for b in range(3):
            start = BUCKET - b * 300
            await client.hset(keys.bucket_key(f"t{t}", start), mapping={"api_calls": t + b + 1, "chains": 2})
            expected[(f"t{t}", "api_calls", start)] = Decimal(t + b + 1)
    staged = keys.bucket_key("staged", BUCKET)
    await client.hset(staged + STAGING_SUFFIX, mapping={"api_calls": 7})  # a pass stopped after staging it...
    await client.hset(staged, mapping={"api_calls": 1})  # ...and a late write recreated the live key
    expected[("staged", "api_calls", BUCKET)] = Decimal(7)
    held = keys.bucket_key("held", BUCKET)
    await client.hset(held, mapping={"api_calls": 5})
    await client.set(held + LOCK_SUFFIX, "another-mover", px=60_000)

    result = await move_closed_buckets(client, sessions, METERS, now=NOW, bucket_seconds=300, grace_seconds=10)
    assert (result.moved, result.held) == (18 + 2, 1)  # the staged bucket counts twice: its leftover, its late write
    assert await ledger(sessions) == expected
    left = sorted([k.decode() async for k in client.scan_iter(match="gw:{t:*}:b:*")])
    assert left == sorted([held, held + LOCK_SUFFIX, keys.bucket_key("staged", BUCKET + 300)])
    assert await client.hgetall(keys.bucket_key("staged", BUCKET + 300)) == {b"api_calls": b"1"}  # carried

    await client.delete(held + LOCK_SUFFIX)
    again = await move_closed_buckets(client, sessions, METERS, now=NOW, bucket_seconds=300, grace_seconds=10)
    assert (again.moved, again.held) == (1, 0)
    assert (await ledger(sessions))[("held", "api_calls", BUCKET)] == 5


async def test_limit_caps_the_buckets_a_call_moves(stores, monkeypatch: pytest.MonkeyPatch) -> None:
    client, sessions = stores
    monkeypatch.setattr(ledger_module, "MOVE_GROUP", 3)
    for t in range(10):
        await client.hset(keys.bucket_key(f"t{t}", BUCKET), mapping={"api_calls": 1})
    moves = {"limit": 4, "now": NOW, "bucket_seconds": 300, "grace_seconds": 10}
    assert (await move_closed_buckets(client, sessions, METERS, **moves)).moved == 4
    assert len(await ledger(sessions)) == 4
    assert (await move_closed_buckets(client, sessions, METERS, **moves | {"limit": 0})).moved == 0
    assert await move(client, sessions) == 6
    assert len(await ledger(sessions)) == 10


async def test_moves_on_a_redis_cluster(redis_cluster: RedisClusterProcess, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each step's batch spans every master (a pipeline split by slot); each bucket's keys share one slot."""
    monkeypatch.setattr(ledger_module, "MOVE_GROUP", 16)
    client = RedisCluster.from_url(redis_cluster.url)
    await client.initialize()
    engine = db.create_engine(f"sqlite+aiosqlite:///{tmp_path}/gw.db")
    await upgrade_async(engine)
    sessions = db.session_factory(engine)
    try:
        tenants = [f"c{i}" for i in range(40)]
        assert len({client.get_node_from_key(keys.bucket_key(t, BUCKET)).name for t in tenants}) >= 2
        for i, tenant in enumerate(tenants):
            await client.hset(keys.bucket_key(tenant, BUCKET), mapping={"api_calls": i + 1})
        await client.hset(keys.bucket_key("c0", BUCKET - 300), mapping={"api_calls": 3})
        assert await move(client, sessions) == 41
        await client.hset(keys.bucket_key("c1", BUCKET), mapping={"api_calls": 4})  # late: carried
        assert await move(client, sessions) == 1
        rows = await ledger(sessions)
        assert rows == {**{(t, "api_calls", BUCKET): Decimal(i + 1) for i, t in enumerate(tenants)},
                        ("c0", "api_calls", BUCKET - 300): Decimal(3)}
        assert await client.hgetall(keys.bucket_key("c1", BUCKET + 300)) == {b"api_calls": b"4"}
    finally:
        await client.flushall()
        await client.aclose()
        await engine.dispose()


# -- refunds stay in their billing period ------------------------------------------------------------------

MONTH_END = int(datetime(2027, 2, 1, tzinfo=UTC).timestamp())  # 2027-02-01 00:00 UTC
LAST = MONTH_END - 300  # the last bucket of January


async def parked(sessions: async_sessionmaker[AsyncSession]) -> list[tuple[str, str, int, Decimal, str]]:
    async with sessions() as session:
        rows = (await session.scalars(select(LedgerEntry).where(LedgerEntry.state == "parked"))).all()
    return [(r.tenant_id, r.meter, int(r.bucket_start.timestamp()), r.value, r.last_error.split(":")[0])
            for r in rows]


async def test_a_refund_is_not_carried_into_the_next_month(stores) -> None:
    client, sessions = stores
    await client.hset(keys.bucket_key("acme", LAST - 300), mapping={"api_calls": 3})
    await client.hset(keys.bucket_key("acme", LAST), mapping={"api_calls": -2, "chain_deployments": -1})
    await move(client, sessions, now=MONTH_END + 20)
    assert await client.exists(keys.bucket_key("acme", MONTH_END)) == 0  # February owes nothing
    assert sorted(await parked(sessions)) == [
        ("acme", "api_calls", LAST, Decimal(-2), "refund_not_netted"),
        ("acme", "chain_deployments", LAST, Decimal(-1), "refund_not_netted")]
    state = await sync_state(client, sessions, now=MONTH_END + 30)  # what GET /admin/sync shows
    assert sorted((p["meter"], p["bucket_start"], p["reason"], p["value"]) for p in state["parked"]) == [
        ("api_calls", LAST, "refund_not_netted", "-2.000000"),
        ("chain_deployments", LAST, "refund_not_netted", "-1.000000")]
    await client.hset(keys.bucket_key("acme", MONTH_END), mapping={"api_calls": 5})
    await move(client, sessions, now=MONTH_END + 320)
    assert (await ledger(sessions))[("acme", "api_calls", MONTH_END)] == 5


async def test_a_period_end_asks_for_leftover_slots_only_where_there_are_leftovers(
        stores, monkeypatch: pytest.MonkeyPatch) -> None:
    """At a period's end every tenant's last bucket has nowhere to carry to; only those with leftovers need a slot
    for their leftover rows (one query each, over the tenant's ledger): 100,000 queries at each month's end before."""
    client, sessions = stores
    asked: list[str] = []
    free_slot = staged_module._free_slot

    async def counted(session: AsyncSession, item: Any, *args: Any) -> int:
        asked.append(item.tenant)
        return await free_slot(session, item, *args)

    monkeypatch.setattr(staged_module, "_free_slot", counted)
    for t in range(20):
        await client.hset(keys.bucket_key(f"t{t}", LAST), mapping={"api_calls": 3, "chain_deployments": 1})
    await client.hset(keys.bucket_key("refunded", LAST), mapping={"api_calls": -2})
    await move(client, sessions, now=MONTH_END + 20)
    assert asked == ["refunded"]
    assert await parked(sessions) == [("refunded", "api_calls", LAST, Decimal(-2), "refund_not_netted")]
    assert len(await ledger(sessions)) == 41
    await client.hset(keys.bucket_key("refunded", LAST), mapping={"api_calls": -1})  # later still: the next slot
    await move(client, sessions, now=MONTH_END + 40)
    assert sorted(await parked(sessions)) == [("refunded", "api_calls", LAST, Decimal(-2), "refund_not_netted"),
                                              ("refunded", "api_calls", LAST, Decimal(-1), "refund_not_netted")]


async def test_a_refund_is_netted_within_the_month_even_across_idle_time(stores) -> None:
    client, sessions = stores
    await client.hset(keys.bucket_key("acme", LAST - 7200), mapping={"api_calls": -2})
    await move(client, sessions, now=LAST - 3600)  # no traffic since: carried into the open bucket
    assert await client.hgetall(keys.bucket_key("acme", LAST - 3600)) == {b"api_calls": b"-2"}
    await client.hincrby(keys.bucket_key("acme", LAST - 3600), "api_calls", 5)
    await move(client, sessions, now=LAST)
    assert (await ledger(sessions))[("acme", "api_calls", LAST - 3600)] == 3
    assert await parked(sessions) == []


async def test_a_refund_stays_in_the_tenants_anchor_period(stores) -> None:
    client, sessions = stores
    async with sessions() as session, session.begin():
        session.add(Tenant(id="anchored", plan="starter", billing_anchor_day=15))
    period_end = int(datetime(2027, 1, 15, tzinfo=UTC).timestamp())
    await client.hset(keys.bucket_key("anchored", period_end - 300), mapping={"api_calls": -4})
    await client.hset(keys.bucket_key("acme", period_end - 300), mapping={"api_calls": -4})
    await move(client, sessions, now=period_end + 20)
    assert await parked(sessions) == [("anchored", "api_calls", period_end - 300, Decimal(-4), "refund_not_netted")]
    assert await client.hgetall(keys.bucket_key("acme", period_end)) == {b"api_calls": b"-4"}  # calendar month


async def test_a_parked_refund_is_not_doubled_by_a_crash(stores) -> None:
    client, sessions = stores
    await client.hset(keys.bucket_key("acme", LAST), mapping={"api_calls": -2})
    crashing = CrashBeforeCarry.from_url(_url(client))
    with pytest.raises(ConnectionError):
        await move(crashing, sessions, now=MONTH_END + 20)
    await crashing.aclose()
    await move(client, sessions, now=MONTH_END + 20)
    assert await parked(sessions) == [("acme", "api_calls", LAST, Decimal(-2), "refund_not_netted")]
    assert await client.exists(keys.bucket_key("acme", LAST) + STAGING_SUFFIX) == 0


# -- bucket locks ---------------------------------------------------------------------------------------------


async def test_a_mover_that_stalls_past_its_lock_does_not_carry_twice(stores) -> None:
    client, sessions = stores
    key = keys.bucket_key("acme", BUCKET)
    await client.hset(key, mapping={"api_calls": 4})
    await move(client, sessions)
    await client.hset(key, mapping={"api_calls": 2, "chain_deployments": -1})  # late units and a late refund
    stalling = StallBeforeCarry.from_url(_url(client))
    first = asyncio.create_task(move(stalling, sessions))
    await asyncio.wait_for(stalling.stalled.wait(), 10)
    await client.delete(key + LOCK_SUFFIX)  # its lock expired (or was lost in a failover) meanwhile
    assert await move(client, sessions) == 1  # a second mover finishes the bucket
    stalling.resume.set()
    assert await first == 0  # the first mover finds it is no longer the owner: it carries nothing
    await stalling.aclose()
    carried = await client.hgetall(keys.bucket_key("acme", BUCKET + 300))
    assert {k.decode(): int(v) for k, v in carried.items()} == {"api_calls": 2, "chain_deployments": -1}
    assert (await ledger(sessions))[("acme", "api_calls", BUCKET)] == 4


async def test_a_slow_mover_keeps_its_lock(stores) -> None:
    client, sessions = stores
    key = keys.bucket_key("acme", BUCKET)
    await client.hset(key, mapping={"api_calls": 4})
    stalling = StallBeforeCarry.from_url(_url(client))
    first = asyncio.create_task(move_closed_buckets(stalling, sessions, METERS, now=NOW, bucket_seconds=300,
                                                    grace_seconds=10, lock_ms=150))
    await asyncio.wait_for(stalling.stalled.wait(), 10)
    await asyncio.sleep(0.5)  # Redis's clock: more than three lock lifetimes
    assert await client.get(key + LOCK_SUFFIX) is not None  # renewed
    other = await move_closed_buckets(client, sessions, METERS, now=NOW, bucket_seconds=300, grace_seconds=10)
    assert (other.moved, other.held) == (0, 1)
    stalling.resume.set()
    assert (await first).moved == 1
    await stalling.aclose()
    assert (await ledger(sessions))[("acme", "api_calls", BUCKET)] == 4


def _url(client: Redis) -> str:
    kwargs = client.connection_pool.connection_kwargs
    return f"redis://{kwargs['host']}:{kwargs['port']}/{kwargs.get('db', 0)}"


def _is_carry(script: Any) -> bool:
    return isinstance(script, str) and "HINCRBY" in script


def _carries(pipe: Pipeline) -> bool:
    return any(args[0] == "EVAL" and _is_carry(args[1]) for args, _ in pipe.command_stack)


class CrashBeforeCarry(Redis):
    """A real Redis client whose process "dies" when it would carry and delete a staged bucket, whether the
    mover sends the carry on its own or in a pipeline."""

    async def eval(self, script: str, numkeys: int, *args: Any) -> Any:  # type: ignore[override]
        if _is_carry(script):
            raise ConnectionError("crashed before carrying")
        return await super().eval(script, numkeys, *args)

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Pipeline:
        return _CrashingPipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)


class _CrashingPipeline(Pipeline):
    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        if _carries(self):
            await self.reset()
            raise ConnectionError("crashed before carrying")
        return await super().execute(raise_on_error)


class StallBeforeCarry(Redis):
    """A real Redis client that stalls (a long GC pause, a slow database) before its first carry."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stalled = asyncio.Event()
        self.resume = asyncio.Event()

    async def stall_if_carry(self, script: Any) -> None:
        if _is_carry(script) and not self.stalled.is_set():
            self.stalled.set()
            await self.resume.wait()

    async def eval(self, script: str, numkeys: int, *args: Any) -> Any:  # type: ignore[override]
        await self.stall_if_carry(script)
        return await super().eval(script, numkeys, *args)

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Pipeline:
        pipe = _StallingPipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)
        pipe.client = self
        return pipe


class _StallingPipeline(Pipeline):
    client: StallBeforeCarry

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        for args, _ in self.command_stack:
            if args[0] == "EVAL":
                await self.client.stall_if_carry(args[1])
        return await super().execute(raise_on_error)
