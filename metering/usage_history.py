"""A tenant's usage history: one series per billed meter, by hour or by day (UTC), from the SQL ledger and the
billing buckets still in Redis, so the last minutes show too (PRODUCT.md §6a). SQL and Redis reads only.

    history = UsageHistory(sessions, redis, meters, bucket_seconds=300)
    start, end = resolve_range("day", None, None, now=time.time(), anchor_day=15)   # the period so far
    result = await history.read("acme", ["api_calls"], "day", start, end)           # result.series["api_calls"]

Values. A counter's step is the sum of its buckets: exact decimals (the ledger's NUMERIC(20, 6)), refund
debits included, so a step may be negative. A gauge's step is its last value in the step, as Stripe's `last`
aggregation bills it, or None when no value was reported in the step. Only billed meters (with a
`stripe_event`) have a history: the ledger keeps no other.

Where a bucket's units are. A bucket is counted in Redis (`gw:{t:<tenant>}:b:<start>`); the sync worker renames
it to `…:moving`, stores its plan there, commits its ledger rows, then deletes the staged hash, carrying its
leftovers (late units, refund debits) into a later bucket in the same script (billing_sync/ledger.py). So its
units are always in exactly one place, except between the commit and the delete, when the staged hash and the
rows both hold them: there the plan decides. A meter the plan bills as a new row counts from the staged hash
only while its row is absent; leftovers count from the staged hash until the carry moves them, or, at a
period's end, until their own row (at the bucket start plus `slot` microseconds) is there.
The ledger is read first and Redis second, staged hash before live key and later buckets before earlier
ones, so that a move racing the reads can only hide a bucket from one answer, never count it twice.

Which buckets are read from Redis: those of the last day (`OPEN_LOOKBACK_SECONDS`, at most `MAX_OPEN_BUCKETS`
of them) within the range. The sync worker moves a bucket seconds after it closes (bucket + grace); a bucket
it has not moved after a day (the worker was stopped that long) shows once it is moved.
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import json
import logging
import math
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from sqlalchemy import ColumnElement, func, literal_column, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from metering import keys
from metering.clock import Clock, system_clock, utc
from metering.errors import REDIS_ERRORS
from metering.meters import Meter
from metering.models import LedgerEntry
from metering.periods import period_bounds
from metering.sql_errors import store_unavailable

log = logging.getLogger("cosmos_gateway.usage_history")

STEPS: Mapping[str, int] = {"hour": 3600, "day": 86_400}
MAX_STEPS = 400  # PRODUCT.md §6a: a longer range is a 400
EARLIEST = 0  # 1970-01-01T00:00:00Z
LATEST = calendar.timegm((2200, 1, 1, 0, 0, 0))  # far enough; keeps every date computation in range
OPEN_LOOKBACK_SECONDS = 86_400
MAX_OPEN_BUCKETS = 1_440  # a day of one-minute buckets: two HGETALLs each, in one pipeline
SQL_SECONDS = 10.0
REDIS_SECONDS = 2.0
MAX_CONCURRENT = 4  # reads at once per process (a tenant can call its own history on the proxy listener)
QUEUE_SECONDS = 5.0  # how long a read waits for its turn before it is refused as busy
# As billing_sync.ledger writes them (metering may not import billing_sync; tests/metering/test_usage_history.py
# checks that both say the same).
STAGING_SUFFIX = ":moving"
PLAN_FIELD = "~plan"
_PLACES = Decimal("0.000001")  # usage_ledger.value is NUMERIC(20, 6)
# Within one bucket a gauge's value comes from the ledger before the staged hash before the live key: the
# mover bills the staged value and keeps the billed one against later reports (billing_sync.staged.split_rows).
_LEDGER, _STAGED, _LIVE = 2, 1, 0


class RangeError(ValueError):
    """A bad `step`, `from` or `to`; `fields` names the query parameters at fault."""

    def __init__(self, fields: Sequence[str], message: str) -> None:
        super().__init__(f"{', '.join(fields)}: {message}")
        self.fields = tuple(fields)
        self.message = message


class HistoryUnavailable(Exception):
    """The read could not be done: `part` is "database", "redis" (down or past the deadline) or "busy"."""

    def __init__(self, part: str, message: str) -> None:
        super().__init__(message)
        self.part = part


@dataclass(frozen=True)
class History:
    tenant: str
    step: str
    start: int  # epoch seconds, aligned to the step
    end: int
    series: dict[str, list[tuple[int, Decimal | None]]]  # meter -> (step start, value), every step of the range


def resolve_range(step: str, start: datetime | None, end: datetime | None, *, now: float,
                  anchor_day: int | None) -> tuple[int, int]:
    """[start, end) as epoch seconds aligned to the step (`start` rounded down, `end` up), with defaults.

    `end` defaults to the end of the step holding `now`; `start` to the start of the billing period holding the
    range's last step (the calendar month, or from the tenant's anchor day), but no more than MAX_STEPS steps
    back. Raises RangeError for an unknown step, an instant out of range, start >= end, or more than MAX_STEPS.
    """
    seconds = STEPS.get(step)
    if seconds is None:
        raise RangeError(["step"], f"expected one of {', '.join(STEPS)}")
    given = [name for name, value in (("from", start), ("to", end)) if value is not None]
    for name, value in (("from", start), ("to", end)):
        if value is not None and not EARLIEST <= value.timestamp() <= LATEST:
            raise RangeError([name], "expected an instant from 1970-01-01T00:00:00Z to 2200-01-01T00:00:00Z")
    if start is not None and end is not None and start >= end:
        raise RangeError(given, "`from` must be before `to`")
    last = end.timestamp() if end is not None else now
    end_s = math.ceil(last / seconds) * seconds if end is not None else (math.floor(now / seconds) + 1) * seconds
    if start is not None:
        start_s = math.floor(start.timestamp() / seconds) * seconds
        if start_s >= end_s:
            raise RangeError(given, "`from` must be before `to` (by default the end of the current step)")
    else:
        period_start, _ = period_bounds(utc(end_s - seconds), anchor_day)
        start_s = max(int(period_start.timestamp()), end_s - MAX_STEPS * seconds)
    steps = (end_s - start_s) // seconds
    if steps > MAX_STEPS:
        raise RangeError(given, f"the range holds {steps} steps of one {step}; at most {MAX_STEPS}"
                         + (" (use step=day)" if step == "hour" else ""))
    return start_s, end_s


@dataclass
class _Series:
    """One meter's steps as they are merged: sums for a counter, (order, value) of the latest for a gauge."""

    gauge: bool
    sums: dict[int, Decimal] = field(default_factory=dict)
    last: dict[int, tuple[tuple[int, int], Decimal]] = field(default_factory=dict)

    def add(self, step_start: int, value: Decimal, order: tuple[int, int]) -> None:
        if not self.gauge:
            self.sums[step_start] = self.sums.get(step_start, Decimal(0)) + value
            return
        held = self.last.get(step_start)
        if held is None or order > held[0]:
            self.last[step_start] = (order, value)

    def points(self, start: int, end: int, seconds: int) -> list[tuple[int, Decimal | None]]:
        if self.gauge:
            return [(at, self.last[at][1] if at in self.last else None) for at in range(start, end, seconds)]
        return [(at, self.sums.get(at, Decimal(0))) for at in range(start, end, seconds)]


