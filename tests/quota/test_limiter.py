"""The limiter against a real redis-server: abandoned requests, late refunds, spool replay into open buckets."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from redis.asyncio import Redis

from gateway.cli.devservices import RedisProcess
from gateway.config import parse_settings
from metering import keys
from metering.redis_store import RedisUsageStore
from metering.spool import Spool
from quota.limiter import Limiter, LimiterSettings, Refusal
from quota.metrics import QuotaMetrics
from quota.tenants import TenantDirectory, TenantRecord
from tests.support import BUSY_SCRIPT

PLANS = {"starter": {"rate": {"per_second": 1000, "burst": 1000}, "quotas": {"chain_deployments": {"limit": 50}}},
         "unlimited": {"quotas": {}}}
DEPLOY = "/api/chains/c1/deployments"


class Clock:
    def __init__(self) -> None:
        self.now = time.time() // 300 * 300 + 10  # 10 s into a billing bucket

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def setup(redis_server: RedisProcess, tmp_path: Path) -> AsyncIterator[tuple[Limiter, RedisUsageStore, Redis,
                                                                                    Clock, Spool]]:
    policy = parse_settings({"plans": PLANS, "auth": {"algorithms": ["HS256"], "hs256_secret": "x" * 40}}).policy
    client = Redis.from_url(redis_server.url)
    clock = Clock()
    store = RedisUsageStore(client, timeout=0.5)
    spool = Spool(tmp_path / "spool.jsonl")
    limiter = Limiter(store, policy.matcher, policy.plans, TenantDirectory(None, None), spool,  # type: ignore[arg-type]
                      QuotaMetrics(policy.plans, [m.name for m in policy.meters]),
                      LimiterSettings(default_plan="starter", bucket_seconds=300, fail_open=True, grace_seconds=10),
                      clock=clock)
    yield limiter, store, client, clock, spool
    await store.aclose()
    await spool.aclose()
    await client.aclose()


async def counted(limiter: Limiter, tenant: str) -> dict[str, float]:
    await limiter.drain()
    return await limiter.usage(tenant, None, ["chain_deployments", "api_calls"])


async def test_abandoned_admission_counts_nothing(setup) -> None:
    limiter, store, client, clock, _ = setup
    # Cancelled before its batch is sent: never counted.
    task = asyncio.ensure_future(limiter.admit("gone", None, "POST", DEPLOY))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await counted(limiter, "gone") == {"chain_deployments": 0, "api_calls": 0}
    # Cancelled after the batch went out: counted by the script, then given back.
    await client.execute_command("CLIENT", "PAUSE", 200, "WRITE")
    task = asyncio.ensure_future(limiter.admit("gone", None, "POST", DEPLOY))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.3)
    assert await counted(limiter, "gone") == {"chain_deployments": 0, "api_calls": 0}
    bucket = await store.bucket("gone", int(clock.now // 300 * 300))
    assert bucket.get("chain_deployments", 0) == 0


async def test_admitted_and_completed_request_is_counted(setup) -> None:
    limiter, *_ = setup
    admission = await limiter.admit("kept", None, "POST", DEPLOY)
    limiter.complete(admission, 200, 10, 90, None)
    usage = await counted(limiter, "kept")
    assert usage == {"chain_deployments": 1, "api_calls": 1}


async def test_slow_server_error_refund_reaches_the_bill(setup) -> None:
    """A 5xx that completes after its bucket closed still takes its units off the tenant's billed total."""
    limiter, store, _, clock, _ = setup
    admission = await limiter.admit("slow", None, "POST", DEPLOY)
    first = admission.compiled.bucket
    clock.now += 330  # the admission's bucket closed meanwhile (300 s + 10 s grace)
    limiter.complete(admission, 504, 0, 0, None)
    await limiter.drain()
    billed = (await store.bucket("slow", first)).get("chain_deployments", 0) + \
        (await store.bucket("slow", first + 300)).get("chain_deployments", 0)
    assert billed == 0
    assert (await counted(limiter, "slow"))["chain_deployments"] == 0


