"""The billing sync worker against a real redis-server, the Stripe emulator and real SQLite / PostgreSQL.

Usage is written the way the gateway writes it (RedisUsageStore.record); every scenario then checks the
one property that matters: Stripe holds Σ counted per tenant and meter, once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client import REGISTRY
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from billing_sync import worker as worker_module
from billing_sync.ledger import LOCK_SUFFIX, STAGING_SUFFIX, move_closed_buckets
from billing_sync.sender import (
    DRY_RUN_KEPT,
    SENT,
    DryRunSender,
    MeterEvent,
    Outcome,
    StripeV2StreamSender,
    classify,
)
from billing_sync.settings import StripeSettings
from billing_sync.state import requeue_parked, sync_state
from billing_sync.worker import LEADER_KEY, SyncWorker, build_worker
from metering import keys
from metering.db import create_engine, session_factory
from metering.meters import DEFAULT_METERS
from metering.migrate import upgrade_async
from metering.models import LedgerEntry, Tenant
from metering.redis_store import RedisUsageStore
from metering.store import Record
from tests.billing_sync.stripe_emulator import ManualClock, StripeEmulator
from tests.metering.conftest import db_url, postgres_database  # noqa: F401  (fixtures: SQLite and PostgreSQL)

NOW = 1_800_000_000  # a multiple of BUCKET
BUCKET = 300
GRACE = 10
DAY = 86_400
METERS = {m.name: m for m in DEFAULT_METERS}
TENANTS = {"acme": "cus_acme", "org:beta": "cus_beta", "odd tenant}%": "cus_odd"}


@dataclass
class Env:
    clock: ManualClock
    emulator: StripeEmulator
    redis: aioredis.Redis
    store: RedisUsageStore
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    redis_process: Any
    counted: dict[tuple[str, str], Decimal] = field(default_factory=lambda: defaultdict(Decimal))
    workers: list[SyncWorker] = field(default_factory=list)

    def settings(self, **kw: Any) -> StripeSettings:
        base: dict[str, Any] = {"mode": "live", "api_base": self.emulator.url, "api_key": "sk_test_sync",
                                "max_events_per_second": 0, "concurrency": 4}
        return StripeSettings(**(base | kw))

    def worker(self, **kw: Any) -> SyncWorker:
        settings = self.settings(**kw)
        worker = build_worker(redis=self.redis, sessions=self.sessions, meters=DEFAULT_METERS, stripe=settings,
                              bucket_seconds=BUCKET, grace_seconds=GRACE, clock=self.clock)
        self.workers.append(worker)
        return worker

    async def bill(self, tenant: str, bucket_start: int, meter: str, units: int) -> None:
        """What the gateway does for an admitted request: add to the tenant's billing bucket."""
        await self.store.record(Record(tenant, NOW - 30 * DAY, NOW + DAY, bucket_start, 3 * DAY,
                                       bill=((meter, units),)))
        if METERS[meter].stripe_event:
            self.counted[(tenant, meter)] += units

    async def gauge(self, tenant: str, bucket_start: int, meter: str, value: float) -> None:
        await self.store.record(Record(tenant, NOW - 30 * DAY, NOW + DAY, bucket_start, 3 * DAY,
                                       gauges=((meter, value),)))

    async def usage(self, buckets: int = 6) -> None:
        """Several tenants, meters and closed buckets."""
        for t, tenant in enumerate(TENANTS):
            for b in range(buckets):
                start = NOW - (b + 2) * BUCKET
                await self.bill(tenant, start, "api_calls", 3 + t + b)
                await self.bill(tenant, start, "api_calls", 2)
                if b % 2 == 0:
                    await self.bill(tenant, start, "bandwidth_bytes", 1000 * (b + 1) + t)
                if b % 3 == 0:
                    await self.bill(tenant, start, "chain_deployments", 1)

    def stripe_totals(self) -> dict[tuple[str, str], Decimal]:
        out: dict[tuple[str, str], Decimal] = {}
        for tenant, customer in TENANTS.items():
            for name, meter in METERS.items():
                if meter.stripe_event and meter.kind == "counter":
                    out[(tenant, name)] = self.emulator.totals(customer, meter.stripe_event)
        return out

    def assert_exact(self) -> None:
        expected = {key: self.counted.get(key, Decimal(0)) for key in self.stripe_totals()}
        assert self.stripe_totals() == expected
        identifiers = [e.identifier for e in self.emulator.events]
        assert len(identifiers) == len(set(identifiers))

    async def drain(self, worker: SyncWorker, passes: int = 30) -> None:
        """Pass after pass, moving the clock past every backoff, until nothing is pending."""
        for _ in range(passes):
            result = await worker.run_once()
            if result.pending == 0:
                return
            self.clock.advance(301)
        raise AssertionError("still pending")

    async def settle(self, worker: SyncWorker, *, after: float = 0) -> None:
        """`after` seconds on, drain `worker`, then check that Stripe holds every counted unit once."""
        self.clock.advance(after)
        await self.drain(worker)
        self.assert_exact()

    async def rows(self) -> list[LedgerEntry]:
        async with self.sessions() as session:
            return list((await session.scalars(select(LedgerEntry))).all())

    async def bucket_keys(self) -> list[str]:
        return [k.decode() async for k in self.redis.scan_iter(match="gw:{t:*}:b:*")]