@dataclass(frozen=True)
class _Plan:
    billed: frozenset[str]
    target: int | None
    slot: int


class UsageHistory:
    """Reads a tenant's history (`read`); one per process, shared by the admin API and the proxy listener."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], redis: Redis | RedisCluster,
                 meters: Sequence[Meter], *, bucket_seconds: int, clock: Clock = system_clock,
                 max_concurrent: int = MAX_CONCURRENT) -> None:
        self._sessions = sessions
        self._redis = redis
        self._meters = {m.name: m for m in meters if m.stripe_event is not None}
        self._bucket_seconds = bucket_seconds
        self._clock = clock
        self._turns = asyncio.Semaphore(max_concurrent)

    @property
    def meters(self) -> list[str]:
        """The meters with a history: the billed ones, by name."""
        return sorted(self._meters)

    async def known(self, tenant: str) -> bool:
        """Whether the ledger holds any row of the tenant (one step along the primary key)."""
        async with self._ledger() as session:
            found = await session.scalar(select(LedgerEntry.tenant_id).where(LedgerEntry.tenant_id == tenant).limit(1))
        return found is not None

    @contextlib.asynccontextmanager
    async def _ledger(self) -> AsyncIterator[AsyncSession]:
        """A session whose work must end within SQL_SECONDS; the database down or late is HistoryUnavailable."""
        try:
            async with asyncio.timeout(SQL_SECONDS), self._sessions() as session:
                yield session
        except TimeoutError:
            raise HistoryUnavailable("database", "the ledger did not answer in time") from None
        except Exception as exc:
            if not store_unavailable(exc):
                raise
            raise HistoryUnavailable("database", "the SQL store is unavailable") from exc

    async def read(self, tenant: str, meters: Sequence[str], step: str, start: int, end: int) -> History:
        """The series of `meters` (billed meters, as `self.meters` names them) over [start, end) by `step`."""
        seconds = STEPS[step]
        unknown = [name for name in meters if name not in self._meters]
        if unknown:
            raise ValueError(f"no history of meters {unknown!r}: only billed meters have one")
        wanted = {name: _Series(self._meters[name].kind == "gauge") for name in meters}
        try:
            async with asyncio.timeout(QUEUE_SECONDS):
                await self._turns.acquire()
        except TimeoutError:
            raise HistoryUnavailable("busy", "too many usage history reads at once") from None
        try:
            await self._merge(tenant, wanted, seconds, start, end)
        finally:
            self._turns.release()
        return History(tenant, step, start, end,
                       {name: series.points(start, end, seconds) for name, series in wanted.items()})

    async def _merge(self, tenant: str, wanted: dict[str, _Series], seconds: int, start: int, end: int) -> None:
        now = self._clock()
        bucket = self._bucket_seconds
        # The buckets that may still be in Redis: from a day back (at most MAX_OPEN_BUCKETS) to the one after the
        # current (another instance's clock may run a little ahead). Aligned to buckets, so a bucket and its
        # leftover rows are either all before `split` (summed by SQL) or all after (merged here).
        newest = (math.floor(now / bucket) + 1) * bucket
        oldest = max(newest - MAX_OPEN_BUCKETS * bucket, math.floor((now - OPEN_LOOKBACK_SECONDS) / bucket) * bucket)
        split = min(max(math.floor(start / bucket) * bucket, oldest), end)
        async with self._ledger() as session:
            if start < split:
                await self._sum_before(session, tenant, wanted, seconds, start, split)
            rows = await self._rows_from(session, tenant, wanted, split, end) if split < end else []
        in_ledger = set()
        for name, at, value in rows:
            in_ledger.add((name, at))
            epoch = _epoch_micros(at)
            wanted[name].add(_step_of(epoch // 1_000_000, seconds), value, (epoch, _LEDGER))
        last = min(newest, end - 1)
        if split > last:
            return
        for bucket_start, staged, live in await self._open_buckets(tenant, split, last):
            plan = _plan(staged.get(PLAN_FIELD)) if staged else None
            for place, fields in ((_STAGED, staged), (_LIVE, live)):
                for name, raw_value in fields.items():
                    series = wanted.get(name)
                    value = _decimal(raw_value)
                    if series is None or value is None:
                        continue
                    if _counts(series.gauge, name, value, bucket_start, plan if place == _STAGED else None, in_ledger):
                        series.add(_step_of(bucket_start, seconds), value, (bucket_start * 1_000_000, place))

    async def _sum_before(self, session: AsyncSession, tenant: str, wanted: dict[str, _Series], seconds: int,
                          start: int, end: int) -> None:
        """The steps of [start, end) summed (counters) or their last value taken (gauges) by the database."""
        dialect = session.get_bind().dialect.name
        step = _step_expression(dialect, seconds)
        where = (LedgerEntry.tenant_id == tenant, LedgerEntry.bucket_start >= utc(start),
                 LedgerEntry.bucket_start < utc(end))
        counters = [name for name, series in wanted.items() if not series.gauge]
        gauges = [name for name, series in wanted.items() if series.gauge]
        if counters:
            query = (select(LedgerEntry.meter, step, func.sum(LedgerEntry.value))
                     .where(*where, LedgerEntry.meter.in_(counters)).group_by(LedgerEntry.meter, step))
            for name, at, total in (await session.execute(query)).tuples():
                wanted[name].add(_step_start(at, seconds), _exact(total), (0, _LEDGER))
        if gauges:
            latest = func.row_number().over(partition_by=(LedgerEntry.meter, step),
                                            order_by=LedgerEntry.bucket_start.desc())
            ranked = (select(LedgerEntry.meter, step.label("step"), LedgerEntry.value, latest.label("rank"))
                      .where(*where, LedgerEntry.meter.in_(gauges)).subquery())
            query = select(ranked.c.meter, ranked.c.step, ranked.c.value).where(ranked.c.rank == 1)
            for name, at, value in (await session.execute(query)).tuples():
                # Earlier than any bucket merged later (those start at `end` or after): any order below theirs.
                wanted[name].add(_step_start(at, seconds), _exact(value), (0, _LEDGER))

    async def _rows_from(self, session: AsyncSession, tenant: str, wanted: dict[str, _Series], start: int,
                         end: int) -> list[tuple[str, datetime, Decimal]]:
        """The ledger rows of [start, end) one by one: a day of buckets at most, merged with Redis here."""
        query = (select(LedgerEntry.meter, LedgerEntry.bucket_start, LedgerEntry.value)
                 .where(LedgerEntry.tenant_id == tenant, LedgerEntry.meter.in_(list(wanted)),
                        LedgerEntry.bucket_start >= utc(start), LedgerEntry.bucket_start < utc(end)))
        return [(name, at, _exact(value)) for name, at, value in (await session.execute(query)).tuples()]

    async def _open_buckets(self, tenant: str, first: int, last: int) -> list[tuple[int, dict[str, bytes],
                                                                                     dict[str, bytes]]]:
        """(bucket start, staged hash, live hash) of the tenant's buckets from `first` to `last`, read in one
        pipeline: the newest bucket first and each staged hash before its live key, so that a move racing the
        reads (RENAME live -> staged, carry into a later bucket + DEL staged) can hide units, never show them twice.
        """
        starts = range(last - last % self._bucket_seconds, first - 1, -self._bucket_seconds)
        pipe = self._redis.pipeline(transaction=False)
        for bucket_start in starts:
            key = keys.bucket_key(tenant, bucket_start)
            pipe.hgetall(key + STAGING_SUFFIX)
            pipe.hgetall(key)
        try:
            async with asyncio.timeout(REDIS_SECONDS):
                replies = await pipe.execute()
        except REDIS_ERRORS as exc:  # TimeoutError included
            raise HistoryUnavailable("redis", "the usage store is unavailable") from exc
        return [(bucket_start, _texts(replies[2 * i]), _texts(replies[2 * i + 1]))
                for i, bucket_start in enumerate(starts)]


def _counts(gauge: bool, name: str, value: Decimal, bucket_start: int, plan: _Plan | None,
            in_ledger: set[tuple[str, datetime]]) -> bool:
    """Whether a bucket field's value is not in the ledger rows read (see the module's docstring)."""
    at = utc(bucket_start)
    if plan is None:  # live, or staged and not planned yet: nothing of it is in the ledger
        return not (gauge and (name, at) in in_ledger)  # a gauge's billed value stands
    if value < 0 or name in plan.billed:  # a leftover, carried or (at the period's end) a row of its own
        if gauge and value >= 0:
            return False  # a late report of a gauge already billed: dropped by the mover
        return plan.target is not None or (name, at + timedelta(microseconds=plan.slot)) not in in_ledger
    if value == 0 and not gauge:
        return False
    return (name, at) not in in_ledger  # its row, once committed, holds it


def _plan(raw: bytes | None) -> _Plan | None:
    if raw is None:
        return None
    try:
        data = json.loads(raw)
        target = data["target"]
        return _Plan(frozenset(data["billed"]), None if target is None else int(target), int(data["slot"]))
    except (TypeError, ValueError, KeyError):
        return None  # unreadable: the mover replaces it before it commits, so nothing is committed by it


def _decimal(raw: bytes) -> Decimal | None:
    """A bucket field's value as the ledger would store it, or None if it is not a finite number."""
    try:
        value = Decimal(raw.decode())
    except (InvalidOperation, UnicodeDecodeError):
        return None
    return value.quantize(_PLACES) if value.is_finite() else None