async def test_spool_replayed_after_its_bucket_closed_lands_in_an_open_one(setup, redis_server: RedisProcess) -> None:
    limiter, store, client, clock, spool = setup
    redis_server.stop()
    try:
        admission = await limiter.admit("late", None, "POST", DEPLOY)  # fail-open: served and spooled
        assert admission.spooled
        await spool.flush()
    finally:
        redis_server.start()
    clock.now += 600  # the outage outlasted the bucket and its grace: the sync may have moved it
    await spool.replay(store, rebucket=limiter.rebucket)
    assert await client.exists(keys.bucket_key("late", admission.compiled.bucket)) == 0
    open_bucket = int(clock.now // 300 * 300)
    assert (await store.bucket("late", open_bucket)).get("chain_deployments") == 1


async def test_a_timed_out_check_that_redis_ran_late_is_not_spooled_again(setup, redis_server: RedisProcess) -> None:
    """Sent, then timed out (fail-open admits): Redis runs it when it wakes up. Counted once, not twice."""
    limiter, store, _, _, spool = setup
    store._timeout = 0.05  # the production hot-path timeout
    pause = Redis.from_url(redis_server.url)
    try:
        await pause.execute_command("CLIENT", "PAUSE", 300, "WRITE")
        admission = await limiter.admit("sleepy", None, "POST", DEPLOY)
        assert admission.spooled  # the check timed out: served under fail-open
        limiter.complete(admission, 200, 0, 100, None)
        await asyncio.sleep(0.5)  # Redis resumes and runs the check and the record late
    finally:
        await pause.aclose()
    store._timeout = 0.5
    await spool.flush()
    await spool.replay(store)
    usage = await counted(limiter, "sleepy")
    assert usage == {"chain_deployments": 1, "api_calls": 1}


async def test_exact_when_most_batches_time_out(setup, redis_server: RedisProcess) -> None:
    """A hot-path timeout far below Redis's answer time: every served request still counts exactly once,
    whether Redis ran its check in time, late, or not at all (then the spool has it).

    Redis is stalled by a busy script now and then, so that timeouts happen however fast the machine;
    the route counts `api_calls`, which has no quota, so no request is refused whichever path it takes.
    """
    limiter, store, _, _, spool = setup
    store._timeout = 0.001
    blocker = Redis.from_url(redis_server.url)
    stalling = True
    served = 0

    async def stall() -> None:
        while stalling:
            await blocker.eval(BUSY_SCRIPT, 0, 5_000)  # 5 ms: the batches sent meanwhile time out
            await asyncio.sleep(0.005)

    async def one(i: int) -> None:
        nonlocal served
        await asyncio.sleep(i % 50 / 200)  # spread over ~0.25 s
        admission = await limiter.admit("hurried", None, "GET", "/api/chains")
        served += 1
        limiter.complete(admission, 200, 0, 10, None)

    staller = asyncio.create_task(stall())
    try:
        await asyncio.gather(*(one(i) for i in range(500)))
    finally:
        stalling = False
        await staller
        await blocker.aclose()
    await asyncio.sleep(0.5)  # late replies resolve
    store._timeout = 2
    await limiter.drain()
    await spool.flush()
    assert spool.pending() > 0  # some checks or records did time out
    await spool.replay(store)
    usage = await limiter.usage("hurried", None, ["api_calls", "bandwidth_bytes"])
    assert served == 500
    assert usage == {"api_calls": 500, "bandwidth_bytes": 5000}


def put_tenant(limiter: Limiter, record: TenantRecord) -> None:
    """What a directory reload does: the tenant's record replaced by a new one (no SQL in this test)."""
    limiter._directory._records[record.id] = record  # type: ignore[attr-defined]


async def test_a_tenant_change_or_the_end_of_its_grace_takes_effect_with_the_next_request(setup) -> None:
    """The limiter reuses what it derived for a tenant's route until the record changes, the bucket or
    period ends, or a past-due tenant's grace runs out: each of those is seen by the very next request."""
    limiter, _, _, clock, _ = setup
    base = TenantRecord(id="fickle", plan="starter", status="active", subscription_status="active",
                        stripe_customer_id=None, stripe_subscription_id=None, billing_anchor_day=None, overrides=())
    put_tenant(limiter, base)
    assert (await limiter.admit("fickle", None, "GET", "/api/chains")).compiled.plan == "starter"
    put_tenant(limiter, dataclasses.replace(base, status="suspended"))
    with pytest.raises(Refusal) as refused:
        await limiter.admit("fickle", None, "GET", "/api/chains")
    assert refused.value.kind == "forbidden"
    # Past due since almost the whole grace ago: served for 5 more seconds, then refused.
    grace = limiter._settings.past_due_grace_seconds  # type: ignore[attr-defined]
    since = datetime.fromtimestamp(clock.now - grace + 5, UTC)
    put_tenant(limiter, dataclasses.replace(base, subscription_status="past_due", subscription_changed_at=since))
    await limiter.admit("fickle", None, "GET", "/api/chains")
    clock.now += 4
    await limiter.admit("fickle", None, "GET", "/api/chains")
    clock.now += 2
    with pytest.raises(Refusal) as refused:
        await limiter.admit("fickle", None, "GET", "/api/chains")
    assert refused.value.kind == "subscription_inactive"
    # Another plan: the next request is checked against it (starter counts 50 deployments, sovereign more).
    put_tenant(limiter, base)
    for _ in range(50):
        await limiter.admit("fickle", None, "POST", DEPLOY)
    with pytest.raises(Refusal):
        await limiter.admit("fickle", None, "POST", DEPLOY)
    put_tenant(limiter, dataclasses.replace(base, plan="unlimited"))
    assert (await limiter.admit("fickle", None, "POST", DEPLOY)).compiled.plan == "unlimited"


@pytest.mark.parametrize(("status", "served"), [
    ("active", True), ("trialing", True), ("past_due", True), (None, True),
    ("canceled", False), ("unpaid", False), ("incomplete", False), ("incomplete_expired", False), ("paused", False),
])
async def test_which_subscription_statuses_are_served(setup, status: str | None, served: bool) -> None:
    """PRODUCT.md §8: trialing and active are served, past_due within its grace; the rest get 402."""
    limiter, _, _, clock, _ = setup
    put_tenant(limiter, TenantRecord(id="subscriber", plan="starter", status="active", subscription_status=status,
                                     stripe_customer_id="cus_1", stripe_subscription_id="sub_1",
                                     billing_anchor_day=None, overrides=(),
                                     subscription_changed_at=datetime.fromtimestamp(clock.now, UTC)))
    if served:
        await limiter.admit("subscriber", None, "GET", "/api/chains")
        return
    with pytest.raises(Refusal) as refused:
        await limiter.admit("subscriber", None, "GET", "/api/chains")
    assert refused.value.kind == "subscription_inactive"


async def test_a_late_refund_never_lands_in_the_next_period(setup) -> None:
    """A 5xx that completes after its period ended gives its units back in its own period's bucket (the
    sync worker nets it there or parks it), never in the next period's (PRODUCT.md §8)."""
    limiter, store, _, clock, _ = setup
    _, period_end = limiter.period(None, clock.now)
    clock.now = period_end - 100  # the last bucket of the period
    admission = await limiter.admit("late-refund", None, "POST", DEPLOY)
    last = admission.compiled.bucket
    assert last < period_end <= last + 300
    clock.now = period_end + 600  # next month, the old bucket long closed
    limiter.complete(admission, 504, 0, 0, None)
    await limiter.drain()
    assert (await store.bucket("late-refund", last)).get("chain_deployments") == 0  # +1 admitted, -1 refunded
    assert await store.bucket("late-refund", period_end + 600 - 600 % 300) == {}


@pytest.mark.parametrize("stalled", [False, True])
async def test_a_request_cancelled_just_as_its_check_was_answered_gives_its_units_back(
        setup, redis_server: RedisProcess, stalled: bool) -> None:
    """The client goes away (the handler is cancelled) after the store answered but before the request's task
    ran again: the store's future is not cancelled, so the limiter itself gives back what the check counted —
    also when the answer was a timeout of a check that Redis ran anyway (found by the chaos harness)."""
    limiter, store, client, _, _ = setup
    await limiter.admit("racy", None, "GET", "/api/chains")  # connected, scripts loaded
    real = store.submit_check
    admitting: asyncio.Future[object] | None = None

    def racing(prepared: object, now: float, on_abandoned: object = None) -> asyncio.Future[object]:
        future = real(prepared, now, on_abandoned)  # type: ignore[arg-type]
        # Runs before the admitting task's wake-up, which is registered later (when it awaits the future).
        future.add_done_callback(lambda _: admitting.cancel())  # type: ignore[union-attr]
        return future

    store.submit_check = racing  # type: ignore[method-assign]
    stall = asyncio.ensure_future(client.eval(BUSY_SCRIPT, 0, 300_000)) if stalled else None
    await asyncio.sleep(0.01)
    admitting = asyncio.ensure_future(limiter.admit("racy", None, "POST", DEPLOY))
    with pytest.raises(asyncio.CancelledError):
        await admitting
    store.submit_check = real  # type: ignore[method-assign]
    if stall is not None:
        await stall
    for _ in range(50):
        if (await counted(limiter, "racy"))["chain_deployments"] == 0:
            break
        await asyncio.sleep(0.05)
    assert (await counted(limiter, "racy"))["chain_deployments"] == 0


async def test_a_fail_open_admission_abandoned_while_its_count_reaches_the_disk_counts_nothing(
        setup, redis_server: RedisProcess) -> None:
    """Under fail_open an admission waits for its spooled count to be fsync'd; a client that goes away
    during that wait (the handler cancelled there) gets its units back, in the spool after the count
    (found by the chaos harness, seed 13: abandoned uploads billed)."""
    limiter, store, _, _, spool = setup
    stuck = asyncio.Event()

    async def slow_disk() -> None:  # the fsync has not come back yet when the client leaves
        stuck.set()
        await asyncio.Event().wait()

    redis_server.stop()
    try:
        spool.sync = slow_disk  # type: ignore[method-assign]
        admitting = asyncio.ensure_future(limiter.admit("gone", None, "POST", DEPLOY))
        await asyncio.wait_for(stuck.wait(), 5)
        admitting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await admitting
        await spool.flush()
    finally:
        redis_server.start()
    await spool.replay(store, rebucket=limiter.rebucket)
    assert (await counted(limiter, "gone"))["chain_deployments"] == 0
