"""The pacing of meter event sends, on a clock that stands still (the worker's own: test_rate_cap_is_respected)."""

from __future__ import annotations

import asyncio

import pytest

from billing_sync.pacing import StripePacer


class StillClock:
    """A monotonic clock that never moves, and a sleep that only records how long it was asked to wait."""

    def __init__(self) -> None:
        self.slept: list[float] = []

    def monotonic(self) -> float:
        return 100.0

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        await asyncio.sleep(0)

    def pacer(self, rate: float) -> StripePacer:
        return StripePacer(rate, monotonic=self.monotonic, sleep=self.sleep)


async def test_events_are_spread_at_the_rate() -> None:
    clock = StillClock()
    pacer = clock.pacer(20)
    for events in (1, 1, 10, 1):
        await pacer.acquire(events)
    # The first call goes at once; each next one waits for the events reserved before it.
    assert clock.slept == pytest.approx([0.05, 0.1, 0.6])


async def test_no_cap_never_waits() -> None:
    clock = StillClock()
    pacer = clock.pacer(0)
    for _ in range(3):
        await pacer.acquire(100)
    assert clock.slept == []


async def test_concurrent_callers_queue_up() -> None:
    clock = StillClock()
    pacer = clock.pacer(1000)
    await asyncio.gather(*(pacer.acquire(10) for _ in range(5)))
    assert sorted(clock.slept) == pytest.approx([0.01, 0.02, 0.03, 0.04])  # each reserved its turn before sleeping
