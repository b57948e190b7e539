"""Closed billing buckets, from Redis into the SQL usage ledger (PRODUCT.md §8).

A bucket `gw:{t:<tenant>}:b:<epoch>` is a Redis hash meter -> value, written by the gateway until the
bucket closes (`bucket_start + bucket_seconds`) and never after. Once it is also past the grace for
in-flight requests, `move_closed_buckets` moves it, under a per-bucket lock that the mover renews:

    RENAME bucket -> bucket:moving      a late write now creates a new key, moved by a later pass
    plan, HSET into bucket:moving        which units are late (their row exists), where leftovers go
    commit the rows (SQL)                inserts ignore rows already there
    carry leftovers + DEL bucket:moving  one script, fenced by the lock

A crash anywhere leaves the staged hash with or without its plan; the next pass repeats the same plan,
so nothing doubles and nothing vanishes. Leftovers (refunds that arrived after their bucket was billed,
late units) are netted in a later bucket of the same billing period only; at the period's end they
become rows of their own: late units are billed, refunds that could not be netted are parked.

Bucket keys, identifiers and carry targets are pure functions: `billing_sync.buckets`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError
from sqlalchemy import insert as generic_insert
from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from billing_sync.buckets import (
    BUCKET_PATTERN,
    bucket_datetime,
    bucket_identifier,
    carry_target,
    leftover_identifier,
    parse_bucket_key,
    parse_bucket_value,
)
from metering import keys
from metering.clock import utc
from metering.errors import REDIS_ERRORS
from metering.meters import Meter
from metering.models import LedgerEntry, Tenant
from metering.tasks import cancel_and_wait

log = logging.getLogger("cosmos_gateway.billing_sync")

_SCAN_COUNT = 1000
STAGING_SUFFIX = ":moving"  # same hash tag as the bucket: one slot, so RENAME works in a cluster
LOCK_SUFFIX = ":lock"
PLAN_FIELD = "~plan"  # never a meter name ([a-z0-9_]): the mover's decisions, kept inside the staged hash
MOVE_GROUP = 200  # buckets per ledger transaction
BUCKET_LOCK_MS = 60_000  # a mover that dies holding it is replaced after this; a live one renews it
CARRY_TTL_SECONDS = 604_800
REFUND_NOT_NETTED = "refund_not_netted"
# Compare-and-delete / compare-and-extend: only the holder's token touches the lock (the bucket locks here,
# the worker's leader lock too).
RELEASE_LOCK = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
RENEW_LOCK = ("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end "
              "return 0")
# Writes the plan into the staged hash, fenced: a mover whose lock expired (and maybe passed to another
# mover) must not decide for a bucket it no longer owns.
_SET_PLAN = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] or redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
return 1
"""
# Carries a bucket's leftovers (late refunds, late units) into a later bucket and forgets the staged bucket,
# atomically, so an interrupted pass never carries them twice; fenced by the bucket lock, so a mover that
# stalled past its lock cannot carry what the mover that took over has carried already.
_CARRY_AND_DELETE = """
if redis.call('GET', KEYS[3]) ~= ARGV[1] or redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
for i = 3, #ARGV - 1, 2 do
  redis.call('HINCRBY', KEYS[2], ARGV[i], ARGV[i + 1])
end
if #ARGV > 2 then redis.call('EXPIRE', KEYS[2], ARGV[2]) end
redis.call('DEL', KEYS[1])
return 1
"""


async def scan_bucket_keys(redis: Redis | RedisCluster) -> AsyncIterator[str]:
    """Every bucket key; a RedisCluster's `scan_iter` walks every primary."""
    async for key in redis.scan_iter(match=BUCKET_PATTERN, count=_SCAN_COUNT):
        yield key.decode() if isinstance(key, bytes) else key


def _insert_ignoring_conflicts(session: AsyncSession, rows: list[dict[str, Any]]) -> Any:
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return pg_insert(LedgerEntry).values(rows).on_conflict_do_nothing()
    if dialect == "sqlite":
        return sqlite_insert(LedgerEntry).values(rows).on_conflict_do_nothing()
    return generic_insert(LedgerEntry).values(rows)  # other backends: a repeat raises instead


@dataclass(frozen=True)
class MoveResult:
    moved: int = 0  # buckets moved into the ledger (deleted from Redis)
    held: int = 0  # closed buckets left in Redis: another mover holds their lock


