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


async def _move_staged(redis: Redis | RedisCluster, sessions: async_sessionmaker[AsyncSession],
                       meters: Mapping[str, Meter], staging: str, tenant: str, bucket_start: int,
                       bucket_seconds: int, created_at: datetime, *, fresh: bool) -> None:
    """Ledger rows for a staged bucket, then its debits (and late units) carried on, then it goes.

    `fresh`: staged by this pass. A row that exists already then means units written after the bucket was
    billed (a late write); they are carried into the next bucket instead of being lost. A staging key left
    by an interrupted pass is not fresh: its rows may have been committed just before the interruption.
    """
    raw = await redis.hgetall(staging)
    rows: list[dict[str, Any]] = []
    debits: list[Any] = []
    for field, raw_value in raw.items():
        name = field.decode() if isinstance(field, bytes) else str(field)
        meter = meters.get(name)
        value = _decimal(raw_value)
        if value is None:
            log.error("bucket %s: meter %s holds %r, not a number; not billed", staging, name, raw_value)
            continue
        if value < 0:
            # A refund that arrived after its own bucket closed: taken off the tenant's next bucket.
            debits += [name, int(value)]
            continue
        if meter is not None and meter.stripe_event is None:
            continue
        # A counter's empty bucket is not sent. A gauge field exists only when the upstream reported it,
        # and its Stripe meter keeps the last value: a drop to 0 must reach Stripe too.
        if value == 0 and (meter is None or meter.kind == "counter"):
            continue
        rows.append({
            "tenant_id": tenant, "meter": name, "bucket_start": bucket_datetime(bucket_start),
            "value": value, "kind": meter.kind if meter is not None else "counter", "state": "pending",
            "identifier": bucket_identifier(tenant, name, bucket_start), "attempts": 0,
            "created_at": created_at,
        })
    if rows:
        async with sessions() as session, session.begin():
            if fresh:
                billed = set((await session.scalars(select(LedgerEntry.identifier).where(
                    LedgerEntry.identifier.in_([row["identifier"] for row in rows])))).all())
                for row in [r for r in rows if r["identifier"] in billed]:
                    rows.remove(row)
                    if row["kind"] == "counter":
                        debits += [row["meter"], int(row["value"])]  # late units: billed with the next bucket
                    log.warning("bucket %s of %s: %s %s arrived after it was billed; carried to the next bucket",
                                bucket_start, tenant, row["value"], row["meter"])
            if rows:
                await session.execute(_insert_ignoring_conflicts(session, rows))
    # Durable first: the staged hash goes only after the rows are committed.
    next_bucket = keys.bucket_key(tenant, bucket_start + bucket_seconds)
    await redis.eval(_CARRY_AND_DELETE, 2, staging, next_bucket, *debits)


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
    for key, (tenant, bucket_start) in ordered:
        # One mover per bucket at a time, even with two workers and no leader lock: the ledger's
        # "already billed" test below must not see the other mover's rows.
        lock, token = key + LOCK_SUFFIX, secrets.token_hex(8)
        if not await redis.set(lock, token, nx=True, px=BUCKET_LOCK_MS):
            continue
        try:
            staging = key + STAGING_SUFFIX
            # Left by an interrupted pass: finish it first, since RENAME would overwrite it.
            if await redis.exists(staging):
                await _move_staged(redis, sessions, meters, staging, tenant, bucket_start, bucket_seconds,
                                   created_at, fresh=False)
            try:
                # RENAME first: a write racing the move (a late record, a spool replay) then creates a new
                # key that the next pass moves, instead of being deleted with this one unseen.
                await redis.rename(key, staging)
            except ResponseError:  # no such key: it was only staged, or another mover took it
                continue
            await _move_staged(redis, sessions, meters, staging, tenant, bucket_start, bucket_seconds, created_at,
                               fresh=True)
            moved += 1
        finally:
            await redis.eval(_RELEASE_LOCK, 1, lock, token)
    return moved
