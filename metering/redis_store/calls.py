"""One script call waiting for a pipeline, how a batch of them is written, and how each reply (or
failure) reaches whoever waits for it. Nothing here does I/O.

    _Call         a record, a check, or a group of checks sharing their rules, sent as one EVALSHA
    _Check        one request's check inside a group: what the group's reply is split among
    _RecordGroup  the request path's records of one tenant, period and bucket, summed up for one call

`_settle` hands a call its reply and `_fail` its error; a caller that gave up after the call was written
is told through `on_abandoned`, because the call may still have counted.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import hiredis
from redis.exceptions import ResponseError

from metering import keys
from metering.redis_store.scripts import CHECK_SCRIPT, PreparedCheck, _Script
from metering.store import CallRef, Decision, OnAbandoned, OnFailure, Record, RecordKey, StoreUnavailable


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

    def adds_only(self) -> bool:
        """Only byte counts: a response's, the common case (`RedisUsageStore._add_call`)."""
        return bool(self.add) and not (self.refund or self.count or self.bill or self.gauges)

    def record(self, record_id: str | None = None) -> Record:
        tenant, period_start, period_end, bucket_start, bucket_ttl = self.key
        return Record(tenant, period_start, period_end, bucket_start, bucket_ttl,
                      refund=tuple(self.refund.items()), add=tuple(self.add.items()),
                      gauges=tuple(self.gauges.items()), count=tuple(self.count.items()),
                      bill=tuple(self.bill.items()), record_id=record_id)


def _resolve_late(calls: list[_Call | _Check], replies: list[Any], outcomes: list[asyncio.Future[bool]]) -> None:
    """Whether each call of a timed-out batch counted, from its late reply (False when none came)."""
    for call, reply, outcome in zip(calls, replies or [None] * len(calls), outcomes, strict=True):
        counted = reply is not None and not isinstance(reply, hiredis.ReplyError | Exception)
        if counted and call.script is CHECK_SCRIPT:
            counted = reply.allowed  # a check's reply is its Decision (`_split`); a refused one counted nothing
        if not outcome.done():
            outcome.set_result(counted)


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
    except (TypeError, ValueError, AttributeError, IndexError) as exc:  # a script and this package out of step
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
    if isinstance(call, _Check):  # a group's check is settled by its group (`_deliver`), never parsed alone
        _fail(call, StoreUnavailable(f"unexpected reply {reply!r}: a check of a group"))
        return
    try:
        result = call.parse(reply)
    except (TypeError, ValueError, AttributeError) as exc:  # a script and this package out of step
        _fail(call, StoreUnavailable(f"unexpected reply {reply!r}: {exc}"))
        return
    if not future.done():
        future.set_result(result)
    elif future.cancelled() and call.on_abandoned is not None:
        call.on_abandoned(result)  # the caller gave up after the call was sent: it may have counted


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _applied(reply: Any) -> bool:
    return reply == 1