@dataclass
class _Plan:
    """What a mover decided for one staged bucket, stored with it before the ledger commit.

    A pass interrupted after the commit finds the plan and repeats exactly the same work: the rows are
    inserted ignoring conflicts, the leftovers go where they were meant to go, nothing vanishes or doubles.
    """

    billed: list[str]  # meters whose row was in the ledger before this staging: their units are late
    target: int | None  # bucket the leftovers are carried into; None: the period ends, they become rows
    slot: int  # microsecond offset of the leftover rows from the bucket start (never a real bucket's start)

    def dump(self) -> str:
        return json.dumps({"billed": self.billed, "target": self.target, "slot": self.slot})

    @classmethod
    def load(cls, raw: Any) -> _Plan | None:
        try:
            data = json.loads(raw)
            return cls(list(data["billed"]), data["target"], int(data["slot"]))
        except (TypeError, ValueError, KeyError):
            return None


@dataclass
class _Staged:
    """One staged bucket on its way into the ledger."""

    staging: str
    lock: str
    token: str
    tenant: str
    bucket_start: int
    raw: dict[str, Any]
    plan: _Plan | None = None


def _fields(staged: _Staged, meters: Mapping[str, Meter]) -> list[tuple[str, Meter | None, Decimal]]:
    """(meter name, meter, value) of the staged bucket's fields that may be billed."""
    out = []
    for field, raw_value in staged.raw.items():
        name = field.decode() if isinstance(field, bytes) else str(field)
        if name.startswith("~"):
            continue
        meter = meters.get(name)
        if meter is not None and meter.stripe_event is None:
            continue  # not billed: leaves with the bucket, refunds included
        value = parse_bucket_value(raw_value)
        if value is None:
            log.error("bucket %s: meter %s holds %r, not a number; not billed", staged.staging, name, raw_value)
            continue
        out.append((name, meter, value))
    return out


def _split(staged: _Staged, meters: Mapping[str, Meter],
           created_at: datetime) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The staged bucket's new ledger rows, and its leftovers (meter -> units) to net in a later bucket."""
    assert staged.plan is not None
    rows: list[dict[str, Any]] = []
    leftovers: dict[str, int] = {}
    for name, meter, value in _fields(staged, meters):
        kind = meter.kind if meter is not None else "counter"
        if value < 0:
            # A refund that arrived after its own bucket closed: netted against a later bucket.
            leftovers[name] = leftovers.get(name, 0) + int(value)
            continue
        if name in staged.plan.billed:
            if kind == "counter" and value:
                leftovers[name] = leftovers.get(name, 0) + int(value)  # late units: with a later bucket
            log.warning("bucket %s of %s: %s %s arrived after it was billed; %s", staged.bucket_start, staged.tenant,
                        value, name, "carried" if kind == "counter" else "a gauge keeps its billed value")
            continue
        # A counter's empty bucket is not sent. A gauge field exists only when the upstream reported it,
        # and its Stripe meter keeps the last value: a drop to 0 must reach Stripe too.
        if value == 0 and kind == "counter":
            continue
        rows.append({
            "tenant_id": staged.tenant, "meter": name, "bucket_start": bucket_datetime(staged.bucket_start),
            "value": value, "kind": kind, "state": "pending",
            "identifier": bucket_identifier(staged.tenant, name, staged.bucket_start), "attempts": 0,
            "created_at": created_at, "last_error": None,  # every row names the same columns: one multi-row INSERT
        })
    return rows, {name: units for name, units in leftovers.items() if units}


def _leftover_rows(staged: _Staged, leftovers: Mapping[str, int], created_at: datetime) -> list[dict[str, Any]]:
    """Leftovers the period could not net, as rows of that period: late units are billed, refunds parked."""
    assert staged.plan is not None and staged.plan.target is None
    at = bucket_datetime(staged.bucket_start) + timedelta(microseconds=staged.plan.slot)
    rows = []
    for name, units in leftovers.items():
        refund = units < 0
        rows.append({
            "tenant_id": staged.tenant, "meter": name, "bucket_start": at, "value": Decimal(units),
            "kind": "counter", "state": "parked" if refund else "pending",
            "identifier": leftover_identifier(staged.tenant, name, staged.bucket_start, staged.plan.slot),
            "attempts": 0, "created_at": created_at,
            "last_error": f"{REFUND_NOT_NETTED}: {-units} refunded after the period's usage was billed; "
                          "Stripe takes no negative usage (credit the customer)" if refund else None,
        })
        log.warning("bucket %s of %s: %s %s left at the end of the billing period: %s", staged.bucket_start,
                    staged.tenant, units, name, "parked" if refund else "billed on its own")
    return rows


