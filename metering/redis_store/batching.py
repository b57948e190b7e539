"""The pipeline under `RedisUsageStore`: script calls made in the same event-loop iteration go out together.

`_Batcher`, the store's base class, queues calls, sends them as one non-transactional pipeline (at most
MAX_PIPELINES_IN_FLIGHT at once) and hands each call its reply. On a single node the pipeline goes over
the lean RESP connection (`resp.py`), written at once and finished by callbacks; a Redis Cluster, TLS or
a unix socket go through redis-py. A batch that timed out after it was written may still run: its late
replies are awaited (LATE_REPLY_SECONDS) so that each caller learns whether its call counted.
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from collections.abc import Callable
from typing import Any

import hiredis
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError, ResponseError

from metering.errors import REDIS_ERRORS as _REDIS_ERRORS
from metering.redis_store.calls import (
    _Call,
    _call_refs,
    _calls,
    _commands,
    _fail,
    _late_replies,
    _RecordGroup,
    _resolve_late,
    _seen_commands,
    _settle,
    _split,
    _text,
)
from metering.redis_store.resp import RespConnection
from metering.redis_store.scripts import CALL_MARKER_TTL, CHECK_SCRIPT, RECORD_SCRIPT
from metering.store import Decision, RecordKey, StoreUnavailable

log = logging.getLogger("cosmos_gateway.redis_store")
SEEN_EVERY = 60.0  # seconds between two writes of one tenant to the tenant index, per process
MAX_PIPELINES_IN_FLIGHT = 2  # more calls wait for the next pipeline instead of opening another
# While one pipeline is out, calls wait for its reply (normally a fraction of a millisecond) and go out
# together after it: fewer, larger batches. Only a pipeline still out after 10 ms lets a second one
# go, so a stalled Redis delays new calls by about its timeout (+10 ms), not by two timeouts.
SECOND_PIPELINE_AFTER = 0.01
# The request path's merged records (byte counts, refunds) wait this long at most for a pipeline that goes
# out anyway (the next checks) instead of making one of their own: at one connection that halves the round
# trips per request, and under load they already share the checks' pipelines. Within PRODUCT.md §5's bound
# of what a SIGKILL may lose (the byte records of the last 100 ms).
RECORD_WAIT = 0.01
LATE_REPLY_SECONDS = 5.0  # how long a timed-out batch's replies are awaited before the connection is dropped
_SEEN_MEMORY = 100_000  # tenants whose last write is remembered (the oldest entry is dropped first)

# Checks with the same rules in one batch go to Redis as one script call; the script still decides
# them one by one. This bounds how long one call may hold Redis.
MAX_CHECKS_PER_CALL = 256


def _reply_error(reply: hiredis.ReplyError) -> ResponseError:
    message = str(reply)
    return NoScriptError(message) if message.startswith("NOSCRIPT") else ResponseError(message)


class _Batcher:
    """Queues script calls and sends them in pipelines; `RedisUsageStore` builds the calls on top of it."""

    def __init__(self, client: Redis | RedisCluster, *, timeout: float, clock: Callable[[], float]) -> None:
        self._client = client
        # The hot path's script calls skip redis-py's Python packing and parsing on a single node.
        self._resp = RespConnection.for_client(client)
        self._timeout = timeout  # the hot path: check() and record()
        self._clock = clock
        self._loaded = False
        self._pending: list[_Call] = []
        self._pending_checks: dict[tuple[bytes, bytes], _Call] = {}  # the open check group of each shape
        self._pending_seen: set[str] = set()
        self._seen_at: dict[str, float] = {}
        self._flushes: set[asyncio.Future[None]] = set()  # batches in flight: tasks, or futures of _send_now
        self._flush_handle: asyncio.Handle | None = None  # the scheduled _start_flush
        self._records_handle: asyncio.TimerHandle | None = None  # when waiting records go out on their own
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

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

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

    def _schedule_records(self) -> None:
        """Merged records are waiting: they go with the next pipeline, or on their own after RECORD_WAIT."""
        if self._flush_handle is not None or self._records_handle is not None:
            return
        loop = self._running_loop()
        self._records_handle = loop.call_at(loop.time() + RECORD_WAIT, self._records_due)

    def _records_due(self) -> None:
        self._records_handle = None
        self._schedule_flush()

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
        if self._records_handle is not None:
            self._records_handle.cancel()
            self._records_handle = None
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
        """The records waiting in `_pending_records` as calls, emptying it (the store builds them)."""
        raise NotImplementedError

    def _flush_done(self, task: asyncio.Future[None]) -> None:
        self._flushes.discard(task)
        # Records wait for the next checks or their own time, unless that time came while pipelines were out.
        if self._pending or (self._pending_records and self._records_handle is None):
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
        for member, applied, ref in zip(calls, outcomes, _call_refs(batch), strict=True):
            _fail(member, StoreUnavailable(str(exc), applied=applied, call=ref))

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


def _unavailable(exc: BaseException, seconds: float) -> StoreUnavailable:
    """A driver error (or a timeout after `seconds`) as StoreUnavailable."""
    detail = f"timed out after {seconds * 1000:.0f} ms" if isinstance(exc, TimeoutError) else repr(exc)
    return StoreUnavailable(f"redis: {detail}")
