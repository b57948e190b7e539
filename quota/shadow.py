"""What the limiter does with a request served although a shadow limit (`enforce: shadow`) would have
refused it: count it in `gateway_shadow_rejections_total{reason,plan,meter}` and log it, at most once a
minute per tenant, reason and meter in each worker process.

The per-tenant listing is not kept here: the store's script counts each hit in the tenant's period hash
(`UsageStore.shadow_hits`), atomically with the request's counts, so every worker and instance adds up.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from quota.metrics import QuotaMetrics

log = logging.getLogger("cosmos_gateway.shadow")

LOG_INTERVAL = 60.0
# (tenant, reason, meter) whose last log line is remembered; beyond it the least recently logged is forgotten
# (it may then log once more within its minute): tenant ids come from tokens, so the map must be bounded.
MAX_REMEMBERED = 10_000


class ShadowReports:
    """Counts and logs the shadow hits of admitted requests (`Decision.shadow`)."""

    def __init__(self, metrics: QuotaMetrics, clock: Callable[[], float], *, interval: float = LOG_INTERVAL,
                 max_remembered: int = MAX_REMEMBERED) -> None:
        self._metrics = metrics
        self._clock = clock
        self._interval = interval
        self._max = max_remembered
        # (tenant, reason, meter) -> (when its last line was logged, hits since then); oldest line first.
        self._logged: dict[tuple[str, str, str], tuple[float, int]] = {}

    def report(self, tenant: str, plan: str, reason: str, meter: str) -> None:
        self._metrics.shadow_rejected(reason, plan, meter)
        key = (tenant, reason, meter)
        now = self._clock()
        last = self._logged.get(key)
        if last is not None and now - last[0] < self._interval:
            self._logged[key] = (last[0], last[1] + 1)
            return
        more = 0 if last is None else last[1]
        if last is not None:
            del self._logged[key]  # re-inserted last: the map stays ordered by when lines were logged
        elif len(self._logged) >= self._max:
            del self._logged[next(iter(self._logged))]
        self._logged[key] = (now, 0)
        log.info("tenant %s was served a request that a shadow limit would refuse (reason %s, meter %s, plan %s)%s",
                 tenant, reason, meter, plan, f"; {more} more since the last line" if more else "")

    def remembered(self) -> int:
        """How many (tenant, reason, meter) the log limit remembers (bounded by `max_remembered`)."""
        return len(self._logged)
