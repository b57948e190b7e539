"""RedisUsageStore against a real redis-server (and a real three-master cluster): no mocks."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import hiredis
import pytest
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from gateway.cli.devservices import RedisProcess
from metering import keys
from metering.redis_store import MAX_CHECKS_PER_CALL, PERIOD_KEY_GRACE, RedisUsageStore
from metering.redis_store.batching import RECORD_WAIT
from metering.redis_store.calls import _RecordGroup
from metering.redis_store.scripts import LIVE_RECORD_MARKER_TTL
from metering.store import Check, CounterRule, GuardRule, RateRule, Record, StoreUnavailable
from tests.faultproxy import FaultProxy
from tests.metering.redis_cluster import RedisClusterProcess
from tests.support import BUSY_SCRIPT

# Real time: period keys expire at an absolute instant, so the test periods lie around the present.
NOW = float(int(time.time()))
PERIOD_START = int(NOW) - 86400
PERIOD_END = int(NOW) + 20 * 86400
BUCKET = int(NOW) // 300 * 300
BUCKET_TTL = 3600


def tenant() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def make_check(
    name: str,
    now: float = NOW,
    *,
    rate: RateRule | None = None,
    counters: tuple[CounterRule, ...] = (),
    guards: tuple[GuardRule, ...] = (),
    billable: tuple[tuple[str, int], ...] = (),
) -> Check:
    return Check(name, now, PERIOD_START, PERIOD_END, BUCKET, BUCKET_TTL, rate, counters, guards, billable)


def make_record(name: str, **fields: object) -> Record:
    return Record(name, PERIOD_START, PERIOD_END, BUCKET, BUCKET_TTL, **fields)  # type: ignore[arg-type]


def deployments(limit: int | None = 50, enforce: bool = True) -> tuple[CounterRule, ...]:
    return (CounterRule("chain_deployments", 1, limit, enforce),)


# -- rate -------------------------------------------------------------------------------------------


async def test_gcra_admits_the_burst_then_refuses_until_a_token_frees(store: RedisUsageStore) -> None:
    t, rate = tenant(), RateRule(per_second=10, burst=5)
    decisions = [await store.check(make_check(t, rate=rate)) for _ in range(6)]
    assert [d.allowed for d in decisions] == [True] * 5 + [False]
    assert [d.rate_remaining for d in decisions[:5]] == [4, 3, 2, 1, 0]
    refused = decisions[5]
    assert (refused.reason, refused.meter, refused.rate_remaining) == ("rate", None, 0)
    assert refused.retry_after == pytest.approx(0.1, abs=1e-6)

    assert not (await store.check(make_check(t, NOW + 0.09, rate=rate))).allowed
    after = await store.check(make_check(t, NOW + 0.1, rate=rate))
    assert (after.allowed, after.rate_remaining) == (True, 0)
    rested = await store.check(make_check(t, NOW + 60, rate=rate))
    assert (rested.allowed, rested.rate_remaining) == (True, 4)


@pytest.mark.parametrize("now", [NOW + 0.1234567, NOW + 0.9999996, NOW + 0.5000004, NOW + 0.3333333])
async def test_gcra_full_burst_at_one_instant_whatever_the_digits(store: RedisUsageStore, now: float) -> None:
    """The TAT is stored to the microsecond; rounding it must never cost the last request of a burst."""
    t, rate = tenant(), RateRule(per_second=1, burst=3)
    allowed = [(await store.check(make_check(t, now, rate=rate))).allowed for _ in range(4)]
    assert allowed == [True, True, True, False]


async def test_gcra_high_rate_keeps_sub_millisecond_precision(store: RedisUsageStore) -> None:
    t, rate = tenant(), RateRule(per_second=1000, burst=1)
    assert (await store.check(make_check(t, rate=rate))).allowed
    refused = await store.check(make_check(t, NOW + 0.0005, rate=rate))
    assert not refused.allowed and refused.retry_after == pytest.approx(0.0005, abs=1e-6)
    assert (await store.check(make_check(t, NOW + 0.001, rate=rate))).allowed


# -- quotas and guards ------------------------------------------------------------------------------


async def test_concurrent_checks_admit_exactly_the_units_left(store: RedisUsageStore) -> None:
    t = tenant()
    billable = (("chain_deployments", 1),)
    checks = [make_check(t, counters=deployments(50), billable=billable) for _ in range(300)]
    decisions = await asyncio.gather(*(store.check(c) for c in checks))
    admitted = [d for d in decisions if d.allowed]
    assert len(admitted) == 50
    assert sorted(d.used["chain_deployments"] for d in admitted) == [float(n) for n in range(1, 51)]
    refused = [d for d in decisions if not d.allowed]
    assert {(d.reason, d.meter) for d in refused} == {("quota", "chain_deployments")}
    assert refused[0].retry_after == pytest.approx(PERIOD_END - NOW)
    assert await store.usage(t, PERIOD_START, ["chain_deployments"]) == {"chain_deployments": 50.0}
    assert await store.bucket(t, BUCKET) == {"chain_deployments": 50.0}


async def test_a_rejected_check_counts_nothing(store: RedisUsageStore, client: Redis) -> None:
    t = tenant()
    rate = RateRule(per_second=1, burst=100)
    counters = (CounterRule("api_calls", 1, None, False), *deployments(1))
    billable = (("api_calls", 1), ("chain_deployments", 1))
    assert (await store.check(make_check(t, rate=rate, counters=counters, billable=billable))).allowed
    tat = await client.get(keys.rate_key(t))
    bucket = await client.hgetall(keys.bucket_key(t, BUCKET))

    refused = await store.check(make_check(t, rate=rate, counters=counters, billable=billable))
    assert (refused.allowed, refused.reason, refused.meter) == (False, "quota", "chain_deployments")
    assert refused.used == {"api_calls": 1.0, "chain_deployments": 1.0}
    assert await client.get(keys.rate_key(t)) == tat
    assert await client.hgetall(keys.bucket_key(t, BUCKET)) == bucket
    assert await store.usage(t, PERIOD_START, ["api_calls", "chain_deployments"]) == {
        "api_calls": 1.0, "chain_deployments": 1.0,
    }

    # A rate refusal leaves the counters as they were too.
    tight = RateRule(per_second=1, burst=1)
    t2 = tenant()
    assert (await store.check(make_check(t2, rate=tight, counters=counters[:1]))).allowed
    assert not (await store.check(make_check(t2, rate=tight, counters=counters[:1]))).allowed
    assert await store.usage(t2, PERIOD_START, ["api_calls"]) == {"api_calls": 1.0}


async def test_overage_and_unlimited_counters_count_past_the_limit(store: RedisUsageStore) -> None:
    t = tenant()
    counters = (CounterRule("chain_deployments", 2, 3, False), CounterRule("api_calls", 1, None, True))
    decisions = [await store.check(make_check(t, counters=counters)) for _ in range(5)]
    assert all(d.allowed for d in decisions)
    assert decisions[-1].used == {"chain_deployments": 10.0, "api_calls": 5.0}
    assert decisions[-1].rate_remaining is None


async def test_guard_rejects_while_the_gauge_is_at_or_over_its_limit(store: RedisUsageStore) -> None:
    t = tenant()
    guard = (GuardRule("chains", 1),)
    counters = deployments(None, False)
    assert (await store.check(make_check(t, guards=guard, counters=counters))).used == {
        "chain_deployments": 1.0, "chains": 0.0,
    }
    await store.record(make_record(t, gauges=(("chains", 1.0),)))
    refused = await store.check(make_check(t, guards=guard, counters=counters))
    assert (refused.allowed, refused.reason, refused.meter) == (False, "guard", "chains")
    assert refused.used == {"chain_deployments": 1.0, "chains": 1.0}
    await store.record(make_record(t, gauges=(("chains", 0.5),)))
    assert (await store.check(make_check(t, guards=guard))).allowed


async def test_period_and_bucket_keys_expire(store: RedisUsageStore, client: Redis) -> None:
    t = tenant()
    rate = RateRule(per_second=2, burst=4)
    await store.check(make_check(t, rate=rate, counters=deployments(), billable=(("chain_deployments", 3),)))
    expire_at = await client.expiretime(keys.quota_key(t, "chain_deployments", PERIOD_START))
    assert expire_at == PERIOD_END + PERIOD_KEY_GRACE
    assert 0 < await client.ttl(keys.bucket_key(t, BUCKET)) <= BUCKET_TTL
    assert 0 < await client.pttl(keys.rate_key(t)) <= 1500
    assert await client.hgetall(keys.bucket_key(t, BUCKET)) == {b"chain_deployments": b"3"}


async def test_tenants_seen_written_outside_the_script(store: RedisUsageStore) -> None:
    first, second = tenant(), tenant()
    await asyncio.gather(store.check(make_check(first)), store.record(make_record(second, add=(("b", 1),))))
    assert set(await store.tenants_seen_after(None, 10_000)) == {first, second}
    assert await store.tenant_seen(first) and not await store.tenant_seen(tenant())


async def test_tenant_index_pages_in_id_order_and_forgets_idle_tenants(client: Redis) -> None:
    clock = [NOW]
    store = RedisUsageStore(client, timeout=0.5, clock=lambda: clock[0])
    try:
        await client.sadd(keys.TENANTS_SEEN_KEY, "legacy-a", "legacy-b")  # left by an older version
        old = [f"old-{i:02d}" for i in range(5)]
        for t in old:
            await store.check(make_check(t))
        clock[0] += 3 * 86_400
        recent = [f"new-{i:02d}" for i in range(5)]
        for t in recent:
            await store.check(make_check(t))
        assert await store.tenants_seen_after(None, 3) == ["new-00", "new-01", "new-02"]
        assert await store.tenants_seen_after("new-02", 100) == ["new-03", "new-04", *old]
        assert await store.tenant_seen("legacy-a")  # still readable before it is moved

        # Idle for more than two days, or beyond the six most recently seen: forgotten.
        assert await store.trim_tenants_seen(retention=2 * 86_400, maximum=6) == 6
        assert not await client.exists(keys.TENANTS_SEEN_KEY)
        assert await store.tenants_seen_after(None, 100) == ["legacy-b", *recent]
        assert not await store.tenant_seen("old-00")
        assert await store.trim_tenants_seen(retention=2 * 86_400, maximum=6) == 0
    finally:
        await store.aclose()


# -- record -----------------------------------------------------------------------------------------


async def test_record_refunds_adds_bytes_and_sets_gauges(store: RedisUsageStore, client: Redis) -> None:
    t = tenant()
    counters = (CounterRule("api_calls", 1, None, False),)
    for _ in range(3):
        await store.check(make_check(t, counters=counters, billable=(("api_calls", 1),)))
    await store.record(make_record(
        t, refund=(("api_calls", 1),), add=(("bandwidth_bytes", 1500),),
        gauges=(("storage_gb", 12.5), ("chains", 2.0)),
    ))
    await store.record(make_record(t, add=(("bandwidth_bytes", 500),), gauges=(("storage_gb", 11.0),)))
    # Refunds stop at zero in the period counter. The bucket keeps the debit (a refund that arrived after
    # its own bucket closed lands in a later one); the sync worker carries it into the next bucket.
    await store.record(make_record(t, refund=(("api_calls", 10), ("never_counted", 4))))
    usage = await store.usage(
        t, PERIOD_START, ["api_calls", "bandwidth_bytes", "never_counted", "storage_gb", "chains", "unreported"]
    )
    assert usage == {"api_calls": 0.0, "bandwidth_bytes": 2000.0, "never_counted": 0.0,
                     "storage_gb": 11.0, "chains": 2.0, "unreported": 0.0}
    assert await store.bucket(t, BUCKET) == {
        "api_calls": -8.0, "never_counted": -4.0, "bandwidth_bytes": 2000.0, "storage_gb": 11.0, "chains": 2.0,
    }
    assert await client.exists(keys.quota_key(t, "never_counted", PERIOD_START)) == 0


async def test_record_id_is_applied_once(store: RedisUsageStore, client: Redis) -> None:
    t = tenant()
    record = make_record(t, add=(("bandwidth_bytes", 100),), record_id=uuid.uuid4().hex)
    assert await store.record(record) is True
    assert await store.record(record) is False
    assert await store.usage(t, PERIOD_START, ["bandwidth_bytes"]) == {"bandwidth_bytes": 100.0}
    assert 0 < await client.ttl(keys.record_key(t, record.record_id or "")) <= 7 * 86400


async def test_record_from_admitted_check_counts_like_the_check(store: RedisUsageStore) -> None:
    spooled, direct = tenant(), tenant()
    counters = (CounterRule("api_calls", 1, None, False), CounterRule("chain_deployments", 1, 5, True))
    billable = (("api_calls", 1),)
    await store.check(make_check(direct, counters=counters, billable=billable))
    await store.record(Record.from_admitted(make_check(spooled, counters=counters, billable=billable)))
    meters = ["api_calls", "chain_deployments"]
    assert await store.usage(spooled, PERIOD_START, meters) == await store.usage(direct, PERIOD_START, meters)
    assert await store.bucket(spooled, BUCKET) == await store.bucket(direct, BUCKET) == {"api_calls": 1.0}


# -- batching, scripts, failures --------------------------------------------------------------------


async def test_concurrent_calls_share_one_pipeline(store: RedisUsageStore, client: Redis) -> None:
    await store.load_scripts()
    await client.config_resetstat()
    t = tenant()
    before = store.round_trips
    calls = [store.check(make_check(t, counters=deployments(None, False))) for _ in range(200)]
    calls += [store.record(make_record(t, add=(("bandwidth_bytes", 10),))) for _ in range(100)]
    await asyncio.gather(*calls)
    assert store.round_trips - before == 1
    stats = await client.info("commandstats")
    # The 200 checks share their rules: one script call decides them all; each awaited record is its own.
    assert stats["cmdstat_evalsha"]["calls"] == 101
    assert await store.usage(t, PERIOD_START, ["chain_deployments", "bandwidth_bytes"]) == {
        "chain_deployments": 200.0, "bandwidth_bytes": 1000.0,
    }


async def test_byte_counts_ride_with_the_next_checks_instead_of_a_pipeline_of_their_own(
        store: RedisUsageStore, client: Redis) -> None:
    """At one connection a request's byte record goes out with the next request's check: one round trip per
    request, not two; with nothing else to ride with, it goes out on its own within RECORD_WAIT."""
    await store.load_scripts()
    t = tenant()
    await store.check(make_check(t, counters=deployments(None, False)))
    before = store.round_trips
    for _ in range(5):
        store.add_later((t, PERIOD_START, PERIOD_END, BUCKET, BUCKET_TTL), [("bandwidth_bytes", 100)],
                        lambda record, error: None)
        await asyncio.sleep(RECORD_WAIT / 10)  # the next request comes a moment later
        await store.check(make_check(t, counters=deployments(None, False)))
    assert store.round_trips - before == 5
    assert await store.usage(t, PERIOD_START, ["bandwidth_bytes"]) == {"bandwidth_bytes": 500.0}
    store.add_later((t, PERIOD_START, PERIOD_END, BUCKET, BUCKET_TTL), [("bandwidth_bytes", 7)],
                    lambda record, error: None)
    await asyncio.sleep(RECORD_WAIT + 0.5)  # generous: this asserts that it goes at all, not how fast
    assert await store.usage(t, PERIOD_START, ["bandwidth_bytes"]) == {"bandwidth_bytes": 507.0}


async def test_records_set_expiries_only_on_the_keys_and_fields_they_create(
        store: RedisUsageStore, client: Redis) -> None:
    t = tenant()
    counter, bucket = keys.quota_key(t, "bandwidth_bytes", PERIOD_START), keys.bucket_key(t, BUCKET)
    await store.record(make_record(t, add=(("bandwidth_bytes", 100),)))
    assert await client.expiretime(counter) == PERIOD_END + PERIOD_KEY_GRACE
    assert 0 < await client.ttl(bucket) <= BUCKET_TTL
    await client.expire(bucket, 10)  # as if created a while ago: adding to its fields keeps its expiry
    await store.record(make_record(t, add=(("bandwidth_bytes", 50),), refund=(("bandwidth_bytes", 20),)))
    assert await client.ttl(bucket) <= 10
    await store.record(make_record(t, gauges=(("storage_gb", 3.0),)))  # a new field (re)sets the bucket's
    assert await client.ttl(bucket) > 10
    assert await store.usage(t, PERIOD_START, ["bandwidth_bytes"]) == {"bandwidth_bytes": 130.0}
    assert await store.bucket(t, BUCKET) == {"bandwidth_bytes": 130.0, "storage_gb": 3.0}


async def test_a_first_send_records_its_marker_without_looking_it_up(store: RedisUsageStore,
                                                                     client: Redis) -> None:
    """The request path's record is sent once with an id just made: the marker is set (a replay of its
    spooled copy finds it) but not read first."""
    await store.load_scripts()
    t = tenant()
    store.add_later((t, PERIOD_START, PERIOD_END, BUCKET, BUCKET_TTL), [("bandwidth_bytes", 100)],
                    lambda record, error: None)
    await client.config_resetstat()
    await store.flush()
    stats = await client.info("commandstats")
    assert "cmdstat_exists" not in stats
    markers = [key async for key in client.scan_iter(match=keys.record_key(t, "x")[:-1] + "*")]
    assert len(markers) == 1 and 0 < await client.ttl(markers[0]) <= LIVE_RECORD_MARKER_TTL


async def test_byte_counts_packed_ahead_are_the_command_a_record_would_be(store: RedisUsageStore) -> None:
    """`_add_call` packs a group of byte counts from a kept prefix: byte for byte what `_record_call` and
    hiredis would send for the same record."""
    t = tenant()
    group = _RecordGroup((t, PERIOD_START, PERIOD_END, BUCKET, BUCKET_TTL))
    for add in ({"bandwidth_bytes": 1234}, {"bandwidth_bytes": 5, "egress_bytes": 99}):
        group.add = add
        for record_id in ("l1-a", "l1-b"):  # the second from the kept prefix
            generic = store._record_call(group.record(record_id), awaited=False, marker_ttl=-LIVE_RECORD_MARKER_TTL)
            expected = hiredis.pack_command(("EVALSHA", generic.script.sha, len(generic.keys), *generic.keys,
                                             *generic.args))
            assert store._add_call(group, record_id).packed == expected


async def test_checks_sharing_rules_are_decided_one_by_one_in_one_call(store: RedisUsageStore,
                                                                        client: Redis) -> None:
    await store.load_scripts()
    await client.config_resetstat()
    t = tenant()
    rules = {"counters": deployments(limit=50), "billable": (("chain_deployments", 1),)}
    decisions = await asyncio.gather(*(store.check(make_check(t, NOW + i / 1000, **rules)) for i in range(120)))
    stats = await client.info("commandstats")
    assert stats["cmdstat_evalsha"]["calls"] == 1
    # In order: exactly the first 50 pass, each seeing the count its predecessors left.
    assert [d.allowed for d in decisions] == [True] * 50 + [False] * 70
    assert [d.used["chain_deployments"] for d in decisions[:50]] == [float(n) for n in range(1, 51)]
    assert {d.reason for d in decisions[50:]} == {"quota"}
    assert all(d.used["chain_deployments"] == 50.0 for d in decisions[50:])
    assert await store.usage(t, PERIOD_START, ["chain_deployments"]) == {"chain_deployments": 50.0}
    assert await store.bucket(t, BUCKET) == {"chain_deployments": 50.0}


async def test_a_token_freed_at_a_request_time_serves_it(store: RedisUsageStore) -> None:
    """Times travel in whole microseconds: rounded to the nearest, a request that comes exactly when its
    token frees (every millisecond at 1000/s, with no burst to spare) is served, at any fraction of a second."""
    t = tenant()
    rate = RateRule(per_second=1000, burst=1)
    base = NOW + 0.123
    decisions = await asyncio.gather(*(store.check(make_check(t, base + k / 1000, rate=rate)) for k in range(300)))
    assert all(d.allowed for d in decisions), [k for k, d in enumerate(decisions) if not d.allowed]


async def test_each_check_of_one_call_sees_the_counts_before_it(store: RedisUsageStore) -> None:
    """Several counters with other units and a guard: every decision of a shared call reports what its
    request saw, refused ones in the middle included (the script replies with the counts before the
    call and the caller adds up what was admitted)."""
    t = tenant()
    await store.record(make_record(t, gauges=(("chains", 2.5),), count=(("api_calls", 7),)))
    rules = {
        "rate": RateRule(per_second=1, burst=4),  # the 5th request at one instant is refused for its rate
        "counters": (CounterRule("api_calls", 1, None, False), CounterRule("chain_deployments", 3, 12, True)),
        "guards": (GuardRule("chains", 5),),
    }
    times = [NOW] * 5 + [NOW + 1.0] * 2  # a second later one more token: the quota (12 = 4 x 3) refuses it
    decisions = await asyncio.gather(*(store.check(make_check(t, now, **rules)) for now in times))
    assert [(d.allowed, d.reason) for d in decisions] == [(True, None)] * 4 + [(False, "rate"), (False, "quota"),
                                                                               (False, "quota")]
    assert [d.rate_remaining for d in decisions[:5]] == [3, 2, 1, 0, 0]
    assert decisions[5].meter == "chain_deployments" and decisions[4].meter is None
    seen = [(d.used["api_calls"], d.used["chain_deployments"], d.used["chains"]) for d in decisions]
    assert seen == [(8.0, 3.0, 2.5), (9.0, 6.0, 2.5), (10.0, 9.0, 2.5), (11.0, 12.0, 2.5)] + [(11.0, 12.0, 2.5)] * 3
    assert await store.usage(t, PERIOD_START, ["api_calls", "chain_deployments"]) == {
        "api_calls": 11.0, "chain_deployments": 12.0}


async def test_rate_limit_inside_one_call_is_exact(store: RedisUsageStore) -> None:
    t = tenant()
    rate = RateRule(per_second=10, burst=10)
    decisions = await asyncio.gather(*(store.check(make_check(t, NOW, rate=rate)) for _ in range(30)))
    assert sum(d.allowed for d in decisions) == 10
    assert [d.rate_remaining for d in decisions[:10]] == list(range(9, -1, -1))
    assert all(d.reason == "rate" and d.retry_after > 0 for d in decisions[10:])
    # The TAT written at the end of the call is what the next call sees.
    later = await store.check(make_check(t, NOW + 0.1, rate=rate))
    assert later.allowed and later.rate_remaining == 0


async def test_checks_with_other_rules_or_beyond_the_cap_go_in_calls_of_their_own(
        store: RedisUsageStore, client: Redis) -> None:
    await store.load_scripts()
    await client.config_resetstat()
    t, other = tenant(), tenant()
    calls = [store.check(make_check(t, counters=deployments(None, False))) for _ in range(MAX_CHECKS_PER_CALL + 1)]
    calls += [store.check(make_check(other, counters=deployments(None, False))) for _ in range(3)]
    calls += [store.check(make_check(t, counters=deployments(10_000, True))) for _ in range(3)]  # another limit
    decisions = await asyncio.gather(*calls)
    assert all(d.allowed for d in decisions)
    stats = await client.info("commandstats")
    assert stats["cmdstat_evalsha"]["calls"] == 4  # the cap splits the first group in two
    assert (await store.usage(t, PERIOD_START, ["chain_deployments"]))["chain_deployments"] == MAX_CHECKS_PER_CALL + 4


async def test_scripts_are_reloaded_after_noscript(store: RedisUsageStore, client: Redis) -> None:
    t = tenant()
    await store.check(make_check(t, counters=deployments()))
    await client.script_flush()
    assert (await store.check(make_check(t, counters=deployments()))).used == {"chain_deployments": 2.0}
    await client.script_flush()
    assert await store.record(make_record(t, refund=(("chain_deployments", 1),)))
    assert await store.usage(t, PERIOD_START, ["chain_deployments"]) == {"chain_deployments": 1.0}


async def test_redis_down_raises_store_unavailable_within_the_timeout(redis_server: RedisProcess) -> None:
    client = Redis.from_url(redis_server.url)
    store = RedisUsageStore(client, timeout=0.05)
    t = tenant()
    try:
        await store.check(make_check(t))
        redis_server.stop()
        for call in (store.check(make_check(t)), store.record(make_record(t, add=(("b", 1),))),
                     store.usage(t, PERIOD_START, ["b"]), store.tenants_seen_after(None, 10_000)):
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await call
            assert time.monotonic() - started < 1.1  # reads: read_timeout 1 s; hot path below
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await store.check(make_check(t))
        assert time.monotonic() - started < 0.2
    finally:
        if redis_server.process is None:
            redis_server.start()
    # Back up, empty and without scripts: the store recovers on its own (NOSCRIPT -> SCRIPT LOAD).
    for _ in range(50):
        try:
            assert (await store.check(make_check(t, counters=deployments()))).allowed
            break
        except StoreUnavailable:
            await asyncio.sleep(0.05)
    else:
        pytest.fail("the store did not recover after Redis came back")
    await store.aclose()
    await client.aclose()


async def test_slow_redis_times_out(redis_server: RedisProcess, client: Redis) -> None:
    store = RedisUsageStore(Redis.from_url(redis_server.url), timeout=0.05)
    await store.load_scripts()
    blocker = Redis.from_url(redis_server.url)
    sleeping = asyncio.create_task(blocker.eval(BUSY_SCRIPT, 0, 300_000))
    await asyncio.sleep(0.05)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="timed out"):
        await store.check(make_check(tenant()))
    assert time.monotonic() - started < 0.2
    await sleeping
    await blocker.aclose()
    await store.aclose()


# -- cluster ----------------------------------------------------------------------------------------


@pytest.fixture
async def cluster_store(redis_cluster: RedisClusterProcess) -> AsyncIterator[RedisUsageStore]:
    client = RedisCluster.from_url(redis_cluster.url)
    await client.initialize()
    store = RedisUsageStore(client, timeout=2.0)
    yield store
    await store.aclose()
    await client.aclose()


async def test_cluster_check_record_usage_across_slots(cluster_store: RedisUsageStore) -> None:
    client = cluster_store._client
    assert isinstance(client, RedisCluster)
    tenants = [tenant() for _ in range(12)]
    nodes = {client.get_node_from_key(keys.rate_key(t)).name for t in tenants}
    assert len(nodes) >= 2, "tenants should land on several masters"

    counters = deployments(5)
    calls = [
        cluster_store.check(make_check(t, rate=RateRule(100, 100), counters=counters,
                                       billable=(("chain_deployments", 1),)))
        for t in tenants for _ in range(8)
    ]
    decisions = await asyncio.gather(*calls)
    assert sum(d.allowed for d in decisions) == 5 * len(tenants)
    await asyncio.gather(*(
        cluster_store.record(make_record(t, refund=(("chain_deployments", 1),), add=(("bandwidth_bytes", 7),),
                                         gauges=(("chains", 3.0),), record_id=uuid.uuid4().hex))
        for t in tenants
    ))
    for t in tenants:
        meters = ["chain_deployments", "bandwidth_bytes"]
        usage = await cluster_store.usage(t, PERIOD_START, [*meters, "chains"])
        assert usage == {"chain_deployments": 4.0, "bandwidth_bytes": 7.0, "chains": 3.0}
        assert await cluster_store.bucket(t, BUCKET) == {
            "chain_deployments": 4.0, "bandwidth_bytes": 7.0, "chains": 3.0,
        }
    assert set(tenants) <= set(await cluster_store.tenants_seen_after(None, 10_000))


async def test_cluster_reloads_scripts_on_every_master(
    cluster_store: RedisUsageStore, redis_cluster: RedisClusterProcess
) -> None:
    tenants = [tenant() for _ in range(6)]
    await asyncio.gather(*(cluster_store.check(make_check(t, counters=deployments())) for t in tenants))
    for port in redis_cluster.ports:
        node = Redis(port=port)
        await node.script_flush()
        await node.aclose()
    checks = [make_check(t, counters=deployments()) for t in tenants]
    decisions = await asyncio.gather(*(cluster_store.check(check) for check in checks))
    assert [d.used for d in decisions] == [{"chain_deployments": 2.0}] * len(tenants)


async def test_checks_timing_out_under_load_are_accounted_exactly_once(redis_server: RedisProcess) -> None:
    """Redis stalls now and then past a 20 ms timeout: each check is counted by Redis exactly when its
    caller learns so, on time (an allowed Decision) or late (`applied`), never both and never lost."""
    client = Redis.from_url(redis_server.url)
    store = RedisUsageStore(client, timeout=0.02)
    await store.load_scripts()
    blocker = Redis.from_url(redis_server.url)
    t = tenant()
    stalling = True

    async def stall() -> None:
        while stalling:
            await blocker.eval(BUSY_SCRIPT, 0, 30_000)  # 30 ms: the batches sent meanwhile time out
            await asyncio.sleep(0.03)

    async def one(i: int) -> tuple[bool, bool]:  # (counted, timed out)
        await asyncio.sleep(i % 100 / 150)  # spread over ~0.7 s
        try:
            decision = await store.check(make_check(t, counters=deployments(None, False),
                                                    billable=(("chain_deployments", 1),)))
        except StoreUnavailable as error:
            return (False if error.applied is None else await error.applied), True
        return decision.allowed, False

    staller = asyncio.create_task(stall())
    try:
        outcomes = await asyncio.gather(*(one(i) for i in range(1500)))
    finally:
        stalling = False
        await staller
    timed_out = sum(late for _, late in outcomes)
    assert 0 < timed_out < 1500, timed_out  # both paths were taken
    counted = sum(c for c, _ in outcomes)
    usage = await store.usage(t, PERIOD_START, ["chain_deployments"])
    assert usage == {"chain_deployments": float(counted)}, (counted, timed_out)
    assert (await store.bucket(t, BUCKET)).get("chain_deployments", 0) == counted
    await store.aclose()
    await blocker.aclose()
    await client.aclose()


async def test_a_cancelled_store_call_always_ends_cancelled(redis_server: RedisProcess) -> None:
    """redis-py swallows a cancellation that lands while it disconnects; the store raises it again, so a
    background loop that awaits the store stops when cancelled (a shutdown once hung on this)."""
    client = Redis.from_url(redis_server.url, socket_timeout=0.5)  # as the gateway's client
    store = RedisUsageStore(client, timeout=0.5)
    swallowed = cancelled = 0
    try:
        for i in range(1000):
            call = asyncio.create_task(store.usage(tenant(), PERIOD_START, ["chain_deployments", "chains"]))
            for _ in range(i % 8):  # land the cancel anywhere in the call
                await asyncio.sleep(0)
            if not call.cancel():
                continue  # done already
            cancelled += 1
            try:
                await call
            except asyncio.CancelledError:
                continue
            swallowed += 1
        assert cancelled > 100, cancelled
        assert swallowed == 0, f"{swallowed} of {cancelled} cancelled calls went on as if not cancelled"
    finally:
        await store.aclose()
        await client.aclose()


async def test_a_record_whose_reply_was_lost_is_not_counted_twice_by_its_replay(
        redis_server: RedisProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    """Byte counts go out without waiting; when their reply is lost (Redis ran the script, the answer never
    came) the record is handed to the spool as failed. Its replay carries the same id, so Redis applies it
    once (PRODUCT.md §5: no unit counted twice)."""
    monkeypatch.setattr("metering.redis_store.batching.LATE_REPLY_SECONDS", 0.3)  # give up on the late reply sooner
    proxy = await FaultProxy(redis_server.port).start()
    faulty = Redis.from_url(proxy.url, socket_timeout=0.5)
    direct = Redis.from_url(redis_server.url)
    store = RedisUsageStore(faulty, timeout=0.2)
    replayer = RedisUsageStore(direct, timeout=2.0)
    t = tenant()
    failed: list[tuple[Record, StoreUnavailable]] = []
    try:
        await store.record(make_record(t, add=(("bandwidth_bytes", 1),)))  # connected, scripts loaded
        proxy.drop_replies = True
        store.add_later((t, PERIOD_START, PERIOD_END, BUCKET, BUCKET_TTL), [("bandwidth_bytes", 100)],
                        lambda record, error: failed.append((record, error)))
        deadline = time.monotonic() + 5
        while not failed or (failed[0][1].applied is not None and not failed[0][1].applied.done()):
            assert time.monotonic() < deadline, "the lost reply was never given up on"
            await asyncio.sleep(0.05)
        record, error = failed[0]
        assert error.applied is None or error.applied.result() is False  # as far as the store knows: not applied
        assert record.record_id is not None
        # Redis did run it: the spool's replay (same id) must be a no-op.
        assert await replayer.record(record) is False
        assert await replayer.usage(t, PERIOD_START, ["bandwidth_bytes"]) == {"bandwidth_bytes": 101.0}
    finally:
        await store.aclose()
        await replayer.aclose()
        await faulty.aclose()
        await direct.aclose()
        await proxy.close()
