"""The billing sync worker: closed buckets into the ledger, pending ledger rows to Stripe (PRODUCT.md §8).

One pass (`run_once`):

    Redis buckets --move_closed_buckets--> usage_ledger (pending) --sender--> Stripe
                                              |  2xx / duplicate -> sent
                                              |  transient       -> pending, attempts+1, backoff
                                              |  permanent       -> parked (reason)

Exactly once does not rest on the leader lock: a bucket has one identifier forever, a row is marked sent
only after Stripe's 2xx (or its duplicate answer), and so a pass cut short, a second worker or a lost
answer only ever leads to a repeat that Stripe refuses as a duplicate. The lock just keeps two workers
from doing the same work twice.

The move is `billing_sync.ledger`, the sends `sender` (paced by `pacing.StripePacer`), and the counts and
the admin view that a pass leaves behind `state`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from sqlalchemy import Row, bindparam, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from billing_sync.ledger import RELEASE_LOCK, RENEW_LOCK, MoveResult, move_closed_buckets
from billing_sync.metrics import SyncMetrics
from billing_sync.pacing import StripePacer
from billing_sync.queries import IN_CHUNK, among, due_page, planned_per_run
from billing_sync.reconcile import WindowCheck
from billing_sync.sender import (
    DryRunSender,
    MeterEvent,
    MeterEventSender,
    Outcome,
    SendResult,
    build_sender,
    classify,
)
from billing_sync.settings import StripeSettings
from billing_sync.staged import REFUND_NOT_NETTED
from billing_sync.state import LAST_RUN_KEY, ledger_counts, requeue_with_customer
from metering.clock import Clock, system_clock, utc
from metering.errors import REDIS_ERRORS
from metering.meters import Meter
from metering.models import LedgerEntry, Tenant
from metering.tasks import cancel_and_wait

log = logging.getLogger("cosmos_gateway.billing_sync")

LEADER_KEY = "gw:sync:leader"
MAX_EVENT_AGE = 35 * 86_400  # Stripe refuses meter events older than 35 days
CONFIRM_AFTER = 23 * 3600  # first sent longer ago: Stripe may have forgotten the identifier (24 h window)
# Pending rows per page (`queries.due_page`, read along an index). A page's sends run `concurrency` at a time,
# and its outcomes are one transaction.
ROWS_PER_QUERY = 5000
Due = Row[Any]  # a row of queries.DUE_COLUMNS


@dataclass(frozen=True, slots=True)
class PassResult:
    moved: int = 0  # buckets moved from Redis into the ledger
    sent: int = 0  # rows Stripe answered 2xx
    duplicates: int = 0  # rows Stripe already held (duplicate answer, or its event summary): marked sent
    retried: int = 0  # transient failures, back off
    parked: int = 0  # newly parked
    requeued: int = 0  # parked "no_customer" rows made pending again
    pending: int = 0  # pending rows after the pass (previewed ones included: they are not sent)
    leader: bool = True  # False: another worker held the lock, nothing was done
    held: int = 0  # closed buckets left in Redis: another mover held them
    store_error: str | None = None  # Redis could not be read: closed buckets may be left there
    dry_run: bool = False
    previewed: int = 0  # dry run: pending rows shown as what would be sent (all of them, not only this pass's)

    @property
    def complete(self) -> bool:
        """Every closed bucket is sent or parked, or in a dry run shown: what `sync --once` exits 0 on.

        A dry run can do no more than show a bucket; failing every dry-run pass would only teach
        operators to ignore the exit status.
        """
        waiting = self.pending - self.previewed if self.dry_run else self.pending
        return self.leader and self.store_error is None and self.held == 0 and waiting == 0


class SyncWorker:
    """Moves closed buckets into the ledger and sends what is due to Stripe, a pass at a time."""

    def __init__(
        self,
        *,
        redis: Redis | RedisCluster,
        sessions: async_sessionmaker[AsyncSession],
        meters: Mapping[str, Meter],
        settings: StripeSettings,
        bucket_seconds: int,
        grace_seconds: int,
        sender: MeterEventSender,
        clock: Clock = system_clock,
        backoff_base: float = 1.0,
        backoff_max: float = 300.0,
        leader_lock: bool = True,
        lock_ttl: float = 10.0,
        jitter: Callable[[], float] = random.random,
        metrics: SyncMetrics | None = None,
    ) -> None:
        self._redis = redis
        self._sessions = sessions
        self._meters = dict(meters)
        self._settings = settings
        self._bucket_seconds = bucket_seconds
        self._grace_seconds = grace_seconds
        self.sender = sender
        self._clock = clock
        self._backoff_base = backoff_base
        self._backoff_max = backoff_max
        self._leader_lock = leader_lock
        self._lock_ttl_ms = int(lock_ttl * 1000)
        self._jitter = jitter
        self._pacer = StripePacer(settings.max_events_per_second)
        self._metrics = metrics or SyncMetrics(self._meters)
        self._dry_run = isinstance(sender, DryRunSender)
        client = getattr(sender, "client", None)
        self._window_check = WindowCheck(client, sessions, bucket_seconds) if client is not None else None

    # -- one pass ------------------------------------------------------------------------------------

    async def run_once(self) -> PassResult:
        token = await self._acquire_lock() if self._leader_lock else None
        if token is False:
            counts = await ledger_counts(self._sessions)
            return PassResult(leader=False, pending=counts.pending, dry_run=self._dry_run, previewed=counts.previewed)
        renew = asyncio.create_task(self._renew_lock(token)) if isinstance(token, str) else None
        try:
            return await self._pass()
        finally:
            await cancel_and_wait([renew])
            if isinstance(token, str):
                await self._release_lock(token)

    async def _pass(self) -> PassResult:
        now = self._clock()
        moves, store_error = MoveResult(), None
        try:
            moves = await move_closed_buckets(
                self._redis, self._sessions, self._meters, now=now,
                bucket_seconds=self._bucket_seconds, grace_seconds=self._grace_seconds)
        except REDIS_ERRORS as exc:  # the ledger can still be sent, but the pass is not complete
            log.warning("billing sync: cannot read buckets from Redis: %r", exc)
            self._metrics.failed("store")
            store_error = f"redis: {exc!r}"
        if moves.held:
            log.info("billing sync: %d closed buckets held by another mover; left for a later pass", moves.held)
        requeued = await requeue_with_customer(self._sessions)
        tally = _Tally()
        await self._send_due(now, tally)

        counts = await ledger_counts(self._sessions)
        end = self._clock()
        lag = max(0.0, end - counts.oldest.timestamp()) if counts.oldest is not None else 0.0
        self._metrics.state(pending=counts.pending, parked=counts.parked, lag_seconds=lag)
        if tally.retried == 0 and store_error is None:
            self._metrics.success(end)
        with contextlib.suppress(*REDIS_ERRORS):
            await self._redis.set(LAST_RUN_KEY, repr(end))
        return PassResult(moves.moved, tally.sent, tally.duplicates, tally.retried, tally.parked, requeued,
                          counts.pending, held=moves.held, store_error=store_error, dry_run=self._dry_run,
                          previewed=counts.previewed)

    async def _send_due(self, now: float, tally: _Tally) -> None:
        """Every pending row due at `now`, oldest first, each looked at once (keyset pages)."""
        due_at = utc(now)
        after: tuple[datetime, str, str] | None = None
        while True:
            # A dry run shows each row once; it stays pending for the live mode to send.
            query = due_page(due_at, after=after, previewed=not self._dry_run, size=ROWS_PER_QUERY)
            async with self._sessions() as session:
                await planned_per_run(session)
                rows = list((await session.execute(query)).all())
            if not rows:
                return
            after = (rows[-1].bucket_start, rows[-1].tenant_id, rows[-1].meter)
            # Looked up page by page, not kept for the pass: memory stays flat however many tenants.
            customers = await self._load_customers({row.tenant_id for row in rows})

            ready: list[tuple[Due, MeterEvent]] = []
            local: list[tuple[Due, SendResult]] = []
            for row in rows:
                meter = self._meters.get(row.meter)
                customer = customers.get(row.tenant_id)
                start = int(row.bucket_start.timestamp())
                if meter is None or meter.stripe_event is None:
                    local.append((row, SendResult(Outcome.PARK, "unknown_meter", "meter not billed in the config")))
                elif not customer:
                    local.append((row, SendResult(Outcome.PARK, "no_customer", "tenant has no Stripe customer")))
                elif start < now - MAX_EVENT_AGE:
                    local.append((row, SendResult(Outcome.PARK, "too_old", "older than Stripe accepts (35 days)")))
                elif row.value < 0:  # a refund the period could not net, requeued by hand: Stripe takes none
                    local.append((row, SendResult(Outcome.PARK, REFUND_NOT_NETTED, "negative usage is not sent")))
                else:
                    ready.append((row, MeterEvent(row.identifier, meter.stripe_event, customer, row.value, start)))
            if local:
                await self._record(local, {}, tally)
            ready = await self._confirm_beyond_window(ready, now, tally)
            if not self._dry_run:
                await self._mark_attempted([row for row, _ in ready], now)

            outcomes = await self._send(ready)
            # One transaction for the page's outcomes, not one per event: with SQLite each commit is an
            # fsync, which would cap the pass far below what Stripe accepts. A crash before this commit
            # only means those rows are sent again, and Stripe answers "duplicate" for them.
            if outcomes:
                await self._record(outcomes, {row.identifier: event.customer for row, event in ready}, tally)

    async def _mark_attempted(self, rows: Sequence[Due], now: float) -> None:
        """Stamp the first send of each row before it leaves: a crash right after the send still leaves the
        time from which Stripe's 24 h identifier window runs out."""
        first = [row.identifier for row in rows if row.first_attempt_at is None]
        if not first:
            return
        at = utc(now)
        async with self._sessions() as session, session.begin():
            dialect = await planned_per_run(session)
            for i in range(0, len(first), IN_CHUNK):
                await session.execute(update(LedgerEntry).where(
                    among(LedgerEntry.identifier, first[i : i + IN_CHUNK], dialect),
                    LedgerEntry.first_attempt_at.is_(None)).values(first_attempt_at=at))

    async def _confirm_beyond_window(self, ready: list[tuple[Due, MeterEvent]], now: float,
                                     tally: _Tally) -> list[tuple[Due, MeterEvent]]:
        """Rows first sent more than 23 h ago may be held by Stripe with an identifier it no longer remembers:
        ask its event summaries before sending them again (PRODUCT.md §8).

        Gauges are sent again unasked: their meter keeps the last value, so a repeat changes nothing.
        """
        check = self._window_check
        if check is None:
            return ready
        to_send, decided = [], []
        for row, event in ready:
            first = row.first_attempt_at
            if row.kind != "counter" or first is None or first.timestamp() > now - CONFIRM_AFTER:
                to_send.append((row, event))
                continue
            try:
                extra = await check.unaccounted(row, event.event_name, event.customer)
            except Exception as exc:
                decided.append((row, classify(exc)))
                continue
            if extra is None or extra == 0:
                to_send.append((row, event))
            elif extra == row.value:
                decided.append((row, SendResult(Outcome.DUPLICATE, None, "Stripe's event summary holds it")))
            else:
                decided.append((row, SendResult(Outcome.PARK, "summary_mismatch",
                                                f"Stripe holds {extra} in the bucket's window beyond the sent rows, "
                                                f"the bucket is {row.value}: check before requeueing")))
        if decided:
            await self._record(decided, {row.identifier: event.customer for row, event in ready}, tally)
        return to_send

    async def _send(self, ready: list[tuple[Due, MeterEvent]]) -> list[tuple[Due, SendResult]]:
        """Send a page in requests of up to `sender.max_batch` events, `concurrency` requests at a time, paced;
        the outcomes in the page's order."""
        size = max(1, self.sender.max_batch)
        groups = [ready[i : i + size] for i in range(0, len(ready), size)]
        results: list[list[SendResult]] = [[] for _ in groups]
        pending = iter(range(len(groups)))

        async def sender() -> None:  # one of `concurrency`, each taking the next request (a task each: no more)
            for i in pending:
                await self._pacer.acquire(len(groups[i]))
                results[i] = await self.sender.send([event for _, event in groups[i]])

        async with asyncio.TaskGroup() as senders:
            for _ in range(min(self._settings.concurrency, len(groups))):
                senders.create_task(sender())
        return [(row, result) for group, sent in zip(groups, results, strict=True)
                for (row, _), result in zip(group, sent, strict=True)]

    async def _record(self, outcomes: Sequence[tuple[Due, SendResult]], customers: Mapping[str, str],
                      tally: _Tally) -> None:
        """Write the outcomes in one transaction; a row another worker already sent is left alone.

        Outcomes of a kind share one UPDATE run for all their rows (executemany), not a statement each.
        """
        at = self._clock()
        at_dt = utc(at)
        previewed: list[dict[str, Any]] = []
        delivered: list[dict[str, Any]] = []
        retried: list[dict[str, Any]] = []
        parked: list[dict[str, Any]] = []
        for row, result in outcomes:
            if result.delivered and self._dry_run:  # shown, not sent: the live mode sends it
                previewed.append({"b_id": row.identifier, "b_customer": customers.get(row.identifier)})
            elif result.delivered:
                note = (f"duplicate: {result.detail or 'Stripe already held it'}"
                        if result.outcome is Outcome.DUPLICATE else None)
                delivered.append({"b_id": row.identifier, "b_customer": customers.get(row.identifier),
                                  "b_error": note})
            elif result.outcome is Outcome.RETRY:
                cap = min(self._backoff_max, self._backoff_base * 2 ** min(row.attempts, 32))
                retried.append({"b_id": row.identifier, "b_error": f"{result.reason}: {(result.detail or '')[:500]}",
                                "b_retry_at": utc(at + self._jitter() * cap)})
            else:
                parked.append({"b_id": row.identifier, "b_error": f"{result.reason}: {(result.detail or '')[:500]}"})
        async with self._sessions() as session, session.begin():
            for statement, params in (
                (_PREVIEW.values(previewed_at=at_dt), previewed),
                (_DELIVER.values(sent_at=at_dt), delivered),
                (_RETRY, retried),
                (_PARK, parked),
            ):
                if params:
                    await session.execute(statement, params)
        for row, result in outcomes:
            if result.delivered and self._dry_run:
                tally.previewed += 1
            elif result.delivered:
                self._metrics.sent(row.meter)
                if result.outcome is Outcome.DUPLICATE:
                    tally.duplicates += 1
                else:
                    tally.sent += 1
            else:
                self._metrics.failed(result.reason)
                if result.outcome is Outcome.RETRY:
                    tally.retried += 1
                    log.info("billing sync: %s will be retried: %s", row.identifier, result.detail)
                else:
                    tally.parked += 1
                    log.warning("billing sync: %s parked (%s): %s", row.identifier, result.reason, result.detail)

    async def _load_customers(self, tenants: set[str]) -> dict[str, str | None]:
        """The Stripe customer of each tenant of a page (None: it has none)."""
        found: dict[str, str | None] = {}
        wanted = list(tenants)
        async with self._sessions() as session:
            dialect = await planned_per_run(session)
            for i in range(0, len(wanted), IN_CHUNK):
                found.update((await session.execute(select(Tenant.id, Tenant.stripe_customer_id).where(
                    among(Tenant.id, wanted[i : i + IN_CHUNK], dialect)))).tuples().all())
        return {tenant: found.get(tenant) or None for tenant in tenants}

    # -- the leader lock -----------------------------------------------------------------------------

    async def _acquire_lock(self) -> str | bool | None:
        """The token when held, False when another worker holds it, None when Redis cannot say."""
        token = secrets.token_hex(16)
        try:
            got = await self._redis.set(LEADER_KEY, token, nx=True, px=self._lock_ttl_ms)
        except REDIS_ERRORS as exc:
            log.warning("billing sync: leader lock unavailable, running without it: %r", exc)
            return None
        return token if got else False

    async def _renew_lock(self, token: str) -> None:
        while True:
            await asyncio.sleep(self._lock_ttl_ms / 3000)
            try:
                if not await self._redis.eval(RENEW_LOCK, 1, LEADER_KEY, token, self._lock_ttl_ms):
                    log.warning("billing sync: leader lock lost during a pass")
                    return
            except REDIS_ERRORS as exc:
                log.warning("billing sync: cannot renew the leader lock: %r", exc)

    async def _release_lock(self, token: str) -> None:
        with contextlib.suppress(*REDIS_ERRORS):
            await self._redis.eval(RELEASE_LOCK, 1, LEADER_KEY, token)

    # -- the loop ------------------------------------------------------------------------------------

    async def run_forever(self, stop: asyncio.Event, interval: float = 5.0) -> None:
        """A pass every `interval` seconds until `stop` is set; a failed pass is logged and retried."""
        while not stop.is_set():
            try:
                await self.run_once()
            except Exception:
                log.exception("billing sync pass failed")
                self._metrics.failed("store")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)

    async def aclose(self) -> None:
        await self.sender.aclose()


