"""Usage counters in Redis: one Lua script per decision, concurrent calls batched into one pipeline.

    StoreUnavailable      Redis down, slow (past `timeout`), or answering errors; every driver error
                          (connection, timeout, response, cluster) is translated into it here, once.

`check()` runs `lua/check_and_count.lua`: rate (GCRA), counter quotas and gauge guards decided at once,
counted only when all pass. `record()` runs `lua/record.lua`: refunds, byte counts, gauges, and the
idempotency marker of a spool replay. Calls made in the same event-loop iteration share one
non-transactional pipeline, so round trips do not grow with concurrency. Every key of one call carries
the tenant's hash tag, so each script touches one cluster slot; a cluster pipeline is split by node.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import hiredis
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError, ResponseError

from metering import keys
from metering.errors import REDIS_ERRORS
from metering.resp import RespConnection
from metering.store import (
    CallRef,
    Check,
    Decision,
    OnAbandoned,
    OnFailure,
    Record,
    RecordKey,
    StoreUnavailable,
)

log = logging.getLogger("cosmos_gateway.redis_store")
PERIOD_KEY_GRACE = 7 * 86400  # period counters outlive their period by a week (late records, usage view)
RECORD_MARKER_TTL = 7 * 86400  # a spooled record replayed again within a week is applied once
# Records sent from the request path carry an id too, marked for this long: when a batch's reply is lost
# (a dropped connection, a timeout without a late reply) the record is spooled, and its replay is skipped
# if Redis had applied it after all. Replay starts within seconds of Redis answering again; only an outage
# longer than this after a lost reply leaves a window for counting that record twice. Short, because the
# hot path writes one marker per tenant and pipeline.
LIVE_RECORD_MARKER_TTL = 900
# How long a check call's marker stays (check_and_count.lua): the same window, for the same reason.
CALL_MARKER_TTL = LIVE_RECORD_MARKER_TTL
_CALL_TTL_ARG = b"$%d\r\n%d\r\n" % (len(str(CALL_MARKER_TTL)), CALL_MARKER_TTL)
SEEN_EVERY = 60.0  # seconds between two writes of one tenant to the tenant index, per process
# A tenant that sent no traffic for this long leaves the index (its usage keys are gone by then: two
# periods and PERIOD_KEY_GRACE), and the index never holds more than SEEN_MAX tenants (the least
# recently seen go first), so neither a long life nor a flood of tenant ids grows it without bound.
SEEN_RETENTION = 70 * 86_400
SEEN_MAX = 1_000_000
_SEEN_TRIM_BATCH = 1000
_SEEN_TRIM_SECONDS = 60.0
MAX_PIPELINES_IN_FLIGHT = 2  # more calls wait for the next pipeline instead of opening another
# While one pipeline is out, calls wait for its reply (normally a fraction of a millisecond) and go out
# together after it: fewer, larger batches. Only a pipeline still out after 10 ms lets a second one
# go, so a stalled Redis delays new calls by about its timeout (+10 ms), not by two timeouts.
SECOND_PIPELINE_AFTER = 0.01
LATE_REPLY_SECONDS = 5.0  # how long a timed-out batch's replies are awaited before the connection is dropped
_SEEN_MEMORY = 100_000  # tenants whose last write is remembered (the oldest entry is dropped first)

_REDIS_ERRORS = REDIS_ERRORS

class _Script:
    __slots__ = ("sha", "source")

    def __init__(self, name: str) -> None:
        self.source = (resources.files("metering") / "lua" / name).read_text(encoding="utf-8")
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()


CHECK_SCRIPT = _Script("check_and_count.lua")
RECORD_SCRIPT = _Script("record.lua")


@dataclass(frozen=True, slots=True)
class PreparedCheck:
    """A check's script keys and arguments except the times (see `RedisUsageStore.prepare`).

    `head` and `tail` are the EVALSHA command already in RESP around the times of its requests, so
    sending it costs a concatenation instead of packing two dozen arguments per request.
    """

    tenant: str
    keys: list[str]
    args: list[Any]
    head: bytes  # EVALSHA, the sha, the number of keys and the keys, without the argument count
    tail: bytes  # the arguments after the times
    argc: int  # the command's arguments without the times
    used_names: tuple[str, ...]  # the meters of a decision's `used` values: counters, then guards
    used_units: tuple[int, ...]  # what one admitted request adds to each of them (0 for a guard)
    shape: tuple[bytes, bytes]  # (head, tail): equal for checks that may share one script call

    def decide(self, reply: Any, n: int) -> list[Decision]:
        """The decisions of the `n` requests of one script call, from its reply (see check_and_count.lua)."""
        if not isinstance(reply, list) or len(reply) != n + 1 or len(reply[0]) != len(self.used_names):
            raise ValueError(f"not a reply to {n} checks of {len(self.used_names)} meters")
        names, units = self.used_names, self.used_units
        # No client here decodes replies: float() takes a number's bytes as they are.
        before = [float(value) for value in reply[0]]
        one = len(names) == 1  # the common case: a dict literal costs a fraction of a comprehension
        decisions = []
        admitted = 0
        for item in reply[1:]:
            if item.__class__ is int:  # admitted: the rate's remaining, or -1
                admitted += 1
                allowed, reason, meter, retry_after, remaining = True, None, None, 0.0, item
            else:
                allowed, retry_after = False, float(item[2])
                reason, meter, remaining = item[0].decode(), item[1].decode() or None, item[3]
            if one:
                used = {names[0]: before[0] + units[0] * admitted}
            else:
                used = {name: start + unit * admitted for name, start, unit in zip(names, before, units, strict=True)}
            decisions.append(Decision(allowed, reason, meter, retry_after, used, None if remaining < 0 else remaining))
        return decisions

    def pack(self, nows: Sequence[bytes], call_id: str) -> bytes:
        """The whole command for requests at `nows` (microseconds, as digits) in the call `call_id`."""
        return b"".join((b"*%d\r\n" % (self.argc + len(nows) + 2), self.head, _bulk(len(nows)),
                         *[b"$%d\r\n%s\r\n" % (len(now), now) for now in nows], _bulk(call_id), _CALL_TTL_ARG,
                         self.tail))


class _Call:
    """One script call waiting for a pipeline: a record, a check, or a group of checks sent as one call
    (`members`). `future` is None for calls nobody awaits: records of `record_later` and groups."""

    __slots__ = ("args", "future", "keys", "marker", "members", "on_failure", "packed", "parse", "prepared",
                 "script")
    on_abandoned = None  # only the checks of a group (`_Check`) are told what they counted late

    def __init__(self, script: _Script, keys: list[str], args: list[Any], parse: Callable[[Any], Any],
                 future: asyncio.Future[Any] | None) -> None:
        self.script = script
        self.keys = keys
        self.args = args
        self.parse = parse
        self.future = future
        self.on_failure: Callable[[StoreUnavailable], None] | None = None
        self.packed: bytes | None = None  # a group of checks: the command in RESP already, for the RESP connection
        self.prepared: PreparedCheck | None = None  # a group of checks: the rules they share
        self.members: list[_Check] | None = None  # a group of checks: those checks, in order
        self.marker: str | None = None  # a group of checks, once sent: its call marker (check_and_count.lua)


class _Check:
    """One request's check inside a group (`_Call.members`): what the group's reply is split among.

    It answers to the attributes of a `_Call` that the reply and failure paths read; the constant ones
    live on the class, so that creating one per request sets only what differs.
    """

    __slots__ = ("future", "now", "on_abandoned")
    script = CHECK_SCRIPT
    members = None
    on_failure = None

    def __init__(self, future: asyncio.Future[Decision], now: bytes, on_abandoned: OnAbandoned | None) -> None:
        self.future = future
        self.now = now  # the request's time in whole microseconds, as digits
        self.on_abandoned = on_abandoned


def _bulk(value: Any) -> bytes:
    """One RESP bulk string, encoded as redis-py and hiredis encode arguments."""
    data = value if isinstance(value, bytes) else str(value).encode()
    return b"$%d\r\n%s\r\n" % (len(data), data)


class _RecordGroup:
    """The records of one tenant, period and bucket waiting for the same pipeline, summed up."""

    __slots__ = ("add", "bill", "count", "gauges", "key", "on_failure", "refund")

    def __init__(self, key: RecordKey) -> None:
        self.key = key
        self.refund: dict[str, int] = {}
        self.add: dict[str, int] = {}
        self.count: dict[str, int] = {}
        self.bill: dict[str, int] = {}
        self.gauges: dict[str, float] = {}  # in arrival order: the last report wins, as in Redis
        self.on_failure: list[OnFailure] = []

    def merge(self, record: Record) -> None:
        for totals, units in ((self.refund, record.refund), (self.add, record.add), (self.count, record.count),
                              (self.bill, record.bill)):
            for meter, n in units:
                totals[meter] = totals.get(meter, 0) + int(n)
        self.gauges.update(record.gauges)

    def record(self, record_id: str | None = None) -> Record:
        tenant, period_start, period_end, bucket_start, bucket_ttl = self.key
        return Record(tenant, period_start, period_end, bucket_start, bucket_ttl,
                      refund=tuple(self.refund.items()), add=tuple(self.add.items()),
                      gauges=tuple(self.gauges.items()), count=tuple(self.count.items()),
                      bill=tuple(self.bill.items()), record_id=record_id)


def _reply_error(reply: hiredis.ReplyError) -> ResponseError:
    message = str(reply)
    return NoScriptError(message) if message.startswith("NOSCRIPT") else ResponseError(message)


def _resolve_late(calls: list[_Call | _Check], replies: list[Any], outcomes: list[asyncio.Future[bool]]) -> None:
    """Whether each call of a timed-out batch counted, from its late reply (False when none came)."""
    for call, reply, outcome in zip(calls, replies or [None] * len(calls), outcomes, strict=True):
        counted = reply is not None and not isinstance(reply, hiredis.ReplyError | Exception)
        if counted and call.script is CHECK_SCRIPT:
            counted = reply.allowed  # a check's reply is its Decision (`_split`); a refused one counted nothing
        if not outcome.done():
            outcome.set_result(counted)


# Checks with the same rules in one batch go to Redis as one script call; the script still decides
# them one by one. This bounds how long one call may hold Redis.
MAX_CHECKS_PER_CALL = 256


def _no_parse(reply: Any) -> Any:
    raise TypeError("the reply to a group of checks is split among them, not parsed whole")


def _calls(batch: list[_Call]) -> list[_Call | _Check]:
    """The calls of a batch with each group of checks replaced by its checks."""
    return [member for call in batch for member in (call.members if call.members is not None else (call,))]


def _call_refs(batch: list[_Call]) -> list[CallRef | None]:
    """For each of `_calls(batch)`: its call marker and place for a check of a sent group, else None."""
    refs: list[CallRef | None] = []
    for call in batch:
        if call.members is None:
            refs.append(None)
        elif call.marker is None:
            refs += [None] * len(call.members)
        else:
            refs += [(call.marker, index) for index in range(1, len(call.members) + 1)]
    return refs


def _expand(batch: list[_Call], replies: list[Any]) -> list[Any]:
    """The reply of each of `_calls(batch)`, from the replies to `batch` (None where a reply is missing)."""
    out: list[Any] = []
    for i, call in enumerate(batch):
        reply = replies[i] if i < len(replies) else None
        if call.members is None:
            out.append(reply)
        else:
            out += _split(reply, call)
    return out


def _split(reply: Any, group: _Call) -> list[Any]:
    """A group's reply as the Decision of each of its checks; an error (or a reply of the wrong shape) for each."""
    assert group.members is not None and group.prepared is not None
    n = len(group.members)
    if reply is None or isinstance(reply, hiredis.ReplyError | Exception):
        return [reply] * n
    try:
        return group.prepared.decide(reply, n)
    except (TypeError, ValueError, AttributeError, IndexError) as exc:  # a script and this module out of step
        return [ResponseError(f"unexpected reply to {n} checks: {exc}; {reply!r}"[:300])] * n


