"""The usage store's contract: what the limiter asks of a store, and the types it speaks in.

    UsageStore        the Protocol `quota` depends on; `metering.redis_store.RedisUsageStore` implements it
    Check, Decision   one request's rules (rate, counter quotas, gauge guards, billable units) and the answer;
                      shadow rules (`enforce: shadow`) never refuse, the first one a request runs into is
                      reported in `Decision.shadow`
    Record            what is known after the response (refunds, byte counts, gauges), also the spooled form
    StoreUnavailable  the one error a store raises: Redis down, slow or failing (the caller fails open/closed)

Pure data: nothing here talks to Redis, so the limiter's logic and the spool can be read (and tested)
without knowing the store.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

Reason = Literal["rate", "quota", "guard"]
OnFailure = Callable[["Record", "StoreUnavailable"], None]
# What a check counted after its caller stopped waiting: the Decision, or the error (whose `applied`
# may still tell, late, whether Redis ran it).
OnAbandoned = Callable[["Decision | StoreUnavailable"], None]
Units = tuple[tuple[str, int], ...]
# Where a record goes: (tenant, period_start, period_end, bucket_start, bucket_ttl), as in `Record`.
RecordKey = tuple[str, int, int, int, int]


class StoreUnavailable(Exception):
    """Redis is down, timed out or failed; the caller fails open (spool) or closed (503).

    `applied` is set when the call was sent and may still run (a timeout): it resolves to whether Redis
    did count it once the reply arrives late, or to False if the connection is lost first. Spooling
    must wait for it, or a call Redis ran would be counted twice.
    """

    def __init__(self, message: str, *, applied: asyncio.Future[bool] | None = None,
                 call: CallRef | None = None) -> None:
        super().__init__(message)
        self.applied = applied
        # A check sent in a script call whose reply never came: (the call's marker, the request's place in
        # it). Whatever settles the request later (spool replay, give-back) is decided by that marker in
        # Redis, atomically (record.lua), so the request counts once whether or not the call ran.
        self.call = call

    def for_call(self, call: CallRef) -> StoreUnavailable:
        return StoreUnavailable(str(self), applied=self.applied, call=call)


# A request of a check call: the call's marker key (`<bucket key>:c:<call id>`) and the request's place
# in the call (1-based).
CallRef = tuple[str, int]


@dataclass(frozen=True, slots=True)
class RateRule:
    per_second: float
    burst: int


@dataclass(frozen=True, slots=True)
class CounterRule:
    meter: str
    units: int
    limit: int | None
    enforce: bool  # False: overage, count past the limit
    # A limit that only reports (never refuses) an admitted request that would pass it; kept beside `limit`,
    # so that a lower limit can be tried out while the enforced one still holds.
    shadow_limit: int | None = None


@dataclass(frozen=True, slots=True)
class GuardRule:
    meter: str
    limit: float  # reject while the gauge is >= limit
    shadow: bool = False  # only report an admitted request that this guard would have refused


@dataclass(frozen=True, slots=True)
class Check:
    tenant: str
    now: float
    period_start: int
    period_end: int
    bucket_start: int
    bucket_ttl: int
    rate: RateRule | None
    counters: tuple[CounterRule, ...]
    guards: tuple[GuardRule, ...]
    billable: Units  # (meter, units) added to the billing bucket when admitted
    # A rate that only reports: its own GCRA state, which moves on when it would have admitted the request.
    shadow_rate: RateRule | None = None

    @property
    def has_shadow(self) -> bool:
        """Whether any rule only reports: the store then evaluates and counts shadow hits."""
        return (self.shadow_rate is not None or any(c.shadow_limit is not None for c in self.counters)
                or any(g.shadow for g in self.guards))


@dataclass(slots=True)  # not frozen: one per request, and a frozen __init__ costs three times as much
class Decision:
    allowed: bool
    reason: Reason | None
    meter: str | None  # the violated meter (quota/guard)
    retry_after: float  # seconds: rate until a token frees, quota until the period ends, guard 0
    used: dict[str, float]  # per counter/guard meter, after counting (or current when rejected)
    rate_remaining: int | None
    # An admitted request that a shadow rule would have refused: (reason, meter), the first such rule in the
    # order the enforced ones are decided (rate, counters, guards); the meter of the rate is "rate".
    shadow: tuple[Reason, str] | None = None


@dataclass(slots=True)  # not frozen, as Decision
class Record:
    """What is known after the response; also the spooled form of an admitted check (`from_admitted`)."""

    tenant: str
    period_start: int
    period_end: int
    bucket_start: int
    bucket_ttl: int
    refund: Units = ()  # give back: period counter (never below 0) and bucket (a late refund may go below 0)
    add: Units = ()  # byte meters: period counter and bucket
    gauges: tuple[tuple[str, float], ...] = ()  # SET the gauge; the bucket field holds the last value
    count: Units = ()  # period counter only
    bill: Units = ()  # bucket only
    record_id: str | None = None  # applied at most once (spool replay); None: no marker
    # Applied only as a check call whose reply was lost decided (see StoreUnavailable.call): unless the
    # call admitted the request (the spooled counts of a request served), or, with `only_if_admitted`,
    # only if it did (the give-back of a request refused or abandoned meanwhile).
    check_call: CallRef | None = None
    only_if_admitted: bool = False

    @classmethod
    def from_admitted(cls, check: Check, record_id: str | None = None) -> Record:
        """The counts an admitted check would have made (rate state aside), to spool when Redis is down."""
        return cls(
            check.tenant, check.period_start, check.period_end, check.bucket_start, check.bucket_ttl,
            count=tuple((c.meter, c.units) for c in check.counters if c.units),
            bill=tuple((meter, units) for meter, units in check.billable if units),
            record_id=record_id,
        )

    def is_empty(self) -> bool:
        return not (self.refund or self.add or self.gauges or self.count or self.bill or self.record_id)


class UsageStore(Protocol):
    """What the limiter and the spool need of a store (see RedisUsageStore for the semantics).

    A check is prepared once per tenant, route and bucket (`prepare`, an opaque value only the store
    reads) and submitted per request with its time; records are sent later, batched, and failures come
    back through `on_failure` so the caller can spool them.
    """

    def prepare(self, check: Check) -> Any: ...

    def submit_check(self, prepared: Any, now: float,
                     on_abandoned: OnAbandoned | None = None) -> asyncio.Future[Decision]: ...

    async def check(self, check: Check) -> Decision: ...

    async def record(self, record: Record) -> bool: ...

    def record_later(self, record: Record, on_failure: OnFailure) -> None: ...

    def add_later(self, where: RecordKey, add: Sequence[tuple[str, int]], on_failure: OnFailure) -> None: ...

    async def usage(self, tenant: str, period_start: int, meters: Sequence[str]) -> dict[str, float]: ...

    async def shadow_hits(self, tenant: str, period_start: int) -> dict[tuple[str, str], int]: ...

    async def flush(self) -> None: ...