@pytest.fixture
async def env(db_url: str, redis_server: Any) -> AsyncIterator[Env]:  # noqa: F811
    clock = ManualClock(NOW)
    emulator = await StripeEmulator(clock=clock).start()
    for customer in TENANTS.values():
        emulator.add_customer(customer)
    for meter in DEFAULT_METERS:
        if meter.stripe_event:
            emulator.add_meter(meter.stripe_event, "last" if meter.kind == "gauge" else "sum")
    engine = create_engine(db_url)
    await upgrade_async(engine)
    sessions = session_factory(engine)
    async with sessions() as session, session.begin():
        for tenant, customer in TENANTS.items():
            session.add(Tenant(id=tenant, plan="starter", stripe_customer_id=customer))
    client = aioredis.Redis.from_url(redis_server.url)
    env = Env(clock, emulator, client, RedisUsageStore(client, timeout=2.0, clock=clock), engine, sessions,
              redis_server)
    yield env
    for worker in env.workers:
        await worker.aclose()
    await env.store.aclose()
    await client.aclose()
    await engine.dispose()
    await emulator.close()
    if not redis_server.running:
        redis_server.start()


# -- exactly once ---------------------------------------------------------------------------------------------


async def test_clean_run_sends_each_bucket_once(env: Env) -> None:
    await env.usage()
    await env.bill("acme", NOW - BUCKET, "api_calls", 99)  # still open: closes at NOW + GRACE
    env.counted[("acme", "api_calls")] -= 99
    await env.gauge("acme", NOW - 3 * BUCKET, "storage_gb", 10.5)
    await env.gauge("acme", NOW - 3 * BUCKET, "storage_gb", 12.25)  # the bucket keeps the last value
    await env.gauge("acme", NOW - 3 * BUCKET, "chains", 4)  # no stripe_event: not billed
    worker = env.worker()
    result = await worker.run_once()
    assert result.moved == len(TENANTS) * 6
    assert result.pending == 0 and result.retried == 0 and result.parked == 0
    assert result.sent == len(env.emulator.events) > 0
    env.assert_exact()
    assert env.emulator.totals("cus_acme", "storage_gb") == Decimal("12.25")
    assert not any(e.identifier.startswith("cg1_chains_") for e in env.emulator.events)
    assert not any(e.event_name == "chains" for e in env.emulator.events)
    assert await env.bucket_keys() == [keys.bucket_key("acme", NOW - BUCKET)]  # the open bucket stays
    rows = await env.rows()
    assert {r.state for r in rows} == {"sent"} and all(r.sent_at and r.stripe_customer_id for r in rows)
    assert {e.identifier for e in env.emulator.events} == {r.identifier for r in rows}
    assert all(e.timestamp % BUCKET == 0 for e in env.emulator.events)  # sent at the bucket start

    requests = sum(env.emulator.requests.values())
    again = await worker.run_once()
    assert (again.moved, again.sent) == (0, 0)
    assert sum(env.emulator.requests.values()) == requests

    env.clock.advance(BUCKET)  # the open bucket closes
    env.counted[("acme", "api_calls")] += 99
    assert (await worker.run_once()).sent == 1
    env.assert_exact()