def _exact(value: Any) -> Decimal:
    """A value read from the ledger, to its 6 places (SQLite hands NUMERIC back through a float)."""
    if isinstance(value, Decimal):
        return value.quantize(_PLACES)
    return Decimal(repr(float(value))).quantize(_PLACES)


def _step_expression(dialect: str, seconds: int) -> ColumnElement[Any]:
    """The step a ledger row falls in, computed by the database (literals: PostgreSQL must see the same
    expression in SELECT and GROUP BY, which bound parameters would make two)."""
    if dialect == "postgresql":
        unit = "hour" if seconds == 3600 else "day"
        return func.date_trunc(literal_column(f"'{unit}'"), LedgerEntry.bucket_start, literal_column("'UTC'"))
    if dialect == "sqlite":  # stored as text 'YYYY-MM-DD HH:MM:SS.ffffff' in UTC
        return func.substr(LedgerEntry.bucket_start, 1, 13 if seconds == 3600 else 10)
    raise NotImplementedError(f"usage history on {dialect}")


def _step_start(value: Any, seconds: int) -> int:
    """Epoch seconds of a step as `_step_expression` returned it."""
    if isinstance(value, datetime):
        moment = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    else:
        moment = datetime.strptime(str(value), "%Y-%m-%d %H" if seconds == 3600 else "%Y-%m-%d").replace(tzinfo=UTC)
    return _step_of(calendar.timegm(moment.utctimetuple()), seconds)


def _step_of(epoch: int, seconds: int) -> int:
    return epoch - epoch % seconds


def _epoch_micros(at: datetime) -> int:
    return calendar.timegm(at.utctimetuple()) * 1_000_000 + at.microsecond


def _texts(raw: Any) -> dict[str, bytes]:
    """A hash as HGETALL returned it (bytes, or str from a client that decodes), with text field names."""
    if not raw:
        return {}
    return {(name.decode(errors="replace") if isinstance(name, bytes) else name):
            (value if isinstance(value, bytes) else str(value).encode()) for name, value in raw.items()}
