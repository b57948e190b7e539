"""Usage counters in Redis: one Lua script per decision, concurrent calls batched into one pipeline.

    StoreUnavailable      Redis down, slow (past `timeout`), or answering errors; every driver error
                          (connection, timeout, response, cluster) is translated into it once, by
                          `_unavailable` (`batching.py`).

`check()` runs `lua/check_and_count.lua`: rate (GCRA), counter quotas and gauge guards decided at once,
counted only when all pass. `record()` runs `lua/record.lua`: refunds, byte counts, gauges, and the
idempotency marker of a spool replay. Calls made in the same event-loop iteration share one
non-transactional pipeline (`batching.py`), so round trips do not grow with concurrency. Every key of
one call carries the tenant's hash tag, so each script touches one cluster slot; a cluster pipeline is
split by node.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from metering import keys
from metering.errors import REDIS_ERRORS as _REDIS_ERRORS
from metering.redis_store.batching import MAX_CHECKS_PER_CALL, _Batcher, _unavailable
from metering.redis_store.calls import _applied, _Call, _Check, _no_parse, _RecordGroup, _text
from metering.redis_store.scripts import (
    CALL_MARKER_TTL,
    CHECK_SCRIPT,
    LIVE_RECORD_MARKER_TTL,
    PERIOD_KEY_GRACE,
    RECORD_MARKER_TTL,
    RECORD_SCRIPT,
    PreparedCheck,
    _bulk,
)
from metering.store import Check, Decision, OnAbandoned, OnFailure, Record, RecordKey, StoreUnavailable

# A tenant that sent no traffic for this long leaves the index (its usage keys are gone by then: two
# periods and PERIOD_KEY_GRACE), and the index never holds more than SEEN_MAX tenants (the least
# recently seen go first), so neither a long life nor a flood of tenant ids grows it without bound.
# Byte-count records packed ahead (`_add_call`), kept per tenant, period and bucket: bounded, oldest first.
_PACKED_ADDS = 10_000
SEEN_RETENTION = 70 * 86_400
SEEN_MAX = 1_000_000
_SEEN_TRIM_BATCH = 1000
_SEEN_TRIM_SECONDS = 60.0


def _number(value: Any) -> float:
    return 0.0 if value is None else float(_text(value))


class RedisUsageStore(_Batcher):
    """Counters, gauges and billing buckets of all tenants in one Redis (single node or cluster)."""

    def __init__(
        self,
        client: Redis | RedisCluster,
        *,
        timeout: float = 0.05,
        clock: Callable[[], float] = time.time,
        read_timeout: float = 1.0,
    ) -> None:
        super().__init__(client, timeout=timeout, clock=clock)  # the batching state, and the hot path's timeout
        self._read_timeout = read_timeout  # usage views and billing reads
        self._packed_adds: dict[tuple[RecordKey, tuple[str, ...]], tuple[bytes, bytes, list[bytes], str]] = {}

    # -- the hot path -------------------------------------------------------------------------------

    async def check(self, check: Check) -> Decision:
        """Decide and count one request; batched with the calls of the same loop iteration."""
        return await self.submit_check(self.prepare(check), check.now)

    def prepare(self, check: Check) -> PreparedCheck:
        """The script's keys and arguments for `check`, all but the time: reusable while they stay the same.

        A tenant's requests to one route within one billing bucket differ only in `now`; the limiter keeps
        the prepared form and skips rebuilding a dozen key strings per request.
        """
        counter_keys = [keys.quota_key(check.tenant, c.meter, check.period_start) for c in check.counters]
        guards = [g for g in check.guards if not g.shadow]
        gauge_keys = [keys.gauge_key(check.tenant, g.meter) for g in guards]
        rate = check.rate
        args: list[Any] = [
            check.period_end + PERIOD_KEY_GRACE, check.period_end, check.bucket_ttl,
            1 if rate else 0, repr(float(rate.per_second)) if rate else 0, rate.burst if rate else 0,
            len(check.counters),
        ]
        for c in check.counters:
            args += [c.meter, c.units, "" if c.limit is None else c.limit, 1 if c.enforce else 0]
        args.append(len(guards))
        for g in guards:
            args += [g.meter, repr(float(g.limit))]
        args.append(len(check.billable))
        for meter, units in check.billable:
            args += [meter, units]
        key_list = [
            keys.rate_key(check.tenant), keys.bucket_key(check.tenant, check.bucket_start),
            *counter_keys, *gauge_keys,
        ]
        if check.has_shadow:  # a check without shadow rules sends the script exactly what it did before them
            self._shadow_section(check, key_list, args)
        parts = [b"EVALSHA", CHECK_SCRIPT.sha, len(key_list), *key_list]
        head, tail = b"".join(_bulk(part) for part in parts), b"".join(_bulk(arg) for arg in args)
        return PreparedCheck(check.tenant, key_list, args, head, tail, argc=len(parts) + 1 + len(args),
                             used_names=tuple(c.meter for c in check.counters) + tuple(g.meter for g in guards),
                             used_units=tuple(c.units for c in check.counters) + (0,) * len(guards),
                             shape=(head, tail))

    @staticmethod
    def _shadow_section(check: Check, key_list: list[str], args: list[Any]) -> None:
        """The keys and arguments of a check's shadow rules, appended (see check_and_count.lua)."""
        shadow_rate = check.shadow_rate
        shadow_guards = [g for g in check.guards if g.shadow]
        key_list += [keys.shadow_rate_key(check.tenant), keys.shadow_hits_key(check.tenant, check.period_start),
                     *(keys.gauge_key(check.tenant, g.meter) for g in shadow_guards)]
        args += [1 if shadow_rate else 0, repr(float(shadow_rate.per_second)) if shadow_rate else 0,
                 shadow_rate.burst if shadow_rate else 0]
        shadow_counters = [(i, c.shadow_limit) for i, c in enumerate(check.counters, 1) if c.shadow_limit is not None]
        args.append(len(shadow_counters))
        for index, limit in shadow_counters:
            args += [index, limit]
        args.append(len(shadow_guards))
        for g in shadow_guards:
            args += [g.meter, repr(float(g.limit))]

    def submit_check(self, prepared: PreparedCheck, now: float,
                     on_abandoned: OnAbandoned | None = None) -> asyncio.Future[Decision]:
        """`check()` of a prepared check, as a future.

        A caller that stops waiting (the future cancelled) before the pipeline is written counts nothing.
        Once written, a check may count whether or not anybody still waits: `on_abandoned` then receives
        the Decision (or the error) the caller would have got, so that it can give the units back.
        """
        future = self._running_loop().create_future()
        # Checks with the same rules in one batch go to Redis as one script call, which still decides them
        # one by one (check_and_count.lua).
        group = self._pending_checks.get(prepared.shape)
        if group is None or len(group.members) >= MAX_CHECKS_PER_CALL:  # type: ignore[arg-type]
            group = self._pending_checks[prepared.shape] = _Call(CHECK_SCRIPT, prepared.keys, prepared.args,
                                                                 _no_parse, None)
            group.prepared, group.members = prepared, []
            self._enqueue(group, prepared.tenant)
        # The time in whole microseconds (rounded): formatting an integer costs a fraction of a float's repr.
        group.members.append(_Check(future, b"%d" % (now * 1e6 + 0.5), on_abandoned))  # type: ignore[union-attr]
        return future

    async def record(self, record: Record) -> bool:
        """Apply refunds, byte counts and gauges; False when `record_id` was already applied."""
        if record.is_empty():
            return True
        return await self._submit(self._record_call(record), record.tenant)

    def record_later(self, record: Record, on_failure: OnFailure) -> None:
        """`record()` without waiting for it (the request path): `on_failure(record, error)` if Redis fails.

        Records of one tenant and bucket that wait for the same pipeline are folded into one script
        call (byte counts and refunds add up, gauges keep the last value); on failure, `on_failure` gets
        the folded record. The merged call goes out with the next pipeline, RECORD_WAIT (10 ms) later at most.
        """
        if record.is_empty():
            return
        if record.record_id is not None or record.check_call is not None:  # replays and conditions: a call each
            marker_ttl = LIVE_RECORD_MARKER_TTL
            if record.record_id is None:  # an id, so that a spooled copy after a lost reply applies once
                self._record_ids += 1
                record = dataclasses.replace(record, record_id=f"{self._id_prefix}{self._record_ids:x}")
                marker_ttl = -marker_ttl  # its first send: nothing to look up (record.lua)
            call = self._record_call(record, awaited=False, marker_ttl=marker_ttl)
            call.on_failure = lambda error: on_failure(record, error)
            self._enqueue(call, record.tenant)
            return
        group = self._group((record.tenant, record.period_start, record.period_end, record.bucket_start,
                             record.bucket_ttl), on_failure)
        group.merge(record)

    def add_later(self, where: RecordKey, add: Sequence[tuple[str, int]], on_failure: OnFailure) -> None:
        """`record_later()` of a record at `where` with only `add` (a response's byte counts), without building it."""
        group = self._group(where, on_failure)
        totals = group.add
        for meter, units in add:
            totals[meter] = totals.get(meter, 0) + units

    def _group(self, where: RecordKey, on_failure: OnFailure) -> _RecordGroup:
        group = self._pending_records.get(where)
        if group is None:
            group = self._pending_records[where] = _RecordGroup(where)
            self._schedule_records()
        callbacks = group.on_failure
        if not callbacks or (callbacks[-1] is not on_failure and on_failure not in callbacks):
            callbacks.append(on_failure)
        return group

    def _record_call(self, record: Record, *, awaited: bool = True, marker_ttl: int = RECORD_MARKER_TTL) -> _Call:
        tenant, period = record.tenant, record.period_start
        bucket = keys.bucket_key(tenant, record.bucket_start)
        # Without an id the marker slot still needs a key of the tenant's slot; it is never touched.
        marker = keys.record_key(tenant, record.record_id) if record.record_id else bucket
        key_list = [bucket, marker]
        counted = (*record.refund, *record.add, *record.count)
        key_list += [keys.quota_key(tenant, m, period) for m, _ in counted]
        key_list += [keys.gauge_key(tenant, m) for m, _ in record.gauges]
        args: list[Any] = [
            record.period_end + PERIOD_KEY_GRACE, record.bucket_ttl,
            marker_ttl if record.record_id else 0,
            len(record.refund), len(record.add), len(record.count), len(record.bill), len(record.gauges),
        ]
        for section in (record.refund, record.add, record.count, record.bill):
            for meter, units in section:
                keys.quota_key(tenant, meter, period)  # validates bill-only meter names too
                args += [meter, int(units)]
        for meter, value in record.gauges:
            if not math.isfinite(value):
                raise ValueError(f"gauge {meter} must be finite, got {value!r}")
            args += [meter, repr(float(value))]
        if record.check_call is not None:
            marker, index = record.check_call
            if not marker.startswith(keys.tenant_prefix(tenant)) or type(index) is not int or index < 1:
                raise ValueError(f"not a check call of tenant {tenant!r}: {record.check_call!r}")
            key_list.append(marker)
            args += [index, 2 if record.only_if_admitted else 1, CALL_MARKER_TTL]
        future = self._running_loop().create_future() if awaited else None
        return _Call(RECORD_SCRIPT, key_list, args, _applied, future)

    def _record_groups(self) -> list[_Call]:
        """The records waiting for this pipeline as calls: one per tenant, period and bucket."""
        calls = []
        for group in self._pending_records.values():
            self._record_ids += 1
            record_id = f"{self._id_prefix}{self._record_ids:x}"
            if self._resp is not None and group.adds_only():  # the common case: a response's byte counts
                call = self._add_call(group, record_id)
            else:
                merged = group.record(record_id)
                if merged.is_empty():
                    continue
                call = self._record_call(merged, awaited=False, marker_ttl=-LIVE_RECORD_MARKER_TTL)  # a first send
            call.on_failure = _spool_group(group, record_id)
            calls.append(call)
        self._pending_records = {}
        return calls

    def _add_call(self, group: _RecordGroup, record_id: str) -> _Call:
        """`_record_call` of a group holding byte counts only, in RESP already: what does not change between
        a tenant's responses in one bucket (keys, expiries, meter names) is packed once and kept."""
        meters = tuple(group.add)
        cache = self._packed_adds
        packed = cache.get((group.key, meters))
        if packed is None:
            tenant, period_start, period_end, _, bucket_ttl = group.key
            counters = [keys.quota_key(tenant, meter, period_start) for meter in meters]  # validates the names
            head = b"*%d\r\n%s%s%s%s" % (13 + 3 * len(meters), _bulk(b"EVALSHA"), _bulk(RECORD_SCRIPT.sha),
                                         _bulk(2 + len(meters)), _bulk(keys.bucket_key(tenant, group.key[3])))
            fixed = (period_end + PERIOD_KEY_GRACE, bucket_ttl, -LIVE_RECORD_MARKER_TTL, 0, len(meters), 0, 0, 0)
            middle = b"".join([*map(_bulk, counters), *map(_bulk, fixed)])
            if len(cache) >= _PACKED_ADDS:
                del cache[next(iter(cache))]  # the oldest: a tenant that has moved on to a later bucket
            packed = cache[(group.key, meters)] = (head, middle, [_bulk(meter) for meter in meters],
                                                   f"{keys.tenant_prefix(tenant)}r:")
        head, middle, names, marker = packed
        parts = [head, _bulk(marker + record_id), middle]
        for name, units in zip(names, group.add.values(), strict=True):
            parts += (name, b"$%d\r\n%d\r\n" % (len(str(units)), units))
        call = _Call(RECORD_SCRIPT, [], [], _applied, None)
        call.packed = b"".join(parts)
        return call

    # -- reads (admin, usage view, billing) ----------------------------------------------------------

    async def usage(self, tenant: str, period_start: int, meters: Sequence[str]) -> dict[str, float]:
        """Per meter: its period counter, or for a gauge its last value (missing = 0); one MGET.

        Both keys of each name are read, so callers need not say which meters are gauges: a counter
        never has a gauge key and a gauge never has a period key.
        """
        if not meters:
            return {}
        key_list = []
        for meter in meters:
            key_list += [keys.quota_key(tenant, meter, period_start), keys.gauge_key(tenant, meter)]
        async with self._guarded(self._read_timeout):
            values = await self._client.mget(key_list)
        return {
            meter: _number(values[2 * i] if values[2 * i] is not None else values[2 * i + 1])
            for i, meter in enumerate(meters)
        }

    async def shadow_hits(self, tenant: str, period_start: int) -> dict[tuple[str, str], int]:
        """(reason, meter) -> admitted requests of the period that a shadow limit would have refused; one HGETALL
        of a hash with a field per shadow rule hit (only the script writes it: a few fields at most)."""
        async with self._guarded(self._read_timeout):
            raw = await self._client.hgetall(keys.shadow_hits_key(tenant, period_start))  # type: ignore[misc]
        hits = {}
        for field, value in raw.items():
            reason, _, meter = _text(field).partition(":")
            if meter:
                hits[(reason, meter)] = int(value)
        return hits

    async def bucket(self, tenant: str, bucket_start: int) -> dict[str, float]:
        """The billing bucket of a tenant: meter -> billable value (a gauge: its last value)."""
        async with self._guarded(self._read_timeout):
            raw = await self._client.hgetall(keys.bucket_key(tenant, bucket_start))  # type: ignore[misc]
        return {_text(meter): _number(value) for meter, value in raw.items()}

    async def tenant_seen(self, tenant: str) -> bool:
        """Whether `tenant` has sent traffic (within SEEN_RETENTION)."""
        async with self._guarded(self._read_timeout):
            score = await self._client.zscore(keys.TENANTS_LAST_SEEN_KEY, tenant)
            if score is None:  # written by an older version and not moved yet
                return bool(await self._client.sismember(keys.TENANTS_SEEN_KEY, tenant))  # type: ignore[misc]
        return True

    async def tenants_seen_after(self, after: str | None, limit: int) -> list[str]:
        """Up to `limit` tenants that sent traffic, in id order, after `after` (from the first when None)."""
        async with self._guarded(self._read_timeout):
            members = await self._client.zrangebylex(keys.TENANTS_INDEX_KEY, "-" if after is None else f"({after}",
                                                     "+", start=0, num=limit)
        return [_text(member) for member in members]

    async def trim_tenants_seen(self, *, retention: float = SEEN_RETENTION, maximum: int = SEEN_MAX) -> int:
        """Forget the tenants idle for longer than `retention`, and the least recently seen beyond
        `maximum`; first move the set an older version kept into the index. Returns how many left.
        Idempotent: every gateway worker runs it now and then."""
        async with self._guarded(_SEEN_TRIM_SECONDS):  # many small calls; a deadline for them all
            await self._move_legacy_seen()
            cutoff = self._clock() - retention
            removed = 0
            while True:
                stale = await self._client.zrangebyscore(keys.TENANTS_LAST_SEEN_KEY, "-inf", f"({cutoff}",
                                                         start=0, num=_SEEN_TRIM_BATCH)
                excess = await self._client.zcard(keys.TENANTS_LAST_SEEN_KEY) - len(stale) - maximum
                if excess > 0:
                    stale += await self._client.zrange(keys.TENANTS_LAST_SEEN_KEY, len(stale),
                                                       len(stale) + min(excess, _SEEN_TRIM_BATCH) - 1)
                if not stale:
                    return removed
                await self._client.zrem(keys.TENANTS_LAST_SEEN_KEY, *stale)
                await self._client.zrem(keys.TENANTS_INDEX_KEY, *stale)
                removed += len(stale)

    async def _move_legacy_seen(self) -> None:
        now = int(self._clock())
        cursor: int | bytes = 0
        while True:
            cursor, members = await self._client.sscan(keys.TENANTS_SEEN_KEY, cursor,  # type: ignore[arg-type]
                                                       count=_SEEN_TRIM_BATCH)
            if members:
                # NX: a tenant the index has already keeps the time it was really last seen.
                await self._client.zadd(keys.TENANTS_LAST_SEEN_KEY, dict.fromkeys(members, now), nx=True)
                await self._client.zadd(keys.TENANTS_INDEX_KEY, dict.fromkeys(members, 0))
            if not int(cursor):
                break
        await self._client.delete(keys.TENANTS_SEEN_KEY)

    async def load_scripts(self) -> None:
        """SCRIPT LOAD both scripts (every primary of a cluster); done on first use and after NOSCRIPT."""
        async with self._guarded(self._read_timeout):
            await self._load()

    async def flush(self) -> None:
        """Send what is pending, wait for the pipelines in flight and for the late replies of timed-out
        ones (each resolves within LATE_REPLY_SECONDS), until nothing is left: what late replies decide
        may add records, which are sent too."""
        while self._flushes or self._pending or self._pending_records or self._late:
            if not self._flushes and (self._pending or self._pending_records):
                self._start_flush()
            await asyncio.gather(*self._flushes, *self._late, return_exceptions=True)
            await asyncio.sleep(0)  # the late replies' callbacks run, and may record more

    async def aclose(self) -> None:
        """`flush()`, then close this store's own connection; the client belongs to the caller."""
        await self.flush()
        if self._resp is not None:
            self._resp.close()

    @staticmethod
    def _guarded(seconds: float) -> _Guarded:
        """The one place where driver errors become StoreUnavailable, and where a cancellation the driver
        swallowed is raised again (redis-py catches it while disconnecting in some windows; a task that
        goes on after its cancel() never stops, so a shutdown would hang)."""
        return _Guarded(seconds)