async def test_gauge_back_to_zero_reaches_stripe(env: Env) -> None:
    await env.gauge("acme", NOW - 3 * BUCKET, "storage_gb", 12)
    await env.gauge("acme", NOW - 2 * BUCKET, "storage_gb", 0)
    await env.bill("acme", NOW - 2 * BUCKET, "api_calls", 0)  # an empty counter field: not sent
    result = await env.worker().run_once()
    assert result.sent == 2
    assert env.emulator.totals("cus_acme", "storage_gb") == 0
    assert [e.event_name for e in env.emulator.events] == ["storage_gb", "storage_gb"]


async def test_transient_errors_retry_until_stripe_recovers(env: Env) -> None:
    await env.usage()
    env.emulator.fail_next(5, 500)
    env.emulator.fail_next(5, 429)
    env.emulator.fail_next(2, 409)
    env.emulator.fail_next(2, 503)
    worker = env.worker(concurrency=1)
    first = await worker.run_once()
    assert first.retried == 14 and first.pending == 14
    rows = [r for r in await env.rows() if r.state == "pending"]
    assert all(r.attempts == 1 and r.next_attempt_at is not None and r.last_error for r in rows)
    assert {r.last_error.split(":")[0] for r in rows} == {"server_error", "rate_limited", "conflict"}
    # Not due yet: backoff holds them (the clock has not moved).
    assert (await worker.run_once()).sent == 0
    env.emulator.fail_next(3, 502)
    await env.settle(worker)
    assert all(r.state == "sent" for r in await env.rows())


async def test_stripe_down_for_many_passes(env: Env) -> None:
    await env.usage(buckets=2)
    worker = env.worker()
    env.emulator.slow(0)
    env.emulator.fail_next(10_000, 500)
    for _ in range(4):
        result = await worker.run_once()
        assert result.sent == 0 and result.pending > 0
        env.clock.advance(400)
    env.emulator.clear_faults()
    await env.settle(worker)
    assert max(r.attempts for r in await env.rows()) >= 3


async def test_lost_answer_after_accept_is_a_duplicate_not_a_double(db_url: str, env: Env) -> None:  # noqa: F811
    await env.usage(buckets=2)
    env.emulator.idempotency_ttl = 1  # the retry comes after the idempotency key expired: a true duplicate
    env.emulator.drop_next(2, after_accept=True)
    worker = env.worker(concurrency=1)
    first = await worker.run_once()
    assert first.retried == 2
    accepted = len(env.emulator.events)
    env.clock.advance(301)
    second = await env.worker(concurrency=1).run_once()
    assert second.duplicates == 2 and second.pending == 0
    assert len(env.emulator.events) == accepted
    env.assert_exact()
    dup_rows = [r for r in await env.rows() if r.last_error and r.last_error.startswith("duplicate")]
    assert len(dup_rows) == 2 and all(r.state == "sent" for r in dup_rows)


async def test_lost_answer_replayed_by_idempotency_key(env: Env) -> None:
    await env.usage(buckets=1)
    env.emulator.drop_next(1, after_accept=True)
    worker = env.worker()
    assert (await worker.run_once()).retried == 1
    await env.settle(worker, after=301)


async def test_cancelled_mid_pass_then_rerun(env: Env) -> None:
    await env.usage()
    env.emulator.slow(0.02)
    worker = env.worker(concurrency=2)
    task = asyncio.create_task(worker.run_once())
    for _ in range(2000):
        if len(env.emulator.events) >= 5:
            break
        await asyncio.sleep(0.005)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    env.emulator.slow(0)
    assert await env.redis.get(LEADER_KEY) is None  # released on the way out
    assert any(r.state == "pending" for r in await env.rows())
    await env.settle(env.worker())


async def test_crash_between_commit_and_redis_delete(env: Env) -> None:
    await env.usage()
    saved = {key: await env.redis.hgetall(key) for key in await env.bucket_keys()}
    moves = await move_closed_buckets(env.redis, env.sessions, METERS, now=NOW, bucket_seconds=BUCKET,
                                      grace_seconds=GRACE)
    assert moves.moved == len(TENANTS) * 6
    for key, fields in saved.items():  # as if the DEL of the staged bucket had never happened
        await env.redis.hset(key + STAGING_SUFFIX, mapping=fields)
    await env.settle(env.worker())
    assert len(await env.rows()) == len(env.emulator.events)


