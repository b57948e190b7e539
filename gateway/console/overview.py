"""What the overview and the tenant page compute: tenants nearest their limits, and the period chart's series.

`period_usage` draws a meter's period from the usage history (`period_series`, also the tenant usage page's).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from gateway.admin.tenants import TenantHandlers, UsageReader
from metering.usage_history import MAX_STEPS, STEPS, HistoryUnavailable, UsageHistory
from quota.tenants import TenantDirectory

log = logging.getLogger("cosmos_gateway.console")

NEAREST_SCAN = 500  # tenants seen in traffic that one overview looks at, at most (in id order)
NEAREST_SHOWN = 10
NEAREST_TTL = 15.0  # seconds an answer is reused: a reload of the overview does not rescan
_CONCURRENCY = 8


@dataclass(frozen=True, slots=True)
class NearLimit:
    tenant: str
    plan: str | None
    meter: str
    used: float
    limit: float
    share: float  # used / limit; inf for any use of a limit of 0


def share_of(used: float, limit: float) -> float:
    if limit <= 0:
        return math.inf if used > 0 else 0.0
    return used / limit


def nearest_of(views: list[Mapping[str, Any]], shown: int = NEAREST_SHOWN) -> list[NearLimit]:
    """Per tenant its meter nearest its limit; the `shown` tenants nearest theirs, nearest first (pure)."""
    found: list[NearLimit] = []
    for view in views:
        best: NearLimit | None = None
        for meter, entry in view["meters"].items():
            if entry["limit"] is None:
                continue
            item = NearLimit(view["tenant"], view["plan"], meter, float(entry["used"]), float(entry["limit"]),
                             share_of(float(entry["used"]), float(entry["limit"])))
            if best is None or item.share > best.share:
                best = item
        if best is not None and best.used > 0:
            found.append(best)
    found.sort(key=lambda n: (-n.share, n.tenant))
    return found[:shown]


class NearestLimits:
    """The tenants nearest their limits among the first NEAREST_SCAN tenants seen, cached NEAREST_TTL s."""

    def __init__(self, tenants: TenantHandlers, usage: UsageReader, directory: TenantDirectory, *,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._tenants = tenants
        self._usage = usage
        self._directory = directory
        self._monotonic = monotonic
        self._cached: tuple[float, list[NearLimit], int] | None = None
        self._lock = asyncio.Lock()

    async def top(self) -> tuple[list[NearLimit], int]:
        """(the nearest, how many tenants were scanned); the usage store's errors propagate."""
        async with self._lock:  # one scan at a time, however many operators reload
            if self._cached is not None and self._monotonic() - self._cached[0] < NEAREST_TTL:
                return self._cached[1], self._cached[2]
            ids = await self._usage.tenants_seen_after(None, NEAREST_SCAN)
            gate = asyncio.Semaphore(_CONCURRENCY)

            async def view(tenant: str) -> dict[str, Any]:
                async with gate:
                    return await self._tenants.view(tenant, self._directory.get(tenant), alerts=False, shadow=False)

            views = await asyncio.gather(*(view(t) for t in ids))
            nearest = nearest_of(list(views))
            self._cached = (self._monotonic(), nearest, len(ids))
            return nearest, len(ids)


async def period_usage(tenant: str, meter: str, *, start: datetime, now: datetime, used: float,
                       gauge: bool = False, history: UsageHistory | None = None) -> list[tuple[float, float]]:
    """The meter's usage this period as (epoch seconds, value): cumulative for a counter, its reported values
    for a gauge.

    A billed meter's comes from the usage history (`metering/usage_history.py`: the ledger's buckets and the
    open ones, by hour while the period so far fits MAX_STEPS hours, else by day). Any other meter, or a
    history that cannot be read right now, falls back to what the usage view knows: nothing at the period's
    start and `used` now, a straight line between; a gauge (its last reported value, never reset) only its
    value now.
    """
    if history is not None and meter in history.meters:
        series = await period_series(history, tenant, [meter], start=start, now=now,
                                     gauges={meter} if gauge else set())
        if series.get(meter):  # a gauge without a report this period has no points: its value now, below
            return series[meter]
    if gauge:
        return [(now.timestamp(), used)]
    return [(start.timestamp(), 0.0), (now.timestamp(), used)]


async def period_series(history: UsageHistory, tenant: str, meters: Sequence[str], *, start: datetime,
                        now: datetime, gauges: Collection[str] = ()) -> dict[str, list[tuple[float, float]]]:
    """The period so far of the billed `meters`, in one history read; {} when the history is unavailable.

    A counter's points are its running total at the end of each step (the last one at `now`), from 0 at the
    period's start; a gauge's are its last value in each step that has one.
    """
    billed = [meter for meter in meters if meter in history.meters]
    begin, end_s = int(start.timestamp()), now.timestamp()
    if not billed or end_s <= begin:
        return {}
    step = "hour" if (end_s - begin) / STEPS["hour"] < MAX_STEPS else "day"
    seconds = STEPS[step]
    first = begin // seconds * seconds
    last = (math.floor(end_s / seconds) + 1) * seconds
    try:
        read = await history.read(tenant, billed, step, first, last)
    except HistoryUnavailable as exc:  # the page shows the usage view's straight line instead
        log.warning("usage history of %s unavailable for a chart: %s", tenant, exc)
        return {}
    found: dict[str, list[tuple[float, float]]] = {}
    for meter, points in read.series.items():
        gauge = meter in gauges
        line: list[tuple[float, float]] = [] if gauge else [(float(begin), 0.0)]
        total = 0.0
        for at, value in points:
            x = min(float(at + seconds), end_s)
            if gauge:
                if value is not None:
                    line.append((x, float(value)))
                continue
            total += float(value or 0)
            line.append((x, total))
        found[meter] = line
    return found


def forecast_line(now: datetime, end: datetime, used: float, forecast: float) -> list[tuple[float, float]]:
    """The dashed forecast: from usage now to the view's end-of-period forecast."""
    return [(now.timestamp(), used), (end.timestamp(), forecast)]