def _late_replies(done: asyncio.Future[list[Any]], batch: list[_Call]) -> list[Any]:
    """The replies of a timed-out batch's calls once they came late; empty when they never did."""
    if done.cancelled() or done.exception() is not None:
        return []
    return _expand(batch, done.result()[:len(batch)])


def _fail(call: _Call | _Check, error: StoreUnavailable) -> None:
    if call.members is not None:
        marker = call.marker  # type: ignore[union-attr]
        for index, member in enumerate(call.members, 1):
            _fail(member, error if marker is None else error.for_call((marker, index)))
        return
    future = call.future
    if future is None:
        if call.on_failure is not None:
            call.on_failure(error)
    elif not future.done():
        future.set_exception(error)
    elif future.cancelled() and call.on_abandoned is not None:
        call.on_abandoned(error)


def _commands(batch: list[_Call], seen: set[str], now: float) -> list[bytes | tuple[Any, ...]]:
    """A batch as commands for the RESP connection (packed already, or argument tuples)."""
    commands: list[bytes | tuple[Any, ...]] = [
        call.packed if call.packed is not None else ("EVALSHA", call.script.sha, len(call.keys), *call.keys, *call.args)
        for call in batch]
    commands.extend(_seen_commands(seen, now))
    return commands


def _seen_commands(seen: set[str], now: float) -> list[tuple[Any, ...]]:
    """The tenant index writes for `seen` (none when empty). The index keys have no hash tag, so no
    script can write them; they ride along in the pipeline, and their replies come last."""
    if not seen:
        return []
    ordered = sorted(seen)
    return [("ZADD", keys.TENANTS_INDEX_KEY, *(part for t in ordered for part in (0, t))),
            ("ZADD", keys.TENANTS_LAST_SEEN_KEY, *(part for t in ordered for part in (int(now), t)))]