async def test_two_workers_at_once_without_the_lock(env: Env) -> None:
    await env.usage()
    one, two = env.worker(concurrency=3), env.worker(concurrency=5)
    for worker in (one, two):
        worker._leader_lock = False  # correctness must not need it
    for _ in range(3):
        await asyncio.gather(one.run_once(), two.run_once())
        env.clock.advance(301)
    await env.settle(one)


async def test_two_workers_with_the_lock(env: Env) -> None:
    await env.usage()
    env.emulator.slow(0.01)
    one, two = env.worker(), env.worker()
    results = await asyncio.gather(one.run_once(), two.run_once())
    assert sorted(r.leader for r in results) == [False, True]
    env.emulator.slow(0)
    env.assert_exact()


async def test_redis_restart_between_passes(env: Env) -> None:
    await env.usage()
    worker = env.worker()
    env.emulator.fail_next(10_000, 500)
    first = await worker.run_once()  # moved into the ledger, nothing sent
    assert first.moved == len(TENANTS) * 6 and first.sent == 0
    env.emulator.clear_faults()
    env.redis_process.stop()
    env.clock.advance(301)
    down = await worker.run_once()  # Redis down: the ledger is still sent
    assert down.pending == 0 and down.sent > 0
    env.redis_process.start()  # empty: nothing is persisted
    env.clock.advance(301)
    after = await worker.run_once()
    assert (after.moved, after.sent) == (0, 0)
    env.assert_exact()


async def test_pass_with_redis_down_is_not_complete(env: Env) -> None:
    await env.usage(buckets=2)
    env.redis_process.stop()
    down = await env.worker().run_once()
    assert down.pending == 0 and down.store_error is not None and not down.complete
    env.redis_process.start()
    env.clock.advance(301)
    assert (await env.worker().run_once()).complete


async def test_bucket_held_by_another_mover_is_not_complete(env: Env) -> None:
    await env.usage(buckets=1)
    key = keys.bucket_key("acme", NOW - 2 * BUCKET)
    await env.redis.set(key + LOCK_SUFFIX, "another-mover", px=60_000)
    held = await env.worker().run_once()
    assert held.held == 1 and held.pending == 0 and not held.complete
    assert await env.redis.exists(key) == 1
    await env.redis.delete(key + LOCK_SUFFIX)  # the other mover let go (or its lock expired)
    done = await env.worker().run_once()
    assert done.held == 0 and done.moved == 1 and done.complete
    env.assert_exact()


async def test_a_bucket_redis_refuses_to_stage_is_not_complete(env: Env) -> None:
    """A RENAME Redis refuses for another reason than a missing key (READONLY on a demoted primary, an ACL) leaves
    the bucket in Redis: the pass is not complete, and `sync --once` must not exit 0 with the bucket left behind."""
    await env.usage(buckets=1)
    await env.redis.execute_command("ACL", "SETUSER", "mover", "on", ">mover-pw", "~*", "&*", "+@all", "-rename")
    restricted = aioredis.Redis.from_url(env.redis_process.url.replace("redis://", "redis://mover:mover-pw@", 1))
    try:
        worker = build_worker(redis=restricted, sessions=env.sessions, meters=DEFAULT_METERS, stripe=env.settings(),
                              bucket_seconds=BUCKET, grace_seconds=GRACE, clock=env.clock)
        result = await worker.run_once()
        await worker.aclose()
        assert result.store_error is not None and not result.complete
        assert (result.moved, result.pending) == (0, 0)
        assert len(await env.bucket_keys()) == len(TENANTS)  # still there, not staged, not lost
    finally:
        await restricted.aclose()
        await env.redis.execute_command("ACL", "DELUSER", "mover")
    env.clock.advance(301)
    await env.settle(env.worker())