# The outcome updates, each run for many rows at once (executemany), so on the table, not the ORM entity
# (whose list-of-parameters form is a bulk update by primary key). A row is matched by its identifier.
_LEDGER = LedgerEntry.__table__
_BY_IDENTIFIER = _LEDGER.c.identifier == bindparam("b_id")
_PREVIEW = update(_LEDGER).where(_BY_IDENTIFIER, _LEDGER.c.state == "pending").values(
    stripe_customer_id=bindparam("b_customer"))
_DELIVER = update(_LEDGER).where(_BY_IDENTIFIER, _LEDGER.c.state != "sent").values(
    state="sent", attempts=_LEDGER.c.attempts + 1, last_error=bindparam("b_error"), next_attempt_at=None,
    stripe_customer_id=bindparam("b_customer"))
_RETRY = update(_LEDGER).where(_BY_IDENTIFIER, _LEDGER.c.state == "pending").values(
    attempts=_LEDGER.c.attempts + 1, last_error=bindparam("b_error"), next_attempt_at=bindparam("b_retry_at"))
_PARK = update(_LEDGER).where(_BY_IDENTIFIER, _LEDGER.c.state == "pending").values(
    state="parked", attempts=_LEDGER.c.attempts + 1, last_error=bindparam("b_error"))


@dataclass(slots=True)
class _Tally:
    sent: int = 0
    duplicates: int = 0
    retried: int = 0
    parked: int = 0
    previewed: int = 0


def build_worker(*, redis: Redis | RedisCluster, sessions: async_sessionmaker[AsyncSession],
                 meters: Iterable[Meter], stripe: StripeSettings, bucket_seconds: int, grace_seconds: int,
                 clock: Clock = system_clock) -> SyncWorker:
    """A worker as the configuration asks (dry run, v1 or v2 stream); `await worker.aclose()` when done."""
    return SyncWorker(
        redis=redis, sessions=sessions, meters={m.name: m for m in meters}, settings=stripe,
        bucket_seconds=bucket_seconds, grace_seconds=grace_seconds, sender=build_sender(stripe, clock=clock),
        clock=clock)
