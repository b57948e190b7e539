"""Shadow rules in check_and_count.lua against a real redis-server: they never refuse, they report the first
hit of an admitted request, count it per tenant and period, and leave counts, buckets and the no-shadow
script path exactly as they were."""

from __future__ import annotations

import asyncio
import time
import uuid

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from metering import keys
from metering.redis_store import PERIOD_KEY_GRACE, RedisUsageStore
from metering.store import Check, CounterRule, GuardRule, RateRule, Record
from tests.metering.redis_cluster import RedisClusterProcess

NOW = float(int(time.time()))  # period keys expire at an absolute instant: the test period lies around now
PERIOD_START = int(NOW) - 86400
PERIOD_END = int(NOW) + 20 * 86400
BUCKET = int(NOW) // 300 * 300
BUCKET_TTL = 3600
DEPLOYS = (("chain_deployments", 1),)


def tenant() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def check(name: str, now: float = NOW, *, rate: RateRule | None = None, counters: tuple[CounterRule, ...] = (),
          guards: tuple[GuardRule, ...] = (), billable: tuple[tuple[str, int], ...] = DEPLOYS,
          shadow_rate: RateRule | None = None) -> Check:
    return Check(name, now, PERIOD_START, PERIOD_END, BUCKET, BUCKET_TTL, rate, counters, guards, billable,
                 shadow_rate)


def deployments(limit: int | None = None, shadow: int | None = None) -> tuple[CounterRule, ...]:
    return (CounterRule("chain_deployments", 1, limit, limit is not None, shadow),)


async def test_a_shadow_quota_serves_reports_and_counts_as_without_it(store: RedisUsageStore,
                                                                      client: Redis) -> None:
    shadowed, plain = tenant(), tenant()
    decisions = [await store.check(check(shadowed, counters=deployments(shadow=3))) for _ in range(5)]
    for _ in range(5):
        await store.check(check(plain, counters=deployments()))
    assert [d.allowed for d in decisions] == [True] * 5
    assert [d.shadow for d in decisions] == [None] * 3 + [("quota", "chain_deployments")] * 2
    assert [d.used["chain_deployments"] for d in decisions] == [1.0, 2.0, 3.0, 4.0, 5.0]
    # Counting and billing are unchanged by shadow mode.
    assert await store.usage(shadowed, PERIOD_START, ["chain_deployments"]) == await store.usage(
        plain, PERIOD_START, ["chain_deployments"]) == {"chain_deployments": 5.0}
    assert await store.bucket(shadowed, BUCKET) == await store.bucket(plain, BUCKET) == {"chain_deployments": 5.0}
    assert await store.shadow_hits(shadowed, PERIOD_START) == {("quota", "chain_deployments"): 2}
    assert await store.shadow_hits(plain, PERIOD_START) == {}
    hits = keys.shadow_hits_key(shadowed, PERIOD_START)
    assert await client.expiretime(hits) == PERIOD_END + PERIOD_KEY_GRACE  # expires with the period's counters
    assert not await client.exists(keys.shadow_hits_key(plain, PERIOD_START))


async def test_an_enforced_quota_beside_a_shadow_one_still_refuses(store: RedisUsageStore) -> None:
    t = tenant()
    decisions = [await store.check(check(t, counters=deployments(limit=4, shadow=2))) for _ in range(6)]
    assert [(d.allowed, d.reason, d.shadow) for d in decisions] == [
        (True, None, None), (True, None, None),
        (True, None, ("quota", "chain_deployments")), (True, None, ("quota", "chain_deployments")),
        (False, "quota", None), (False, "quota", None)]
    # A refused request is not held against the shadow rules: two hits, not four.
    assert await store.shadow_hits(t, PERIOD_START) == {("quota", "chain_deployments"): 2}
    assert await store.usage(t, PERIOD_START, ["chain_deployments"]) == {"chain_deployments": 4.0}