async def test_resend_beyond_the_identifier_window_asks_stripe_first(env: Env) -> None:
    await env.usage(buckets=2)
    env.emulator.drop_next(2, after_accept=True)  # Stripe holds these two; the worker never hears it
    env.emulator.drop_next(1)  # and this one Stripe never got
    worker = env.worker(concurrency=1)
    first = await worker.run_once()
    assert first.retried == 3
    rows = {r.identifier: r for r in await env.rows()}
    assert all(r.first_attempt_at is not None for r in rows.values())
    accepted = len(env.emulator.events)
    env.clock.advance(25 * 3600)  # the worker was down for a day: Stripe forgot the identifiers
    env.emulator.forget_identifiers()
    second = await env.worker(concurrency=1).run_once()
    assert (second.duplicates, second.sent, second.pending) == (2, 1, 0)
    assert len(env.emulator.events) == accepted + 1  # only the one Stripe did not hold
    env.assert_exact()
    confirmed = [r for r in await env.rows() if r.last_error and "event summary" in r.last_error]
    assert len(confirmed) == 2 and all(r.state == "sent" for r in confirmed)
    assert env.emulator.requests["event_summaries"] == 3


@pytest.mark.parametrize("transport", ["v1", "v2_stream"])
async def test_pages_of_mixed_outcomes_send_each_bucket_once(env: Env, monkeypatch: pytest.MonkeyPatch,
                                                             transport: str) -> None:
    """Pages smaller than the backlog, each with rows sent, retried and parked, recorded a kind at a time."""
    monkeypatch.setattr(worker_module, "ROWS_PER_QUERY", 7)
    async with env.sessions() as session, session.begin():
        session.add(Tenant(id="newco", plan="starter"))  # no Stripe customer: its rows park
    await env.usage(buckets=6)
    await env.bill("newco", NOW - 2 * BUCKET, "api_calls", 5)
    await env.bill("newco", NOW - 5 * BUCKET, "chain_deployments", 1)
    env.emulator.fail_next(3, 500)
    worker = env.worker(transport=transport, concurrency=3)
    first = await worker.run_once()
    assert first.retried > 0 and first.parked == 2 and first.sent > 0
    assert first.sent + first.retried == len([r for r in await env.rows() if r.tenant_id != "newco"])
    await env.settle(worker, after=301)
    rows = await env.rows()
    assert {r.state for r in rows if r.tenant_id != "newco"} == {"sent"}
    assert sorted((r.meter, r.state, r.last_error.split(":")[0]) for r in rows if r.tenant_id == "newco") == [
        ("api_calls", "parked", "no_customer"), ("chain_deployments", "parked", "no_customer")]


# -- parking ----------------------------------------------------------------------------------------------


async def test_missing_customer_parks_then_sends_once_the_customer_exists(env: Env) -> None:
    async with env.sessions() as session, session.begin():
        session.add(Tenant(id="newco", plan="starter"))
    env.emulator.add_customer("cus_newco")
    await env.bill("newco", NOW - 2 * BUCKET, "api_calls", 7)
    await env.bill("acme", NOW - 2 * BUCKET, "api_calls", 3)
    worker = env.worker()
    result = await worker.run_once()
    assert (result.sent, result.parked, result.pending) == (1, 1, 0)
    state = await sync_state(env.redis, env.sessions, now=env.clock())
    assert [(p["tenant"], p["meter"], p["bucket_start"], p["reason"]) for p in state["parked"]] == [
        ("newco", "api_calls", NOW - 2 * BUCKET, "no_customer")]
    assert state["last_run_at"] == NOW and state["sent_total"] == 1 and state["pending"] == 0
    assert (await worker.run_once()).parked == 0  # parked stays parked, not re-counted

    async with env.sessions() as session, session.begin():
        await session.execute(update(Tenant).where(Tenant.id == "newco").values(stripe_customer_id="cus_newco"))
    again = await worker.run_once()
    assert (again.requeued, again.sent) == (1, 1)
    assert env.emulator.totals("cus_newco", "api_calls") == 7
    assert (await sync_state(env.redis, env.sessions, now=env.clock()))["parked"] == []


async def test_too_old_bucket_is_parked(env: Env) -> None:
    old = NOW - 36 * DAY
    await env.bill("acme", old, "api_calls", 5)
    env.counted[("acme", "api_calls")] -= 5
    result = await env.worker().run_once()
    assert (result.parked, result.sent) == (1, 0)
    assert env.emulator.events == [] and env.emulator.requests["meter_events"] == 0
    state = await sync_state(env.redis, env.sessions, now=NOW)
    assert state["parked"][0]["reason"] == "too_old"


