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
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import unquote

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from sqlalchemy import insert as generic_insert
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
    closed: list[tuple[str, str, int]] = []
    async for key in scan_bucket_keys(redis):
        parsed = parse_bucket_key(key)
        if parsed is None:
            continue
        tenant, bucket_start = parsed
        if now >= bucket_start + bucket_seconds + grace_seconds:
            closed.append((key, tenant, bucket_start))
    closed.sort(key=lambda item: item[2])  # oldest first: a capped pass still drains in order
    if limit is not None:
        closed = closed[:limit]

    moved = 0
    created_at = datetime.fromtimestamp(now, UTC)
    for key, tenant, bucket_start in closed:
        raw = await redis.hgetall(key)
        rows: list[dict[str, Any]] = []
        for field, raw_value in raw.items():
            name = field.decode() if isinstance(field, bytes) else str(field)
            meter = meters.get(name)
            if meter is not None and meter.stripe_event is None:
                continue
            value = _decimal(raw_value)
            if value is None:
                log.error("bucket %s: meter %s holds %r, not a number; not billed", key, name, raw_value)
                continue
            # A counter's empty bucket is not sent. A gauge field exists only when the upstream reported it,
            # and its Stripe meter keeps the last value: a drop to 0 must reach Stripe too.
            if value < 0 or (value == 0 and (meter is None or meter.kind == "counter")):
                continue
            rows.append({
                "tenant_id": tenant, "meter": name, "bucket_start": bucket_datetime(bucket_start),
                "value": value, "kind": meter.kind if meter is not None else "counter", "state": "pending",
                "identifier": bucket_identifier(tenant, name, bucket_start), "attempts": 0,
                "created_at": created_at,
            })
        if rows:
            async with sessions() as session, session.begin():
                await session.execute(_insert_ignoring_conflicts(session, rows))
        # Durable first: the hash goes only after the rows are committed.
        await redis.delete(key)
        moved += 1
    return moved