async def _plan(sessions: async_sessionmaker[AsyncSession], items: list[_Staged], meters: Mapping[str, Meter],
                now: float, bucket_seconds: int) -> None:
    """Decide, for the items without a plan, which units are late and where leftovers go (one read)."""
    todo = [item for item in items if item.plan is None]
    if not todo:
        return
    wanted = {bucket_identifier(item.tenant, name, item.bucket_start): item
              for item in todo for name, _, _ in _fields(item, meters)}
    async with sessions() as session:
        billed: set[str] = set()
        ids = list(wanted)
        for i in range(0, len(ids), 500):
            billed |= set((await session.scalars(select(LedgerEntry.identifier).where(
                LedgerEntry.identifier.in_(ids[i : i + 500])))).all())
        tenants = list({item.tenant for item in todo})
        anchors = dict((await session.execute(select(Tenant.id, Tenant.billing_anchor_day).where(
            Tenant.id.in_(tenants)))).tuples().all())
        for item in todo:
            names = [name for name, _, _ in _fields(item, meters)]
            target = carry_target(item.bucket_start, bucket_seconds, now, anchors.get(item.tenant))
            slot = 1 if target is not None else await _free_slot(session, item)
            item.plan = _Plan([n for n in names if bucket_identifier(item.tenant, n, item.bucket_start) in billed],
                              target, slot)


async def _free_slot(session: AsyncSession, item: _Staged) -> int:
    """A microsecond offset within the bucket's first second that no leftover row of the tenant uses yet."""
    start = bucket_datetime(item.bucket_start)
    taken = (await session.scalars(select(LedgerEntry.bucket_start).where(
        LedgerEntry.tenant_id == item.tenant, LedgerEntry.bucket_start > start,
        LedgerEntry.bucket_start < start + timedelta(seconds=1)))).all()
    return 1 + max((at.microsecond for at in taken), default=0)


async def _commit(sessions: async_sessionmaker[AsyncSession], items: list[_Staged], meters: Mapping[str, Meter],
                  created_at: datetime) -> None:
    """The items' ledger rows in one transaction (one fsync for many buckets), ignoring rows already there.

    Every decision was taken by the plan, so committing again after an interruption adds nothing.
    """
    rows: list[dict[str, Any]] = []
    for item in items:
        new, leftovers = _split(item, meters, created_at)
        rows += new
        if item.plan is not None and item.plan.target is None:
            rows += _leftover_rows(item, leftovers, created_at)
    if not rows:
        return
    async with sessions() as session, session.begin():
        for i in range(0, len(rows), 500):
            await session.execute(_insert_ignoring_conflicts(session, rows[i : i + 500]))


async def _store_plans(redis: Redis | RedisCluster, items: list[_Staged]) -> list[_Staged]:
    """Write the plans into the staged hashes; returns the items this mover still owns."""
    owned = []
    for item in items:
        assert item.plan is not None
        if PLAN_FIELD.encode() in item.raw or PLAN_FIELD in item.raw:
            owned.append(item)
            continue
        if await redis.eval(_SET_PLAN, 2, item.staging, item.lock, item.token, PLAN_FIELD, item.plan.dump()):
            owned.append(item)
        else:
            log.warning("bucket %s of %s: lock lost before the plan was stored; left to its new mover",
                        item.bucket_start, item.tenant)
    return owned


async def _carry_and_delete(redis: Redis | RedisCluster, item: _Staged, meters: Mapping[str, Meter],
                            created_at: datetime) -> bool:
    """Forget the staged bucket, carrying its leftovers when the plan says so; False if the lock was lost."""
    assert item.plan is not None
    _, leftovers = _split(item, meters, created_at)
    carried: list[Any] = []
    target = keys.bucket_key(item.tenant, item.plan.target if item.plan.target is not None else item.bucket_start)
    if item.plan.target is not None:
        for name, units in leftovers.items():
            carried += [name, units]
    done = await redis.eval(_CARRY_AND_DELETE, 3, item.staging, target, item.lock, item.token, CARRY_TTL_SECONDS,
                            *carried)
    if not done:
        log.warning("bucket %s of %s: lock lost before the move finished; left to its new mover",
                    item.bucket_start, item.tenant)
    return bool(done)