async def test_permanent_stripe_error_parks_and_requeue(env: Env) -> None:
    await env.bill("acme", NOW - 2 * BUCKET, "api_calls", 4)
    env.emulator.fail_next(1, 400, code="parameter_invalid", message="Nope.")
    worker = env.worker()
    assert (await worker.run_once()).parked == 1
    [row] = await env.rows()
    assert row.state == "parked" and row.last_error.startswith("rejected:")
    assert await requeue_parked(env.sessions, reason="rejected") == 1
    assert (await worker.run_once()).sent == 1
    env.assert_exact()


def test_classify_duplicate_by_message_only() -> None:
    import stripe

    err = stripe.InvalidRequestError("An event already exists with identifier x.", None, http_status=400)
    assert classify(err).outcome is Outcome.DUPLICATE
    assert classify(stripe.InvalidRequestError("bad", None, http_status=404)).outcome is Outcome.PARK
    assert classify(stripe.APIConnectionError("reset")).outcome is Outcome.RETRY


# -- modes and transports -----------------------------------------------------------------------------------


async def test_dry_run_previews_and_live_sends_later(env: Env) -> None:
    await env.usage(buckets=2)
    sent_before = _sample("billing_sync_events_sent_total", meter="api_calls")
    worker = env.worker(mode="dry_run", api_key=None)
    assert isinstance(worker.sender, DryRunSender)
    result = await worker.run_once()
    assert result.sent == 0 and result.previewed == result.pending == len(worker.sender.events) > 0
    assert result.complete  # a dry run's --once: everything shown is all it can do
    assert env.emulator.events == [] and sum(env.emulator.requests.values()) == 0
    would = defaultdict(Decimal)
    for event in worker.sender.events:
        tenant = next(t for t, c in TENANTS.items() if c == event.customer)
        would[(tenant, next(m for m in METERS.values() if m.stripe_event == event.event_name).name)] += event.value
    assert {k: v for k, v in would.items()} == {k: v for k, v in env.counted.items() if v}
    rows = await env.rows()
    assert all(r.state == "pending" and r.previewed_at is not None and r.sent_at is None for r in rows)
    state = await sync_state(env.redis, env.sessions, now=env.clock())
    assert state["sent_total"] == 0 and state["previewed"] == len(rows)
    assert _sample("billing_sync_events_sent_total", meter="api_calls") == sent_before

    shown = len(worker.sender.events)
    assert (await worker.run_once()).previewed == len(rows) and len(worker.sender.events) == shown  # once

    env.clock.advance(301)
    live = await env.worker().run_once()  # the key arrived: what the dry run showed is billed now
    assert live.sent == len(rows) and live.pending == 0 and live.complete
    env.assert_exact()
    assert (await sync_state(env.redis, env.sessions, now=env.clock()))["sent_total"] == len(rows)
    assert _sample("billing_sync_events_sent_total", meter="api_calls") - sent_before == 2 * len(TENANTS)


async def test_a_dry_run_keeps_a_bounded_preview_in_memory() -> None:
    """A dry-run `sync` runs for as long as there is no API key: what it keeps of the events it shows is bounded."""
    sender = DryRunSender()
    for batch in range(30):
        events = [MeterEvent(f"id-{batch}-{i}", "api_calls", "cus_x", Decimal(1), NOW) for i in range(500)]
        assert await sender.send(events) == [SENT] * 500
    assert len(sender.events) == DRY_RUN_KEPT < 30 * 500
    assert sender.events[-1].identifier == "id-29-499"  # the newest are kept


async def test_dry_run_then_live_parks_buckets_stripe_no_longer_takes(env: Env) -> None:
    await env.bill("acme", NOW - 34 * DAY, "api_calls", 5)  # within 35 days while in dry run...
    await env.bill("acme", NOW - 2 * BUCKET, "api_calls", 3)
    env.counted[("acme", "api_calls")] -= 5
    assert (await env.worker(mode="dry_run", api_key=None).run_once()).previewed == 2
    env.clock.advance(2 * DAY)  # ...but no longer when the live mode starts
    live = await env.worker().run_once()
    assert (live.sent, live.parked, live.pending) == (1, 1, 0)
    env.assert_exact()
    state = await sync_state(env.redis, env.sessions, now=env.clock())
    assert [(p["bucket_start"], p["reason"]) for p in state["parked"]] == [(NOW - 34 * DAY, "too_old")]


