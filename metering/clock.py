"""Time, one way for every package.

A clock is a function that returns the time as epoch seconds (UTC, a float), injected wherever code needs
"now" so that tests fix the time instead of sleeping. Code that needs a `datetime` (SQL rows, period
bounds) converts with `utc()`; text for people and JSON comes from `rfc3339()`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime

Clock = Callable[[], float]
system_clock: Clock = time.time


def utc(epoch: float) -> datetime:
    """Epoch seconds as a timezone-aware UTC datetime."""
    return datetime.fromtimestamp(epoch, UTC)


def utcnow(clock: Clock = system_clock) -> datetime:
    """Now by `clock`, timezone-aware in UTC (naive datetimes are ambiguous across hosts)."""
    return datetime.fromtimestamp(clock(), UTC)


def rfc3339(value: datetime | float | None, *, whole_seconds: bool = False) -> str | None:
    """`2026-12-01T00:00:00Z`, from a timezone-aware datetime or epoch seconds; None stays None.

    Microseconds are kept when the instant has them, unless `whole_seconds` (alert ids hash this text,
    and the sync state is shown to the second).
    """
    if value is None:
        return None
    if not isinstance(value, datetime):
        value = utc(int(value) if whole_seconds else value)
    elif value.utcoffset() is None:
        raise ValueError("datetime must be timezone-aware")
    if whole_seconds:
        value = value.replace(microsecond=0)
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