def _spool_group(group: _RecordGroup, record_id: str) -> Callable[[StoreUnavailable], None]:
    """A record group's `on_failure`: the Record is built only if it has to be spooled."""

    def on_failure(error: StoreUnavailable) -> None:
        for callback in group.on_failure:
            callback(group.record(record_id), error)

    return on_failure


class _Guarded:
    """`RedisUsageStore._guarded`: a class, not an `asynccontextmanager`, as mypyc compiles no async generators."""

    __slots__ = ("_cancelling", "_seconds", "_task", "_timeout")

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds
        self._timeout = asyncio.timeout(seconds)
        self._task: asyncio.Task[Any] | None = None
        self._cancelling = 0

    async def __aenter__(self) -> None:
        task = self._task = asyncio.current_task()
        self._cancelling = 0 if task is None else task.cancelling()
        await self._timeout.__aenter__()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        traceback: TracebackType | None) -> None:
        error = exc
        try:
            await self._timeout.__aexit__(exc_type, exc, traceback)
        except BaseException as raised:  # TimeoutError: the time ran out
            error = raised
        task = self._task
        cancelled = task is not None and task.cancelling() > self._cancelling
        if error is None:
            if cancelled:
                raise asyncio.CancelledError
            return
        if isinstance(error, _REDIS_ERRORS) and not isinstance(error, StoreUnavailable):
            if cancelled:
                raise asyncio.CancelledError from error
            raise _unavailable(error, self._seconds) from error
        if error is exc:
            return  # it goes on as it came
        raise error