async def test_rate_cap_is_respected(env: Env) -> None:
    for i in range(40):
        await env.bill("acme", NOW - (i + 2) * BUCKET, "api_calls", 1)
    worker = env.worker(max_events_per_second=20, concurrency=8)
    started = time.monotonic()
    result = await worker.run_once()
    elapsed = time.monotonic() - started
    assert result.sent == 40
    assert elapsed >= 1.5  # 39 gaps of 50 ms
    env.assert_exact()


async def test_v2_stream_transport(env: Env) -> None:
    await env.usage(buckets=20)  # more than one batch of 100
    worker = env.worker(transport="v2_stream", concurrency=2)
    assert isinstance(worker.sender, StripeV2StreamSender)
    result = await worker.run_once()
    assert result.pending == 0 and result.sent > 100
    assert {e.via for e in env.emulator.events} == {"v2"}
    assert env.emulator.requests["meter_event_session"] == 1
    assert env.emulator.requests["meter_event_stream"] == -(-result.sent // 100)
    env.assert_exact()


async def test_v2_stream_lost_answer_expired_session_and_partial_duplicates(env: Env) -> None:
    await env.usage(buckets=4)
    env.emulator.idempotency_ttl = 1
    env.emulator.drop_next(1, after_accept=True, endpoint="meter_event_stream")
    worker = env.worker(transport="v2_stream")
    first = await worker.run_once()
    assert first.retried > 0 and len(env.emulator.events) == first.retried  # accepted, answer lost
    # New usage joins the retried batch: the batch holds duplicates and new events.
    env.clock.advance(BUCKET)
    await env.bill("org:beta", NOW - BUCKET, "api_calls", 11)
    env.emulator.expire_sessions()
    second = await worker.run_once()
    assert second.duplicates == first.retried and second.pending == 0
    assert env.emulator.requests["meter_event_session"] == 2
    env.assert_exact()


# -- state and metrics ------------------------------------------------------------------------------------------


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_sync_state_and_metrics(env: Env) -> None:
    await env.usage(buckets=2)
    sent_before = _sample("billing_sync_events_sent_total", meter="api_calls")
    failed_before = _sample("billing_sync_failures_total", reason="server_error")
    env.emulator.fail_next(10_000, 500)
    worker = env.worker()
    result = await worker.run_once()
    state = await sync_state(env.redis, env.sessions, now=NOW + 60)
    assert state["pending"] == result.pending > 0
    assert state["lag_seconds"] == 60 + 3 * BUCKET  # the oldest bucket started at NOW - 3 buckets
    assert _sample("billing_sync_pending_buckets") == result.pending
    assert _sample("billing_sync_failures_total", reason="server_error") - failed_before == result.pending
    assert _sample("billing_sync_lag_seconds") == 3 * BUCKET
    env.emulator.clear_faults()
    env.clock.advance(301)
    await env.drain(worker)
    assert _sample("billing_sync_pending_buckets") == 0 and _sample("billing_sync_lag_seconds") == 0
    assert _sample("billing_sync_last_success_timestamp_seconds") == env.clock()
    assert _sample("billing_sync_events_sent_total", meter="api_calls") - sent_before == 2 * len(TENANTS)
    final = await sync_state(env.redis, env.sessions, now=env.clock())
    assert final["last_run_at"] == env.clock() and final["lag_seconds"] == 0
    assert final["sent_total"] == len(await env.rows())


async def test_worker_from_settings_defaults(env: Env) -> None:
    worker = SyncWorker(redis=env.redis, sessions=env.sessions, meters=METERS,
                        settings=dataclasses.replace(env.settings(), mode="dry_run"), bucket_seconds=BUCKET,
                        grace_seconds=GRACE, sender=DryRunSender(), clock=env.clock)
    assert (await worker.run_once()).sent == 0
