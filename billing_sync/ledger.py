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

Buckets move in groups (`MOVE_GROUP`) as the scan finds them: each step above is one batch of Redis
commands for the whole group (`billing_sync.redis_batches`) and the group's rows one transaction
(`billing_sync.staged`, the SQL side), while each bucket still goes through the steps in this order.
Bucket keys, identifiers and carry targets are pure functions: `billing_sync.buckets`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from billing_sync.buckets import BUCKET_PATTERN, parse_bucket_key
from billing_sync.redis_batches import RedisBatches, as_hash
from billing_sync.staged import Plan, Staged, commit_rows, plan_moves, split_rows
from metering.clock import utc
from metering.errors import REDIS_ERRORS
from metering.meters import Meter
from metering.tasks import cancel_and_wait

log = logging.getLogger("cosmos_gateway.billing_sync")

_SCAN_COUNT = 1000
STAGING_SUFFIX = ":moving"  # same hash tag as the bucket: one slot, so RENAME works in a cluster
LOCK_SUFFIX = ":lock"
PLAN_FIELD = "~plan"  # never a meter name ([a-z0-9_]): the mover's decisions, kept inside the staged hash
MOVE_GROUP = 500  # buckets per ledger transaction, and per Redis pipeline of each step of a move
BUCKET_LOCK_MS = 60_000  # a mover that dies holding it is replaced after this; a live one renews it
CARRY_TTL_SECONDS = 604_800
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


@dataclass(frozen=True)
class MoveResult:
    moved: int = 0  # buckets moved into the ledger (deleted from Redis)
    held: int = 0  # closed buckets left in Redis: another mover holds their lock


async def _store_plans(batches: RedisBatches, items: list[Staged]) -> list[Staged]:
    """Write the plans into the staged hashes (one batch); returns the items this mover still owns."""
    owned, storing = [], []
    for item in items:
        assert item.plan is not None
        # A plan read back from the staged hash is the one an interrupted pass may have committed by: kept. Any
        # other is stored (over an unreadable one too), or a crash after the commit would plan again and take
        # the committed rows for billed ones: their units would be carried, billed twice.
        if item.plan_stored:
            owned.append(item)
        else:
            storing.append(item)
    replies = await batches.run_checked([("EVAL", _SET_PLAN, 2, item.staging, item.lock, item.token, PLAN_FIELD,
                                          item.plan.dump()) for item in storing if item.plan is not None])
    for item, stored in zip(storing, replies, strict=True):
        if stored:
            owned.append(item)
        else:
            log.warning("bucket %s of %s: lock lost before the plan was stored; left to its new mover",
                        item.bucket_start, item.tenant)
    return owned


async def _carry_and_delete(batches: RedisBatches, items: list[Staged], meters: Mapping[str, Meter],
                            created_at: datetime) -> list[Staged]:
    """Forget the staged buckets, carrying their leftovers where the plans say so (one batch, a script per
    bucket); returns those forgotten, not those whose lock was lost."""
    commands = []
    for item in items:
        assert item.plan is not None
        _, leftovers = split_rows(item, meters, created_at)  # as the commit split it (kept with the item)
        carried: list[Any] = []
        if item.plan.target is not None:
            for name, units in leftovers.items():
                carried += [name, units]
        target = _sibling(item.staging, item.plan.target if item.plan.target is not None else item.bucket_start)
        commands.append(("EVAL", _CARRY_AND_DELETE, 3, item.staging, target, item.lock, item.token,
                         CARRY_TTL_SECONDS, *carried))
    done = []
    for item, forgotten in zip(items, await batches.run_checked(commands), strict=True):
        if forgotten:
            done.append(item)
        else:
            log.warning("bucket %s of %s: lock lost before the move finished; left to its new mover",
                        item.bucket_start, item.tenant)
    return done


def _no_such_key(error: ResponseError) -> bool:
    """RENAME's answer for a missing source key ("ERR no such key"; redis-py drops the "ERR ")."""
    return str(error).removeprefix("ERR ").startswith("no such key")


