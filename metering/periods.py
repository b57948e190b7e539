"""Quota periods and billing buckets (pure). All instants are timezone-aware; periods are in UTC.

A period resets at its boundary (PRODUCT.md §5), not "30 days after first use": the calendar month,
or the month started on the tenant's anchor day, clamped to short months (anchor 31: Jan 31, Feb 28,
Mar 31, ...).
"""

from __future__ import annotations

import calendar
import math
from datetime import UTC, datetime


def _utc(value: datetime, name: str) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware, got naive {value.isoformat()}")
    return value.astimezone(UTC)


def _month_start(year: int, month: int, anchor_day: int) -> datetime:
    day = min(anchor_day, calendar.monthrange(year, month)[1])
    return datetime(year, month, day, tzinfo=UTC)


def _shift(year: int, month: int, by: int) -> tuple[int, int]:
    index = year * 12 + (month - 1) + by
    return index // 12, index % 12 + 1


def period_bounds(now: datetime, anchor_day: int | None) -> tuple[datetime, datetime]:
    """[start, end) of the period holding `now`: the calendar month (UTC) or from the anchor day."""
    now = _utc(now, "now")
    if anchor_day is None:
        anchor_day = 1
    elif type(anchor_day) is not int or not 1 <= anchor_day <= 31:
        raise ValueError(f"anchor_day must be an integer 1-31, got {anchor_day!r}")
    # Each boundary is computed from its own month, never by adding a month to the previous one,
    # so a clamped February start does not drag March's start back to the 28th.
    start = _month_start(now.year, now.month, anchor_day)
    if now >= start:
        end = _month_start(*_shift(now.year, now.month, 1), anchor_day)
    else:
        end = start
        start = _month_start(*_shift(now.year, now.month, -1), anchor_day)
    return start, end


def bucket_start(ts: float, bucket_seconds: int) -> int:
    """Epoch second at which the billing bucket holding `ts` starts (buckets are aligned to the epoch)."""
    if type(bucket_seconds) is not int or bucket_seconds <= 0:
        raise ValueError(f"bucket_seconds must be a positive integer, got {bucket_seconds!r}")
    if not math.isfinite(ts):
        raise ValueError(f"ts must be finite, got {ts!r}")
    return math.floor(ts) // bucket_seconds * bucket_seconds


def seconds_until(end: datetime, now: datetime) -> int:
    """Whole seconds from `now` to `end`, rounded up, never negative (Retry-After, RateLimit `t`)."""
    return max(0, math.ceil((_utc(end, "end") - _utc(now, "now")).total_seconds()))
