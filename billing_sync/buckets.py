"""Billing buckets as names and numbers: keys, Stripe identifiers, field values, where leftovers go. Pure.

A bucket `gw:{t:<tenant>}:b:<epoch>` is a Redis hash meter -> value, written by the gateway until the
bucket closes (`bucket_start + bucket_seconds`) and never after; `billing_sync.ledger` moves it.

The identifier sent to Stripe (`bucket_identifier`) is a pure function of tenant, meter and bucket start,
so every retry and every worker names a bucket the same way and Stripe deduplicates it.
"""

from __future__ import annotations

import functools
import hashlib
import re
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import unquote

from metering import keys
from metering.clock import utc
from metering.periods import bucket_start as period_bucket_start
from metering.periods import period_bounds

BUCKET_PATTERN = f"{keys.PREFIX}:{{t:*}}:b:*"  # SCAN MATCH; '{' and '}' are not glob characters
_BUCKET_KEY = re.compile(r"gw:\{t:([^}]+)\}:b:(-?[0-9]+)")
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
    # Not our encoding: someone else's key. Built as keys.bucket_key builds it, without its per-tenant cache,
    # which a pass over many tenants would only fill.
    if f"{keys.PREFIX}:{keys.tenant_slot_tag(tenant)}:b:{int(epoch)}" != text:
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


def leftover_identifier(tenant: str, meter: str, bucket_start: int, slot: int) -> str:
    """Identifier of a leftover row (late units or a refund that the period could not net); at most 100 chars."""
    digest = hashlib.sha256(f"{tenant}\0{meter}\0{bucket_start}\0{slot}".encode()).hexdigest()[:32]
    return f"{IDENTIFIER_VERSION}l_{meter[:24]}_{bucket_start}_{slot}_{digest}"


@functools.lru_cache(maxsize=4096)
def bucket_datetime(bucket_start: int) -> datetime:
    """The bucket start as the ledger stores it (`usage_ledger.bucket_start`, UTC); cached: every tenant of a
    pass shares the few bucket starts, and datetimes are immutable."""
    return utc(bucket_start)


def parse_bucket_value(raw: Any) -> Decimal | None:
    """A bucket field's value as the ledger stores it (6 places), or None when it is not a finite number."""
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    try:
        value = Decimal(text)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    return value.quantize(_VALUE_PLACES)


def carry_target(bucket_start: int, bucket_seconds: int, now: float, anchor_day: int | None) -> int | None:
    """Where a bucket's leftovers can still be netted: the next bucket, or the open one if that is later.

    Never a bucket of another billing period (PRODUCT.md §8): None when the period ends first. Only a bucket
    still open can absorb a debit; a closed one may be billed already.
    """
    target = max(bucket_start + bucket_seconds, period_bucket_start(now, bucket_seconds))
    _, end = period_bounds(bucket_datetime(bucket_start), anchor_day)
    return target if target < end.timestamp() else None
