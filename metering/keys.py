"""Redis key names (pure). Every key of a tenant carries the hash tag `{t:<tenant>}`.

Redis Cluster hashes only what is inside the first `{...}`, so all of a tenant's keys share one slot
and one script can touch them atomically.

    gw:{t:acme}:rate                     GCRA theoretical arrival time
    gw:{t:acme}:rate:s                   the same of the tenant's shadow rate (reports, never refuses)
    gw:{t:acme}:q:<meter>:<period_start>  period counter
    gw:{t:acme}:g:<meter>                 gauge, last reported value
    gw:{t:acme}:b:<bucket_start>          hash meter -> billable value in that billing bucket
    gw:{t:acme}:sh:<period_start>         hash "<reason>:<meter>" -> admitted requests a shadow limit
                                          would have refused this period
    gw:{t:acme}:seen                      marker: the tenant has sent traffic
    gw:tenants:index                      sorted set of tenants that sent traffic, all scored 0 (read in
                                          id order, a page at a time: ZRANGEBYLEX)
    gw:tenants:last_seen                  the same tenants scored by when they were last seen (epoch
                                          seconds): those idle for long are forgotten from both
    gw:tenants:seen                       the set an older version kept instead; moved into the two above
(the three have no tag: they are never touched by a script)
"""

from __future__ import annotations

import functools
import re

PREFIX = "gw"
# A valid tenant id (PRODUCT.md §3, §6): tokens, the admin API and Stripe webhooks all check this one.
TENANT_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
TENANTS_INDEX_KEY = "gw:tenants:index"
TENANTS_LAST_SEEN_KEY = "gw:tenants:last_seen"
TENANTS_SEEN_KEY = "gw:tenants:seen"  # legacy (a plain set); its members are moved, then it is deleted
TENANTS_CHANGED_CHANNEL = "gw:tenants:changed"  # pub/sub: operator changes to reload

_TENANT_SAFE = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_UNSAFE_CHAR = re.compile(r"[^A-Za-z0-9._:-]")
_METER = re.compile(r"[a-z0-9_]{1,64}")


def _escape(match: re.Match[str]) -> str:
    return "".join(f"%{byte:02X}" for byte in match.group().encode())


def tenant_slot_tag(tenant: str) -> str:
    """`{t:<tenant>}`; safe for any string, not only valid tenant ids.

    Valid ids (1-64 of [A-Za-z0-9._:-]) appear as they are. Anything else is percent-encoded, and since
    '%' is never in a valid id the mapping stays one-to-one: a stray '}' cannot end the tag early and
    no two tenants share a key.
    """
    if _TENANT_SAFE.fullmatch(tenant):
        return f"{{t:{tenant}}}"
    if not tenant:
        raise ValueError("tenant id must not be empty")
    return f"{{t:{_UNSAFE_CHAR.sub(_escape, tenant)}}}"


@functools.lru_cache(maxsize=65_536)
def tenant_prefix(tenant: str) -> str:
    """`gw:{t:<tenant>}:`, the start of every key of the tenant (cached: built on every request)."""
    return f"{PREFIX}:{tenant_slot_tag(tenant)}:"


def _meter(meter: str) -> str:
    # Meter names are validated at config time; checked again because a ':' here could make
    # one meter's key read as another's.
    if not _METER.fullmatch(meter):
        raise ValueError(f"not a meter name: {meter!r}")
    return meter


def _epoch(value: int) -> int:
    if type(value) is not int:  # 1.0 would format as "1.0" and miss the key written as "1"
        raise TypeError(f"expected an integer epoch, got {value!r}")
    return value


def rate_key(tenant: str) -> str:
    return f"{tenant_prefix(tenant)}rate"


def shadow_rate_key(tenant: str) -> str:
    return f"{tenant_prefix(tenant)}rate:s"


def shadow_hits_key(tenant: str, period_start: int) -> str:
    return f"{tenant_prefix(tenant)}sh:{_epoch(period_start)}"


def quota_key(tenant: str, meter: str, period_start: int) -> str:
    return f"{tenant_prefix(tenant)}q:{_meter(meter)}:{_epoch(period_start)}"


def gauge_key(tenant: str, meter: str) -> str:
    return f"{tenant_prefix(tenant)}g:{_meter(meter)}"


def bucket_key(tenant: str, bucket_start: int) -> str:
    return f"{tenant_prefix(tenant)}b:{_epoch(bucket_start)}"


def seen_key(tenant: str) -> str:
    return f"{tenant_prefix(tenant)}seen"


_RECORD_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def record_key(tenant: str, record_id: str) -> str:
    """`gw:{t:<tenant>}:r:<id>`: marks a spooled record as applied, so a replay applies it once."""
    if not _RECORD_ID.fullmatch(record_id):
        raise ValueError(f"not a record id: {record_id!r}")
    return f"{tenant_prefix(tenant)}r:{record_id}"