async def test_a_shadow_guard_serves_while_an_enforced_one_refuses(store: RedisUsageStore) -> None:
    t = tenant()
    await store.record(Record(t, PERIOD_START, PERIOD_END, BUCKET, BUCKET_TTL, gauges=(("chains", 1.0),)))
    shadow_guard = GuardRule("chains", 1.0, shadow=True)
    served = await store.check(check(t, guards=(shadow_guard,), counters=deployments()))
    assert (served.allowed, served.shadow) == (True, ("guard", "chains"))
    assert served.used == {"chain_deployments": 1.0}  # a shadow guard's gauge is not among the used values
    # Next to an enforced guard with room left it still only reports; at its limit the enforced one refuses.
    roomy = await store.check(check(t, guards=(GuardRule("chains", 5.0), shadow_guard)))
    assert (roomy.allowed, roomy.shadow, roomy.used) == (True, ("guard", "chains"), {"chains": 1.0})
    refused = await store.check(check(t, guards=(GuardRule("chains", 1.0), shadow_guard)))
    assert (refused.allowed, refused.reason, refused.meter, refused.shadow) == (False, "guard", "chains", None)
    assert await store.shadow_hits(t, PERIOD_START) == {("guard", "chains"): 2}


async def test_a_shadow_rate_has_its_own_gcra_that_moves_only_when_it_would_admit(store: RedisUsageStore,
                                                                                   client: Redis) -> None:
    t = tenant()
    shadow = RateRule(per_second=10, burst=3)
    decisions = [await store.check(check(t, shadow_rate=shadow)) for _ in range(5)]
    assert [d.allowed for d in decisions] == [True] * 5
    assert [d.shadow for d in decisions] == [None] * 3 + [("rate", "rate")] * 2
    assert all(d.rate_remaining is None for d in decisions)  # no enforced rate: nothing advertised
    assert not await client.exists(keys.rate_key(t))
    assert 0 < await client.pttl(keys.shadow_rate_key(t)) <= 1500
    # The two hits did not move the shadow TAT: a tenth of a second later exactly one token is free again.
    later = [await store.check(check(t, NOW + 0.1, shadow_rate=shadow)) for _ in range(2)]
    assert [d.shadow for d in later] == [None, ("rate", "rate")]
    assert await store.shadow_hits(t, PERIOD_START) == {("rate", "rate"): 3}


async def test_an_enforced_rate_beside_a_shadow_rate(store: RedisUsageStore) -> None:
    """The enforced rate refuses and advertises its remaining; the lower shadow rate only reports."""
    t = tenant()
    rules = {"rate": RateRule(per_second=10, burst=4), "shadow_rate": RateRule(per_second=10, burst=2)}
    decisions = [await store.check(check(t, **rules)) for _ in range(5)]  # type: ignore[arg-type]
    assert [(d.allowed, d.reason, d.shadow, d.rate_remaining) for d in decisions] == [
        (True, None, None, 3), (True, None, None, 2), (True, None, ("rate", "rate"), 1),
        (True, None, ("rate", "rate"), 0), (False, "rate", None, 0)]


async def test_the_first_hit_of_a_request_is_reported_and_counted(store: RedisUsageStore) -> None:
    """Rate, then counters, then guards, as enforced rules are decided: one hit per request."""
    t = tenant()
    await store.record(Record(t, PERIOD_START, PERIOD_END, BUCKET, BUCKET_TTL, gauges=(("chains", 9.0),)))
    rules = {"shadow_rate": RateRule(per_second=1, burst=1), "counters": deployments(shadow=1),
             "guards": (GuardRule("chains", 1.0, shadow=True),)}
    first, second = [await store.check(check(t, **rules)) for _ in range(2)]  # type: ignore[arg-type]
    assert (first.shadow, second.shadow) == (("guard", "chains"), ("rate", "rate"))
    third = await store.check(check(t, NOW + 1, **rules))  # type: ignore[arg-type]
    assert third.shadow == ("quota", "chain_deployments")
    assert await store.shadow_hits(t, PERIOD_START) == {("guard", "chains"): 1, ("rate", "rate"): 1,
                                                        ("quota", "chain_deployments"): 1}


async def test_checks_of_one_call_are_held_against_shadow_rules_one_by_one(store: RedisUsageStore,
                                                                            client: Redis) -> None:
    await store.load_scripts()
    await client.config_resetstat()
    t = tenant()
    rules = {"counters": deployments(limit=6, shadow=2), "shadow_rate": RateRule(per_second=1, burst=100)}
    decisions = await asyncio.gather(*(store.check(check(t, **rules)) for _ in range(8)))  # type: ignore[arg-type]
    assert (await client.info("commandstats"))["cmdstat_evalsha"]["calls"] == 1
    assert [(d.allowed, d.shadow) for d in decisions] == [(True, None)] * 2 + [
        (True, ("quota", "chain_deployments"))] * 4 + [(False, None)] * 2
    assert [d.used["chain_deployments"] for d in decisions] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 6.0, 6.0]
    assert await store.shadow_hits(t, PERIOD_START) == {("quota", "chain_deployments"): 4}
    assert await store.usage(t, PERIOD_START, ["chain_deployments"]) == {"chain_deployments": 6.0}