def _sibling(staging: str, bucket_start: int) -> str:
    """The key of the tenant's bucket at `bucket_start`, from a staged key of the tenant: the same string as
    `keys.bucket_key`, without filling its per-tenant cache with every tenant of a large pass."""
    live = staging[: -len(STAGING_SUFFIX)]
    return f"{live[: live.rindex(':b:') + 3]}{bucket_start}"


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

    Buckets are moved in groups as the scan finds them, so memory stays flat however many tenants there
    are: no list of every closed bucket is built. SCAN may name a key twice, and names a bucket once as
    itself and once as its staged copy: a bucket met again finds nothing left to move (RENAME fails), or
    only a late write, which is moved as it should be.
    """
    if limit is not None and limit <= 0:
        return MoveResult()
    batches = RedisBatches(redis)
    try:
        return await _move_all(redis, _Mover(batches, sessions, meters, now, bucket_seconds, lock_ms), now=now,
                               bucket_seconds=bucket_seconds, grace_seconds=grace_seconds, limit=limit)
    finally:
        batches.close()


async def _move_all(redis: Redis | RedisCluster, mover: _Mover, *, now: float, bucket_seconds: int,
                    grace_seconds: int, limit: int | None) -> MoveResult:
    moved = held = 0
    left = limit  # None: no cap
    group: dict[str, tuple[str, int]] = {}  # live key -> (tenant, bucket start)
    async for key in scan_bucket_keys(redis):
        staged = key.endswith(STAGING_SUFFIX)
        live_key = key[: -len(STAGING_SUFFIX)] if staged else key
        parsed = parse_bucket_key(live_key)
        if parsed is None:
            continue
        tenant, bucket_start = parsed
        # A staged bucket was being moved when a pass stopped: finish it whatever the time.
        if staged or now >= bucket_start + bucket_seconds + grace_seconds:
            group[live_key] = (tenant, bucket_start)
        if len(group) >= MOVE_GROUP or (left is not None and len(group) >= left):
            group_moved, group_held = await mover.move_group(sorted(group.items(), key=_by_start))
            moved, held = moved + group_moved, held + group_held
            if left is not None:
                left -= len(group)
                if left <= 0:
                    return MoveResult(moved, held)
            group = {}
    if group:
        group_moved, group_held = await mover.move_group(sorted(group.items(), key=_by_start))
        moved, held = moved + group_moved, held + group_held
    return MoveResult(moved, held)


def _by_start(item: tuple[str, tuple[str, int]]) -> int:
    return item[1][1]


class _Mover:
    """One pass's mover: takes the bucket locks (and keeps them renewed), stages, plans, commits, forgets.

    Each step is one batch of Redis commands for the whole group, so a group of buckets costs a handful of
    round trips, not several per bucket; every bucket still goes through the same commands in the same order.
    """

    def __init__(self, batches: RedisBatches, sessions: async_sessionmaker[AsyncSession],
                 meters: Mapping[str, Meter], now: float, bucket_seconds: int, lock_ms: int) -> None:
        self._batches = batches
        self._sessions = sessions
        self._meters = meters
        self._now = now
        self._bucket_seconds = bucket_seconds
        self._lock_ms = lock_ms
        self._created_at = utc(now)

    async def move_group(self, group: list[tuple[str, tuple[str, int]]]) -> tuple[int, int]:
        locks: dict[str, str] = {}  # this group's bucket locks: lock key -> token
        renewer = asyncio.create_task(self._renew(locks))
        try:
            return await self._move_group(group, locks)
        finally:
            await cancel_and_wait([renewer])
            with contextlib.suppress(*REDIS_ERRORS):  # a lock not released expires on its own
                await self._batches.run([("EVAL", RELEASE_LOCK, 1, lock, token) for lock, token in locks.items()])

    async def _move_group(self, group: list[tuple[str, tuple[str, int]]],
                          locks: dict[str, str]) -> tuple[int, int]:
        # One mover per bucket at a time, even with two workers and no leader lock: the "already billed"
        # test of the plan must not see the other mover's rows. EXISTS runs after the SET on the same
        # connection, so when the lock is ours it says whether an interrupted pass left the bucket staged.
        tokens = [secrets.token_hex(8) for _ in group]
        commands: list[tuple[Any, ...]] = []
        for (key, _), token in zip(group, tokens, strict=True):
            commands += [("SET", key + LOCK_SUFFIX, token, "NX", "PX", self._lock_ms), ("EXISTS", key + STAGING_SUFFIX)]
        replies = await self._batches.run_checked(commands)
        locked: list[Staged] = []
        leftovers: list[Staged] = []
        held = 0
        for i, (key, (tenant, bucket_start)) in enumerate(group):
            if not replies[2 * i]:
                held += 1
                continue
            item = Staged(key + STAGING_SUFFIX, key + LOCK_SUFFIX, tokens[i], tenant, bucket_start, {})
            locks[item.lock] = item.token
            locked.append(item)
            if replies[2 * i + 1]:
                leftovers.append(item)
        moved = 0
        if leftovers:  # left by an interrupted pass: finished first, as RENAME would overwrite them
            hashes = await self._batches.run_checked([("HGETALL", item.staging) for item in leftovers])
            for item, raw in zip(leftovers, hashes, strict=True):
                item.raw = as_hash(raw)
                item.plan = Plan.load(item.raw.get(PLAN_FIELD.encode(), item.raw.get(PLAN_FIELD)))
                item.plan_stored = item.plan is not None  # an unreadable plan is replaced, before the commit
            finished = await self._finish(leftovers)
            moved += len(finished)
            lost = {id(item) for item in leftovers} - {id(item) for item in finished}
            locked = [item for item in locked if id(item) not in lost]  # no longer ours to stage

        # RENAME first: a write racing the move (a late record, a spool replay) then creates a new key that
        # the next pass moves, instead of being deleted with this one unseen.
        commands = []
        for item in locked:
            commands += [("RENAME", item.staging[: -len(STAGING_SUFFIX)], item.staging), ("HGETALL", item.staging)]
        replies = await self._batches.run(commands)
        staged = []
        for i, item in enumerate(locked):
            renamed, raw = replies[2 * i], replies[2 * i + 1]
            if isinstance(renamed, ResponseError):
                if _no_such_key(renamed):  # it was only staged, or another mover took it
                    continue
                # Refused (READONLY after a failover, an ACL, ...): the bucket is still in Redis, and the pass
                # must not report it moved or absent.
                raise renamed
            if isinstance(raw, ResponseError):
                raise raw
            staged.append(Staged(item.staging, item.lock, item.token, item.tenant, item.bucket_start, as_hash(raw)))
        return moved + len(await self._finish(staged)), held

    async def _finish(self, items: list[Staged]) -> list[Staged]:
        """Plan, store the plans, commit the rows, then forget the staged hashes: durable first.

        Returns the items forgotten; the others' locks were lost, and their buckets with them."""
        if not items:
            return []
        await plan_moves(self._sessions, items, self._meters, self._now, self._bucket_seconds)
        owned = await _store_plans(self._batches, items)
        await commit_rows(self._sessions, owned, self._meters, self._created_at)
        return await _carry_and_delete(self._batches, owned, self._meters, self._created_at)

    async def _renew(self, held: dict[str, str]) -> None:
        """Keep a group's bucket locks while it is still being moved (a slow database)."""
        while True:
            await asyncio.sleep(self._lock_ms / 3000)
            locks = list(held.items())
            if not locks:
                continue
            try:
                renewed = await self._batches.run_checked(
                    [("EVAL", RENEW_LOCK, 1, lock, token, self._lock_ms) for lock, token in locks])
            except REDIS_ERRORS as exc:
                log.warning("cannot renew %d bucket locks: %r", len(locks), exc)
                continue
            for (lock, _), ok in zip(locks, renewed, strict=True):
                if not ok:
                    log.warning("bucket lock %s lost during a move", lock)