def _settle(call: _Call | _Check, reply: Any) -> None:
    """Hand one call its reply: to the caller, or for a caller that gave up, to `on_abandoned`."""
    future = call.future
    if future is None:
        if isinstance(reply, Exception):
            _fail(call, StoreUnavailable(f"redis: {reply}"))
        return
    if isinstance(reply, Exception):
        error = StoreUnavailable(f"redis: {reply}")
        error.__cause__ = reply
        _fail(call, error)
        return
    try:
        result = call.parse(reply)
    except (TypeError, ValueError, AttributeError) as exc:  # a script and this module out of step
        _fail(call, StoreUnavailable(f"unexpected reply {reply!r}: {exc}"))
        return
    if not future.done():
        future.set_result(result)
    elif future.cancelled() and call.on_abandoned is not None:
        call.on_abandoned(result)  # the caller gave up after the call was sent: it may have counted


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _number(value: Any) -> float:
    return 0.0 if value is None else float(_text(value))


def _applied(reply: Any) -> bool:
    return reply == 1


class RedisUsageStore:
    """Counters, gauges and billing buckets of all tenants in one Redis (single node or cluster)."""

    def __init__(
        self,
        client: Redis | RedisCluster,
        *,
        timeout: float = 0.05,
        clock: Callable[[], float] = time.time,
        read_timeout: float = 1.0,
    ) -> None:
        self._client = client
        # The hot path's script calls skip redis-py's Python packing and parsing on a single node.
        self._resp = RespConnection.for_client(client)
        self._timeout = timeout  # the hot path: check() and record()
        self._read_timeout = read_timeout  # usage views and billing reads
        self._clock = clock
        self._loaded = False
        self._pending: list[_Call] = []
        self._pending_checks: dict[tuple[bytes, bytes], _Call] = {}  # the open check group of each shape
        self._pending_seen: set[str] = set()
        self._seen_at: dict[str, float] = {}
        self._flushes: set[asyncio.Future[None]] = set()  # batches in flight: tasks, or futures of _send_now
        self._flush_handle: asyncio.Handle | None = None  # the scheduled _start_flush
        self._sent_at = 0.0  # loop time the newest pipeline was sent
        self._pending_records: dict[RecordKey, _RecordGroup] = {}
        # Replies of timed-out batches still awaited (LATE_REPLY_SECONDS at most): what they decide (count,
        # spool, give back) must happen before a shutdown closes the spool.
        self._late: set[asyncio.Future[list[Any]]] = set()
        # Ids of the request path's merged records: unique per process (a random prefix) and cheap (a count).
        self._id_prefix = f"l{uuid.uuid4().hex[:12]}-"
        self._record_ids = 0
        self._call_ids = 0
        self.round_trips = 0  # pipelines sent (a cluster pipeline is one per node, concurrently)
        # The loop the store is first used in, and stays in (as a redis-py client does). Kept because
        # asyncio.get_running_loop() makes a getpid() system call each time on Linux (Python 3.11).
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- the hot path -------------------------------------------------------------------------------

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    async def check(self, check: Check) -> Decision:
        """Decide and count one request; batched with the calls of the same loop iteration."""
        return await self.submit_check(self.prepare(check), check.now)

    def prepare(self, check: Check) -> PreparedCheck:
        """The script's keys and arguments for `check`, all but the time: reusable while they stay the same.

        A tenant's requests to one route within one billing bucket differ only in `now`; the limiter keeps
        the prepared form and skips rebuilding a dozen key strings per request.
        """
        counter_keys = [keys.quota_key(check.tenant, c.meter, check.period_start) for c in check.counters]
        gauge_keys = [keys.gauge_key(check.tenant, g.meter) for g in check.guards]
        rate = check.rate
        args: list[Any] = [
            check.period_end + PERIOD_KEY_GRACE, check.period_end, check.bucket_ttl,
            1 if rate else 0, repr(float(rate.per_second)) if rate else 0, rate.burst if rate else 0,
            len(check.counters),
        ]
        for c in check.counters:
            args += [c.meter, c.units, "" if c.limit is None else c.limit, 1 if c.enforce else 0]
        args.append(len(check.guards))
        for g in check.guards:
            args += [g.meter, repr(float(g.limit))]
        args.append(len(check.billable))
        for meter, units in check.billable:
            args += [meter, units]
        key_list = [
            keys.rate_key(check.tenant), keys.bucket_key(check.tenant, check.bucket_start),
            *counter_keys, *gauge_keys,
        ]
        parts = [b"EVALSHA", CHECK_SCRIPT.sha, len(key_list), *key_list]
        head, tail = b"".join(_bulk(part) for part in parts), b"".join(_bulk(arg) for arg in args)
        return PreparedCheck(check.tenant, key_list, args, head, tail, argc=len(parts) + 1 + len(args),
                             used_names=tuple(c.meter for c in check.counters) + tuple(g.meter for g in check.guards),
                             used_units=tuple(c.units for c in check.counters) + (0,) * len(check.guards),
                             shape=(head, tail))

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
        the folded record. Nothing is delayed by this: the merged call goes out in the pipeline the parts
        would have taken.
        """
        if record.is_empty():
            return
        if record.record_id is not None or record.check_call is not None:  # replays and conditions: a call each
            if record.record_id is None:  # an id, so that a spooled copy after a lost reply applies once
                self._record_ids += 1
                record = dataclasses.replace(record, record_id=f"{self._id_prefix}{self._record_ids:x}")
            call = self._record_call(record, awaited=False, marker_ttl=LIVE_RECORD_MARKER_TTL)
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
            self._schedule_flush()
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

    async def bucket(self, tenant: str, bucket_start: int) -> dict[str, float]:
        """The billing bucket of a tenant: meter -> billable value (a gauge: its last value)."""
        async with self._guarded(self._read_timeout):
            raw = await self._client.hgetall(keys.bucket_key(tenant, bucket_start))
        return {_text(meter): _number(value) for meter, value in raw.items()}

    async def tenant_seen(self, tenant: str) -> bool:
        """Whether `tenant` has sent traffic (within SEEN_RETENTION)."""
        async with self._guarded(self._read_timeout):
            score = await self._client.zscore(keys.TENANTS_LAST_SEEN_KEY, tenant)
            if score is None:  # written by an older version and not moved yet
                return bool(await self._client.sismember(keys.TENANTS_SEEN_KEY, tenant))
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
            cursor, members = await self._client.sscan(keys.TENANTS_SEEN_KEY, cursor, count=_SEEN_TRIM_BATCH)
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

    # -- batching ------------------------------------------------------------------------------------

    async def _submit(self, call: _Call, tenant: str) -> Any:
        self._enqueue(call, tenant)
        assert call.future is not None
        return await call.future

    def _enqueue(self, call: _Call, tenant: str) -> None:
        self._pending.append(call)
        self._schedule_flush()
        now = self._clock()
        seen_at = self._seen_at
        if now - seen_at.get(tenant, -math.inf) >= SEEN_EVERY:
            if tenant not in seen_at and len(seen_at) >= _SEEN_MEMORY:
                del seen_at[next(iter(seen_at))]  # the oldest: at worst it is written again a minute early
            seen_at[tenant] = now
            self._pending_seen.add(tenant)

    def _schedule_flush(self) -> None:
        if self._flush_handle is not None:
            return
        loop = self._running_loop()
        in_flight = len(self._flushes)
        if in_flight == 0:
            self._flush_handle = loop.call_soon(self._start_flush)
        elif in_flight < MAX_PIPELINES_IN_FLIGHT:
            self._flush_handle = loop.call_at(self._sent_at + SECOND_PIPELINE_AFTER, self._start_flush)
        # else: the next pipeline goes out when one in flight is done (_flush_done)

    def _start_flush(self) -> None:
        """Send everything pending as one pipeline.

        At most MAX_PIPELINES_IN_FLIGHT pipelines are out at once; calls made meanwhile wait for the
        next one. Under load the batches grow instead of the number of round trips, which is what
        keeps Redis work per request flat.
        """
        self._flush_handle = None
        if not (self._pending or self._pending_records) or len(self._flushes) >= MAX_PIPELINES_IN_FLIGHT:
            return
        self._sent_at = self._running_loop().time()
        batch = []
        for call in self._pending:
            if call.members is not None:
                # A check whose caller gave up before it was sent is dropped: it must count nothing.
                members = call.members = [m for m in call.members if not m.future.done()]  # type: ignore[union-attr]
                if not members:
                    continue
                prepared = call.prepared
                assert prepared is not None
                nows = [m.now for m in members]
                self._call_ids += 1
                call_id = f"{self._id_prefix}{self._call_ids:x}"
                call.marker = f"{prepared.keys[1]}:c:{call_id}"  # beside the bucket key: the tenant's slot
                if self._resp is not None:  # the RESP connection sends the command as it is
                    call.packed = prepared.pack(nows, call_id)
                else:  # redis-py packs the arguments (a cluster, TLS)
                    call.args = [len(nows), *nows, call_id, CALL_MARKER_TTL, *prepared.args]
            batch.append(call)
        self._pending = []
        self._pending_checks = {}
        if self._pending_records:
            batch += self._record_groups()
        seen, self._pending_seen = self._pending_seen, set()
        if not batch and not seen:
            return
        protocol = self._resp.ready() if self._resp is not None and self._loaded else None
        if protocol is not None:
            self._send_now(batch, seen, protocol)
            return
        # First use, a lost connection or a cluster: the coroutine that can connect and load the scripts.
        task = self._running_loop().create_task(self._flush(batch, seen))
        self._flushes.add(task)
        task.add_done_callback(self._flush_done)

    def _send_now(self, batch: list[_Call], seen: set[str], protocol: Any) -> None:
        """The hot path of `_flush` on a live RESP connection: written now, finished by callbacks.

        Same outcome as `_flush`, without a task, a timeout context and a shield per batch.
        """
        assert self._resp is not None
        loop = self._running_loop()
        try:
            reply = self._resp.send(_commands(batch, seen, self._clock()), protocol)
        except Exception as exc:  # nothing was written: nothing can have counted
            log.exception("could not write a Redis batch")
            self._give_up_batch(batch, seen, StoreUnavailable(f"redis: {exc!r}"), None)
            return
        self.round_trips += 1
        done: asyncio.Future[None] = loop.create_future()  # what flush() and the in-flight cap count
        self._flushes.add(done)
        done.add_done_callback(self._flush_done)
        timer = loop.call_at(loop.time() + self._timeout, self._batch_timed_out, batch, seen, reply, done)
        reply.add_done_callback(lambda answer: self._batch_answered(batch, seen, answer, timer, done))

    def _batch_answered(self, batch: list[_Call], seen: set[str], answer: asyncio.Future[list[Any]],
                        timer: asyncio.TimerHandle, done: asyncio.Future[None]) -> None:
        if done.done():
            return  # timed out first: _give_up_batch resolves the calls from this late answer
        timer.cancel()
        done.set_result(None)
        try:
            error = answer.exception()
            if error is not None:  # the connection was lost: the batch's outcome is unknown
                self._give_up_batch(batch, seen, _unavailable(error, self._timeout), None)
                return
            replies = self._resp_replies(list(answer.result()), len(batch), seen)
            again = [call for call, reply in zip(batch, replies, strict=True) if isinstance(reply, NoScriptError)]
            if again:  # Redis restarted (or SCRIPT FLUSH): those ran nowhere; load and send them again
                self._loaded = False
                self._pending += again
                self._schedule_flush()
                replies = [reply for reply in replies if not isinstance(reply, NoScriptError)]
                batch = [call for call in batch if call not in again]
            self._deliver(batch, replies)
        except Exception as exc:  # a bug here must not leave requests waiting forever
            log.exception("unexpected error handling a Redis batch")
            for call in batch:
                _fail(call, StoreUnavailable(f"unexpected error: {exc!r}"))

    def _batch_timed_out(self, batch: list[_Call], seen: set[str], reply: asyncio.Future[list[Any]],
                         done: asyncio.Future[None]) -> None:
        if reply.done():
            return  # answered just as the time ran out: its callback, already due, counts it as on time
        done.set_result(None)
        self._give_up_batch(batch, seen, _unavailable(TimeoutError(), self._timeout), reply)

    def _record_groups(self) -> list[_Call]:
        calls = []
        for group in self._pending_records.values():
            self._record_ids += 1
            merged = group.record(f"{self._id_prefix}{self._record_ids:x}")
            if merged.is_empty():
                continue
            call = self._record_call(merged, awaited=False, marker_ttl=LIVE_RECORD_MARKER_TTL)
            callbacks = group.on_failure
            call.on_failure = lambda error, merged=merged, callbacks=callbacks: [  # type: ignore[misc]
                callback(merged, error) for callback in callbacks]
            calls.append(call)
        self._pending_records = {}
        return calls

    def _flush_done(self, task: asyncio.Future[None]) -> None:
        self._flushes.discard(task)
        if self._pending or self._pending_records:
            if self._flush_handle is not None:  # a second pipeline was due later: send now instead
                self._flush_handle.cancel()
            self._flush_handle = self._running_loop().call_soon(self._start_flush)

    async def _flush(self, batch: list[_Call], seen: set[str]) -> None:
        sent: list[asyncio.Future[list[Any]]] = []  # the RESP reply futures of what was written
        try:
            try:
                # Not _guarded(): this runs per batch, and a generator-based context manager costs more.
                async with asyncio.timeout(self._timeout):
                    replies = await self._send(batch, seen, sent)
            except StoreUnavailable:
                raise
            except _REDIS_ERRORS as exc:
                raise _unavailable(exc, self._timeout) from exc
            except Exception as exc:  # a bug here must not leave requests waiting forever
                log.exception("unexpected error sending a Redis batch")
                raise StoreUnavailable(f"unexpected error: {exc!r}") from exc
        except StoreUnavailable as exc:
            answered = len(sent) == 1 and sent[0].done() and not sent[0].cancelled() and sent[0].exception() is None
            if answered:
                # The replies were in just as the time ran out: they count, exactly as if on time.
                convert = self._resp_replies if self._resp is not None else self._pipeline_replies
                replies = convert(list(sent[0].result()), len(batch), seen)
                if not any(isinstance(reply, NoScriptError) for reply in replies):
                    self._deliver(batch, replies)
                    return
            self._give_up_batch(batch, seen, exc, sent[0] if len(sent) == 1 and not sent[0].done() else None)
            return
        self._deliver(batch, replies)

    def _give_up_batch(self, batch: list[_Call], seen: set[str], exc: StoreUnavailable,
                       late: asyncio.Future[list[Any]] | None) -> None:
        """Fail a batch that Redis did not answer in time (or at all)."""
        for tenant in seen:
            self._seen_at.pop(tenant, None)
        if late is None:
            for call in batch:
                _fail(call, exc)
            return
        # Written but unanswered in time: the scripts may still run. Each caller learns later whether
        # its call counted, and the connection is dropped if the replies do not come at all.
        if self._resp is not None:  # redis-py's own socket timeouts end a cluster pipeline
            self._running_loop().call_later(LATE_REPLY_SECONDS, self._resp.give_up, late)
        calls = _calls(batch)
        outcomes = [self._running_loop().create_future() for _ in calls]
        self._late.add(late)
        late.add_done_callback(self._late.discard)
        late.add_done_callback(lambda done: _resolve_late(calls, _late_replies(done, batch), outcomes))
        for call, applied, ref in zip(calls, outcomes, _call_refs(batch), strict=True):
            _fail(call, StoreUnavailable(str(exc), applied=applied, call=ref))

    @staticmethod
    def _deliver(batch: list[_Call], replies: list[Any]) -> None:
        for call, reply in zip(batch, replies, strict=True):
            if call.members is None:
                _settle(call, reply)
                continue
            outcomes = _split(reply, call)
            if outcomes[0].__class__ is not Decision:  # an error for each
                for member, error in zip(call.members, outcomes, strict=True):
                    _settle(member, error)
                continue
            for member, decision in zip(call.members, outcomes, strict=True):  # _settle of a Decision, inlined
                future = member.future
                if not future.done():
                    future.set_result(decision)
                elif future.cancelled() and member.on_abandoned is not None:
                    member.on_abandoned(decision)  # the caller gave up after the call was sent: it may have counted

    async def _send(self, batch: list[_Call], seen: set[str],
                    sent: list[asyncio.Future[list[Any]]] | None = None) -> list[Any]:
        if not self._loaded:
            await self._load()
        replies = await self._pipeline(batch, seen, sent)
        again = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if again:  # Redis restarted (or SCRIPT FLUSH): load and send just those once more
            await self._load()
            for i, reply in zip(again, await self._pipeline([batch[i] for i in again], set()), strict=True):
                replies[i] = reply
        return replies

    async def _pipeline(self, batch: list[_Call], seen: set[str],
                        sent: list[asyncio.Future[list[Any]]] | None = None) -> list[Any]:
        if self._resp is not None:
            return await self._resp_pipeline(batch, seen, sent)
        pipe = self._client.pipeline(transaction=False)
        for call in batch:
            # Not pipe.evalsha(): redis-py blocks that name in cluster pipelines, as a script's keys could
            # span slots. Ours never do (one tenant's hash tag), and EVALSHA is routed by its keys.
            pipe.execute_command("EVALSHA", call.script.sha, len(call.keys), *call.keys, *call.args)
        for command in _seen_commands(seen, self._clock()):
            pipe.execute_command(*command)
        self.round_trips += 1
        # A task, shielded, so that a timeout still learns what the pipeline did (see _flush).
        execution: asyncio.Future[list[Any]] = asyncio.ensure_future(pipe.execute(raise_on_error=False))
        if sent is not None:
            sent.append(execution)
        return self._pipeline_replies(list(await asyncio.shield(execution)), len(batch), seen)

    def _pipeline_replies(self, replies: list[Any], calls: int, seen: set[str]) -> list[Any]:
        if seen and any(isinstance(reply, Exception) for reply in replies[calls:]):
            self._forget_seen(seen)
        return replies[:calls]

    def _forget_seen(self, seen: set[str]) -> None:
        """The index writes for `seen` failed: they go out again with the tenants' next calls."""
        for tenant in seen:
            self._seen_at.pop(tenant, None)

    async def _resp_pipeline(self, batch: list[_Call], seen: set[str],
                             sent: list[asyncio.Future[list[Any]]] | None = None) -> list[Any]:
        assert self._resp is not None
        commands = _commands(batch, seen, self._clock())
        self.round_trips += 1
        protocol = await self._resp.connect()
        reply = self._resp.send(commands, protocol)
        if sent is not None:
            sent.append(reply)
        # Shielded: a timeout must leave the reply future alone, so that it still tells what happened.
        return self._resp_replies(await asyncio.shield(reply), len(batch), seen)

    def _resp_replies(self, replies: list[Any], calls: int, seen: set[str]) -> list[Any]:
        if seen and any(isinstance(reply, hiredis.ReplyError) for reply in replies[calls:]):
            self._forget_seen(seen)
        return [_reply_error(reply) if isinstance(reply, hiredis.ReplyError) else reply for reply in replies[:calls]]

    async def _load(self) -> None:
        for script in (CHECK_SCRIPT, RECORD_SCRIPT):
            sha = _text(await self._client.script_load(script.source))
            if sha != script.sha:
                raise StoreUnavailable(f"SCRIPT LOAD returned {sha}, expected {script.sha}")
        self._loaded = True

    @contextlib.asynccontextmanager
    async def _guarded(self, seconds: float) -> AsyncIterator[None]:
        """The one place where driver errors become StoreUnavailable, and where a cancellation the driver
        swallowed is raised again (redis-py catches it while disconnecting in some windows; a task that
        goes on after its cancel() never stops, so a shutdown would hang)."""
        task = asyncio.current_task()
        cancelling = 0 if task is None else task.cancelling()
        try:
            async with asyncio.timeout(seconds):
                yield
        except StoreUnavailable:
            raise
        except _REDIS_ERRORS as exc:
            if task is not None and task.cancelling() > cancelling:
                raise asyncio.CancelledError from exc
            raise _unavailable(exc, seconds) from exc
        if task is not None and task.cancelling() > cancelling:
            raise asyncio.CancelledError


def _unavailable(exc: BaseException, seconds: float) -> StoreUnavailable:
    """A driver error (or a timeout after `seconds`) as StoreUnavailable."""
    detail = f"timed out after {seconds * 1000:.0f} ms" if isinstance(exc, TimeoutError) else repr(exc)
    return StoreUnavailable(f"redis: {detail}")