async def test_without_shadow_rules_the_script_runs_the_same_commands(store: RedisUsageStore,
                                                                       client: Redis) -> None:
    """The hot path of issue 12: a check without shadow rules sends no shadow keys or arguments, and the
    script runs exactly the Redis commands it ran before shadow limits existed (counted on that code: three
    checks of these rules, one after the other)."""
    t = tenant()
    rules = {"rate": RateRule(1000, 1000), "guards": (GuardRule("chains", 5.0),),
             "counters": (CounterRule("api_calls", 1, None, False), CounterRule("chain_deployments", 1, 10**9, True)),
             "billable": (("api_calls", 1), ("chain_deployments", 1))}
    prepared = store.prepare(check(t, **rules))  # type: ignore[arg-type]
    assert prepared.keys == [keys.rate_key(t), keys.bucket_key(t, BUCKET), keys.quota_key(t, "api_calls", PERIOD_START),
                             keys.quota_key(t, "chain_deployments", PERIOD_START), keys.gauge_key(t, "chains")]
    assert prepared.args[-5:] == [2, "api_calls", 1, "chain_deployments", 1]  # the bills close the arguments
    await store.load_scripts()
    await store.check(check("warm-up", **rules))  # type: ignore[arg-type]
    await client.config_resetstat()
    for i in range(3):
        await store.check(check(t, NOW + i, **rules))  # type: ignore[arg-type]
    stats = {name.removeprefix("cmdstat_"): value["calls"] for name, value in
             (await client.info("commandstats")).items()}
    stats.pop("config|resetstat", None)
    assert stats == {"evalsha": 3, "exists": 3, "get": 12, "incrby": 6, "expireat": 2, "set": 6, "hincrby": 6,
                     "expire": 1, "zadd": 2}


async def test_shadow_rules_add_only_their_own_reads_and_writes(store: RedisUsageStore, client: Redis) -> None:
    t = tenant()
    rules = {"shadow_rate": RateRule(1000, 1000), "counters": deployments(shadow=1),
             "guards": (GuardRule("chains", 5.0, shadow=True),)}
    await store.load_scripts()
    await client.config_resetstat()
    for i in range(2):
        await store.check(check(t, NOW + i, **rules))  # type: ignore[arg-type]
    stats = {name.removeprefix("cmdstat_"): value["calls"] for name, value in
             (await client.info("commandstats")).items()}
    # Per call: GET of the counter, the shadow TAT and the shadow guard's gauge; INCRBY, HINCRBY of the bucket,
    # SET of the shadow TAT and of the call marker; the second request's hit: one HINCRBY and its EXPIREAT.
    assert stats["get"] == 6 and stats["set"] == 4 and stats["hincrby"] == 3
    assert stats["expireat"] == 2  # the counter's creation and the hits hash's


async def test_shadow_keys_share_the_tenants_slot_in_a_cluster(redis_cluster: RedisClusterProcess) -> None:
    """On a cluster the calls go as argument tuples through redis-py: every shadow key in the tenant's slot,
    and the admitted-with-a-hit reply read back the same way."""
    client = RedisCluster.from_url(redis_cluster.url)
    await client.initialize()
    store = RedisUsageStore(client, timeout=2.0)
    try:
        tenants = [tenant() for _ in range(8)]
        assert len({client.get_node_from_key(keys.rate_key(t)).name for t in tenants}) >= 2
        rules = {"shadow_rate": RateRule(1000, 1000), "counters": deployments(limit=3, shadow=1),
                 "guards": (GuardRule("chains", 5.0, shadow=True),)}
        decisions = await asyncio.gather(*(store.check(check(t, **rules))  # type: ignore[arg-type]
                                           for t in tenants for _ in range(4)))
        assert [(d.allowed, d.shadow) for d in decisions[:4]] == [
            (True, None), (True, ("quota", "chain_deployments")), (True, ("quota", "chain_deployments")),
            (False, None)]
        for t in tenants:
            assert await store.shadow_hits(t, PERIOD_START) == {("quota", "chain_deployments"): 2}
    finally:
        await store.aclose()
        await client.aclose()