async def move_closed_buckets(
    redis: Redis | RedisCluster,
    sessions: async_sessionmaker[AsyncSession],
    meters: Mapping[str, Meter],
    *,
    now: float,
    bucket_seconds: int,
    grace_seconds: int,
    limit: int | None = None,
    lock_ms: int = BUCKET_LOCK_MS,
) -> MoveResult:
    """Move every closed bucket into the ledger.

    Meters without a `stripe_event`, and counters at 0, are not billed: they leave with the bucket.
    Fields of meters no longer configured are kept as pending rows and parked at send time, so a
    configuration slip is visible rather than dropped. `limit` caps the buckets moved in one call.
    """
    closed: dict[str, tuple[str, int]] = {}
    async for key in scan_bucket_keys(redis):
        staged = key.endswith(STAGING_SUFFIX)
        live_key = key[: -len(STAGING_SUFFIX)] if staged else key
        parsed = parse_bucket_key(live_key)
        if parsed is None:
            continue
        tenant, bucket_start = parsed
        # A staged bucket was being moved when a pass stopped: finish it whatever the time.
        if staged or now >= bucket_start + bucket_seconds + grace_seconds:
            closed[live_key] = (tenant, bucket_start)
    ordered = sorted(closed.items(), key=lambda item: item[1][1])  # oldest first: a capped pass drains in order
    if limit is not None:
        ordered = ordered[:limit]

    moved = held = 0
    mover = _Mover(redis, sessions, meters, now, bucket_seconds, lock_ms)
    for first in range(0, len(ordered), MOVE_GROUP):
        group_moved, group_held = await mover.move_group(ordered[first : first + MOVE_GROUP])
        moved += group_moved
        held += group_held
    return MoveResult(moved, held)


class _Mover:
    """One pass's mover: takes the bucket locks (and keeps them renewed), stages, plans, commits, forgets."""

    def __init__(self, redis: Redis | RedisCluster, sessions: async_sessionmaker[AsyncSession],
                 meters: Mapping[str, Meter], now: float, bucket_seconds: int, lock_ms: int) -> None:
        self._redis = redis
        self._sessions = sessions
        self._meters = meters
        self._now = now
        self._bucket_seconds = bucket_seconds
        self._lock_ms = lock_ms
        self._created_at = utc(now)
        self._locks: dict[str, str] = {}

    async def move_group(self, group: list[tuple[str, tuple[str, int]]]) -> tuple[int, int]:
        renewer = asyncio.create_task(self._renew())
        try:
            return await self._move_group(group)
        finally:
            await cancel_and_wait([renewer])
            for lock, token in self._locks.items():
                with contextlib.suppress(*REDIS_ERRORS):
                    await self._redis.eval(RELEASE_LOCK, 1, lock, token)
            self._locks.clear()

    async def _move_group(self, group: list[tuple[str, tuple[str, int]]]) -> tuple[int, int]:
        staged: list[_Staged] = []
        moved = held = 0
        for key, (tenant, bucket_start) in group:
            # One mover per bucket at a time, even with two workers and no leader lock: the "already
            # billed" test of the plan must not see the other mover's rows.
            lock, token = key + LOCK_SUFFIX, secrets.token_hex(8)
            if not await self._redis.set(lock, token, nx=True, px=self._lock_ms):
                held += 1
                continue
            self._locks[lock] = token
            staging = key + STAGING_SUFFIX
            if await self._redis.exists(staging):  # left by an interrupted pass: RENAME would overwrite it
                leftover = _Staged(staging, lock, token, tenant, bucket_start, await self._redis.hgetall(staging))
                leftover.plan = _Plan.load(leftover.raw.get(PLAN_FIELD.encode(), leftover.raw.get(PLAN_FIELD)))
                moved += await self._finish([leftover])
            try:
                # RENAME first: a write racing the move (a late record, a spool replay) then creates a new
                # key that the next pass moves, instead of being deleted with this one unseen.
                await self._redis.rename(key, staging)
            except ResponseError:  # no such key: it was only staged, or another mover took it
                continue
            staged.append(_Staged(staging, lock, token, tenant, bucket_start, await self._redis.hgetall(staging)))
        return moved + await self._finish(staged), held

    async def _finish(self, items: list[_Staged]) -> int:
        """Plan, store the plans, commit the rows, then forget the staged hashes: durable first."""
        if not items:
            return 0
        await _plan(self._sessions, items, self._meters, self._now, self._bucket_seconds)
        owned = await _store_plans(self._redis, items)
        await _commit(self._sessions, owned, self._meters, self._created_at)
        moved = 0
        for item in owned:
            moved += await _carry_and_delete(self._redis, item, self._meters, self._created_at)
        return moved

    async def _renew(self) -> None:
        """Keep this mover's bucket locks while a slow group (a slow database) is still being moved."""
        while True:
            await asyncio.sleep(self._lock_ms / 3000)
            for lock, token in list(self._locks.items()):
                try:
                    if not await self._redis.eval(RENEW_LOCK, 1, lock, token, self._lock_ms):
                        log.warning("bucket lock %s lost during a move", lock)
                except REDIS_ERRORS as exc:
                    log.warning("cannot renew bucket lock %s: %r", lock, exc)
