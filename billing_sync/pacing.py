"""Pacing of the meter event sends: `billing.stripe.max_events_per_second` as a steady rate.

Not a rate limit of the product (that is `quota/`): it only keeps the sync worker under what Stripe's
API accepts, so a backlog drains at the configured pace instead of in 429 storms.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


class StripePacer:
    """At most `rate` events a second on average, no burst beyond one call; 0 = no cap."""

    def __init__(self, rate: float, *, monotonic: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self._rate = rate
        self._monotonic = monotonic
        self._sleep = sleep
        self._next = 0.0

    async def acquire(self, events: int) -> None:
        """Wait until `events` more events may be sent."""
        if self._rate <= 0:
            return
        now = self._monotonic()
        start = max(now, self._next)
        self._next = start + events / self._rate  # reserved before sleeping: concurrent callers queue up
        if start > now:
            await self._sleep(start - now)
