"""Closed billing buckets, from Redis into the SQL usage ledger (PRODUCT.md §8).

A bucket `gw:{t:<tenant>}:b:<epoch>` is a Redis hash meter -> value, written by the gateway until the
bucket closes (`bucket_start + bucket_seconds`) and never after. Once it is also past the grace for
in-flight requests, `move_closed_buckets` copies its billed meters into `usage_ledger` and commits, and
only then deletes the hash: the SQL row is durable before Redis forgets. A crash between the commit and
the DEL moves the bucket again on the next pass; the insert ignores rows already there, so nothing doubles.

The identifier sent to Stripe (`bucket_identifier`) is a pure function of tenant, meter and bucket start,
so every retry and every worker names a bucket the same way and Stripe deduplicates it.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import unquote

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError
from sqlalchemy import insert as generic_insert
from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from metering import keys
from metering.meters import Meter
from metering.models import LedgerEntry

log = logging.getLogger("cosmos_gateway.billing_sync")

BUCKET_PATTERN = f"{keys.PREFIX}:{{t:*}}:b:*"  # SCAN MATCH; '{' and '}' are not glob characters
_BUCKET_KEY = re.compile(r"gw:\{t:([^}]+)\}:b:(-?[0-9]+)")
_SCAN_COUNT = 1000
_VALUE_PLACES = Decimal("0.000001")  # usage_ledger.value is NUMERIC(20, 6)
IDENTIFIER_VERSION = "cg1"


def parse_bucket_key(key: str | bytes) -> tuple[str, int] | None:
    """(tenant, bucket_start) of a key written by `keys.bucket_key`, or None for any other key.

    The tag holds the tenant as it is, or percent-encoded when it has characters outside
    [A-Za-z0-9._:-] (keys.tenant_slot_tag); '%' is itself encoded there, so unquoting is exact.
    """
    text = key.decode() if isinstance(key, bytes) else key
    match = _BUCKET_KEY.fullmatch(text)
    if match is None:
        return None
    tag, epoch = match.groups()
    tenant = unquote(tag, errors="strict") if "%" in tag else tag
    if keys.bucket_key(tenant, int(epoch)) != text:  # not our encoding: someone else's key
        return None
    return tenant, int(epoch)


def bucket_identifier(tenant: str, meter: str, bucket_start: int) -> str:
    """The Stripe meter event identifier of one bucket: stable forever, at most 100 characters.

    `cg1_<meter[:24]>_<bucket_start>_<sha256(tenant NUL meter NUL bucket_start)[:40]>`: the readable part
    helps a human in the Stripe dashboard, the digest (160 bits) makes it unique. Changing this function
    re-bills every bucket still inside Stripe's 24 h uniqueness window: bump the version instead.
    """
    digest = hashlib.sha256(f"{tenant}\0{meter}\0{bucket_start}".encode()).hexdigest()[:40]
    return f"{IDENTIFIER_VERSION}_{meter[:24]}_{bucket_start}_{digest}"


def bucket_datetime(bucket_start: int) -> datetime:
    return datetime.fromtimestamp(bucket_start, UTC)


def _decimal(raw: Any) -> Decimal | None:
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    try:
        value = Decimal(text)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    return value.quantize(_VALUE_PLACES)


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


STAGING_SUFFIX = ":moving"  # same hash tag as the bucket: one slot, so RENAME works in a cluster
LOCK_SUFFIX = ":lock"
MOVE_GROUP = 200  # buckets per ledger transaction
BUCKET_LOCK_MS = 60_000  # a mover that dies holding it is replaced after this
_RELEASE_LOCK = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
# Carries a bucket's debits (late refunds) into the next bucket and forgets the staged bucket, atomically,
# so an interrupted pass never carries them twice.
_CARRY_AND_DELETE = """
for i = 1, #ARGV - 1, 2 do
  redis.call('HINCRBY', KEYS[2], ARGV[i], ARGV[i + 1])
end
if #ARGV > 0 then redis.call('EXPIRE', KEYS[2], 604800) end
redis.call('DEL', KEYS[1])
return 1
"""


@dataclass
class _Staged:
    """One staged bucket on its way into the ledger."""

    staging: str
    tenant: str
    bucket_start: int
    fresh: bool  # staged by this pass; False: left by an interrupted one
    rows: list[dict[str, Any]]
    debits: list[Any]


def _rows_of(staged: _Staged, raw: Mapping[Any, Any], meters: Mapping[str, Meter], created_at: datetime) -> None:
    for field, raw_value in raw.items():
        name = field.decode() if isinstance(field, bytes) else str(field)
        meter = meters.get(name)
        value = _decimal(raw_value)
        if value is None:
            log.error("bucket %s: meter %s holds %r, not a number; not billed", staged.staging, name, raw_value)
            continue
        if value < 0:
            # A refund that arrived after its own bucket closed: taken off the tenant's next bucket.
            staged.debits += [name, int(value)]
            continue
        if meter is not None and meter.stripe_event is None:
            continue
        # A counter's empty bucket is not sent. A gauge field exists only when the upstream reported it,
        # and its Stripe meter keeps the last value: a drop to 0 must reach Stripe too.
        if value == 0 and (meter is None or meter.kind == "counter"):
            continue
        staged.rows.append({
            "tenant_id": staged.tenant, "meter": name, "bucket_start": bucket_datetime(staged.bucket_start),
            "value": value, "kind": meter.kind if meter is not None else "counter", "state": "pending",
            "identifier": bucket_identifier(staged.tenant, name, staged.bucket_start), "attempts": 0,
            "created_at": created_at,
        })


async def _commit(sessions: async_sessionmaker[AsyncSession], group: list[_Staged]) -> None:
    """The group's ledger rows in one transaction (one fsync for many buckets).

    For a fresh bucket, a row that exists already means units written after the bucket was billed (a late
    write): they are carried into the next bucket instead of being lost. A staging key left by an
    interrupted pass is not fresh: its rows may have been committed just before the interruption.
    """
    if not any(staged.rows for staged in group):
        return
    fresh_ids = [row["identifier"] for staged in group if staged.fresh for row in staged.rows]
    async with sessions() as session, session.begin():
        billed: set[str] = set()
        for i in range(0, len(fresh_ids), 500):
            billed |= set((await session.scalars(select(LedgerEntry.identifier).where(
                LedgerEntry.identifier.in_(fresh_ids[i : i + 500])))).all())
        rows = []
        for staged in group:
            for row in staged.rows:
                if staged.fresh and row["identifier"] in billed:
                    if row["kind"] == "counter":
                        staged.debits += [row["meter"], int(row["value"])]  # late units: with the next bucket
                    log.warning("bucket %s of %s: %s %s arrived after it was billed; carried to the next bucket",
                                staged.bucket_start, staged.tenant, row["value"], row["meter"])
                else:
                    rows.append(row)
        for i in range(0, len(rows), 500):
            await session.execute(_insert_ignoring_conflicts(session, rows[i : i + 500]))


async def move_closed_buckets(
    redis: Redis | RedisCluster,
    sessions: async_sessionmaker[AsyncSession],
    meters: Mapping[str, Meter],
    *,
    now: float,
    bucket_seconds: int,
    grace_seconds: int,
    limit: int | None = None,
) -> int:
    """Move every closed bucket into the ledger; returns the buckets moved (deleted from Redis).

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

    moved = 0
    created_at = datetime.fromtimestamp(now, UTC)
    for first in range(0, len(ordered), MOVE_GROUP):
        moved += await _move_group(redis, sessions, meters, ordered[first : first + MOVE_GROUP], bucket_seconds,
                                   created_at)
    return moved


async def _move_group(redis: Redis | RedisCluster, sessions: async_sessionmaker[AsyncSession],
                      meters: Mapping[str, Meter], group: list[tuple[str, tuple[str, int]]], bucket_seconds: int,
                      created_at: datetime) -> int:
    locks: list[tuple[str, str]] = []
    staged: list[_Staged] = []
    moved = 0
    try:
        for key, (tenant, bucket_start) in group:
            # One mover per bucket at a time, even with two workers and no leader lock: the "already
            # billed" test of `_commit` must not see the other mover's rows.
            lock, token = key + LOCK_SUFFIX, secrets.token_hex(8)
            if not await redis.set(lock, token, nx=True, px=BUCKET_LOCK_MS):
                continue
            locks.append((lock, token))
            staging = key + STAGING_SUFFIX
            if await redis.exists(staging):  # left by an interrupted pass: RENAME would overwrite it
                leftover = _Staged(staging, tenant, bucket_start, False, [], [])
                _rows_of(leftover, await redis.hgetall(staging), meters, created_at)
                await _commit(sessions, [leftover])
                await _carry_and_delete(redis, leftover, bucket_seconds)
            try:
                # RENAME first: a write racing the move (a late record, a spool replay) then creates a new
                # key that the next pass moves, instead of being deleted with this one unseen.
                await redis.rename(key, staging)
            except ResponseError:  # no such key: it was only staged, or another mover took it
                continue
            item = _Staged(staging, tenant, bucket_start, True, [], [])
            _rows_of(item, await redis.hgetall(staging), meters, created_at)
            staged.append(item)
        await _commit(sessions, staged)
        # Durable first: the staged hashes go only after their rows are committed.
        for item in staged:
            await _carry_and_delete(redis, item, bucket_seconds)
            moved += 1
    finally:
        for lock, token in locks:
            await redis.eval(_RELEASE_LOCK, 1, lock, token)
    return moved


async def _carry_and_delete(redis: Redis | RedisCluster, staged: _Staged, bucket_seconds: int) -> None:
    next_bucket = keys.bucket_key(staged.tenant, staged.bucket_start + bucket_seconds)
    await redis.eval(_CARRY_AND_DELETE, 2, staged.staging, next_bucket, *staged.debits)
