"""The limiter: turns a tenant's plan into one atomic check-and-count, and a response into its record.

`admit()` runs before the upstream is called: it resolves the tenant (in-process directory, never
SQL), builds one `Check` of every rule the request touches (rate, period quotas, gauge guards, billing
bucket) and sends it to the store, where a single script decides all of them at once. `complete()`
runs after the response: it gives units back for a server error, adds the byte meters and the
reported gauges, in one batched call that the request does not wait for.

When the store is down, `fail_open` admits and spools what would have been counted (replayed later,
once); `fail_closed` refuses with 503.

What a check holds is built by the pure compile step, `quota.compile`; this module owns the store calls
and the bounded cache of compiled checks. The limiter knows the store only as `metering.store.UsageStore`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from metering.meters import Meter, MeterMatcher, parse_usage_report
from metering.periods import bucket_start, period_bounds
from metering.spool import Spool
from metering.store import Check, Decision, Record, RecordKey, StoreUnavailable, UsageStore
from quota.compile import Compiled, compile_check, compiled_size, ratelimit_values, refusal_headers
from quota.guards import GuardMatcher
from quota.metrics import QuotaMetrics
from quota.plans import Guard, Plan
from quota.shadow import ShadowReports
from quota.tenants import TenantDirectory, TenantRecord

log = logging.getLogger("cosmos_gateway.limiter")

# The compiled-check cache, keyed by (tenant, claimed plan, meters counted, guards run into): one entry
# per tenant and route, whatever the paths. Bounded in entries and in estimated bytes, oldest entries
# dropped first; an entry is kept only once the store admitted a request with it (a refused or
# rate-limited client cannot fill it).
COMPILED_CACHE_SIZE = 20_000
COMPILED_CACHE_BYTES = 32 << 20
# An admission under fail_open waits this long at most for its spooled counts to reach the disk.
SPOOL_SYNC_SECONDS = 1.0
# A shutdown waits this long at most for the store: a late reply is awaited LATE_REPLY_SECONDS (5 s).
DRAIN_SECONDS = 8.0
# Stripe subscription statuses that get 402 (PRODUCT.md §8); past_due is refused only after its grace.
INACTIVE_SUBSCRIPTIONS = frozenset({"canceled", "unpaid", "incomplete", "incomplete_expired", "paused"})


class Refusal(Exception):
    """The request may not pass; `kind` says why, the fields feed the problem+json answer."""

    def __init__(self, kind: str, detail: str, *, tenant: str, plan: str | None = None, meter: str | None = None,
                 limit: float | None = None, used: float | None = None, retry_after: int | None = None,
                 resets_at: datetime | None = None, subscription_status: str | None = None,
                 headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(detail)
        self.kind = kind  # forbidden | subscription_inactive | rate | quota | unavailable
        self.detail = detail
        self.tenant = tenant
        self.plan = plan
        self.meter = meter
        self.limit = limit
        self.used = used
        self.retry_after = retry_after
        self.resets_at = resets_at
        self.subscription_status = subscription_status
        self.headers = headers  # RateLimit-Policy and RateLimit (r=0 for the violated policy) of a 429


@dataclass(slots=True)
class Admission:
    """What was decided for one admitted request; `complete()` finishes it."""

    compiled: Compiled
    # The RateLimit values of this response: the rate's remaining, then each limited meter's remaining
    # and seconds to the period's end; empty when no RateLimit headers go out (nothing was checked).
    ratelimit: tuple[int | float, ...] = ()
    spooled: bool = False

    @property
    def headers(self) -> tuple[tuple[str, str], ...]:
        """RateLimit-Policy and RateLimit (draft-ietf-httpapi-ratelimit-headers) for the response."""
        policy = self.compiled.policy
        if policy is None or not self.ratelimit:
            return ()
        return policy, ("RateLimit", self.compiled.ratelimit % self.ratelimit)

    @property
    def head_lines(self) -> str:
        """The same headers as lines of a response head, formatted in one step (the small-response path)."""
        return self.compiled.head_lines % self.ratelimit if self.ratelimit else ""



@dataclass(frozen=True, slots=True)
class LimiterSettings:
    default_plan: str | None
    bucket_seconds: int
    fail_open: bool
    grace_seconds: int = 10
    past_due_grace_seconds: float = 7 * 86_400
    alert_from: float = 0.0  # the lowest alert threshold (a fraction of the limit)


class Limiter:
    def __init__(self, store: UsageStore, matcher: MeterMatcher, plans: Mapping[str, Plan],
                 directory: TenantDirectory, spool: Spool, metrics: QuotaMetrics, settings: LimiterSettings,
                 *, clock: Callable[[], float] = time.time, on_counted: Callable[..., None] | None = None) -> None:
        self._store = store
        self._matcher = matcher
        self._plans = plans
        self._directory = directory
        self._spool = spool
        self._metrics = metrics
        self._settings = settings
        self._clock = clock
        self._on_counted = on_counted  # alerts: (tenant, meter, period_start, used, limit)
        self._shadow = ShadowReports(metrics, clock)  # served, but a shadow limit would have refused
        self._periods: dict[int | None, tuple[int, int]] = {}
        self._compiled: dict[tuple[object, ...], tuple[Compiled, int]] = {}  # insertion order: oldest first
        self._compiled_bytes = 0
        self._guards = GuardMatcher(g for plan in plans.values() for q in plan.quotas.values() for g in q.guards)
        self._on_record_failure = self._spool_failed  # one bound method, so the store can tell it is the same
        # The byte meters as (name, counts the request's bytes (not the response's), bills server errors).
        self._byte_sources = tuple((m.name, m.source == "request_bytes", m.bill_server_errors)
                                   for m in matcher.byte_meters)

    # ------------------------------------------------------------------ before the upstream

    def resolve(self, tenant: str, claimed_plan: str | None) -> tuple[TenantRecord | None, Plan]:
        """The tenant's record and plan, or a Refusal (suspended, inactive, unknown)."""
        record = self._directory.get(tenant)
        if record is not None:
            if record.status == "suspended":
                raise Refusal("forbidden", "the tenant is suspended", tenant=tenant, plan=record.plan)
            if record.subscription_status in INACTIVE_SUBSCRIPTIONS or self._past_due_too_long(record):
                raise Refusal("subscription_inactive", "the tenant's subscription is not active",
                              tenant=tenant, plan=record.plan, subscription_status=record.subscription_status)
        name = record.plan if record is not None else claimed_plan or self._settings.default_plan
        plan = self._plans.get(name) if name is not None else None
        if plan is None and record is not None and self._settings.default_plan is not None:
            log.warning("tenant %s has unknown plan %r; applying the default plan", tenant, name)
            plan = self._plans.get(self._settings.default_plan)
        if plan is None:
            raise Refusal("forbidden", "the tenant is unknown and there is no default plan", tenant=tenant)
        return record, plan

    def _past_due_too_long(self, record: TenantRecord) -> bool:
        """Past due is served for a grace (Stripe retries the payment meanwhile), then refused.

        The grace counts from when the subscription became past due, not from its latest event: Stripe
        sends more events during a past-due spell (a failed retry, an invoice), and none may extend it.
        A record from before `past_due_since` existed falls back to its latest event."""
        since = record.past_due_since or record.subscription_changed_at
        return (record.subscription_status == "past_due" and since is not None
                and self._clock() - since.timestamp() > self._settings.past_due_grace_seconds)

    def period(self, anchor_day: int | None, now: float) -> tuple[int, int]:
        """[start, end) of the tenant's current period as epoch seconds, cached until it ends."""
        cached = self._periods.get(anchor_day)
        if cached is not None and cached[0] <= now < cached[1]:
            return cached
        start, end = period_bounds(datetime.fromtimestamp(now, UTC), anchor_day)
        bounds = self._periods[anchor_day] = (int(start.timestamp()), int(end.timestamp()))
        return bounds

    async def admit(self, tenant: str, claimed_plan: str | None, method: str, path: str) -> Admission:
        now = self._clock()
        record = self._directory.get(tenant)
        # What the method and path decide (the meters counted, the guards run into) comes from caches of
        # its own; the compiled check is shared by every path of the same route.
        counted = self._matcher.request_meters(method, path)
        hits = self._guards.hits(method, path)
        key = (tenant, claimed_plan, counted, hits)
        cached = self._compiled.get(key)
        compiled = cached[0] if cached is not None else None
        fresh = compiled is None or compiled.record is not record or not compiled.since <= now < compiled.until
        if fresh:
            compiled = self._compile(tenant, claimed_plan, counted, hits, now)
        assert compiled is not None
        admission = Admission(compiled)
        if compiled.prepared is None:
            if fresh:
                self._keep_compiled(key, compiled)
            return admission  # nothing to check or count: no Redis round trip
        # If the client goes away meanwhile, a check already sent still completes, and what it counted
        # for a request that will never be forwarded is given back (the store calls _give_back).
        decided = self._store.submit_check(compiled.prepared, now, lambda outcome: self._give_back(admission, outcome))
        try:
            decision = await decided
        except asyncio.CancelledError:
            if decided.done() and not decided.cancelled():
                # Cancelled after the store had answered but before this task ran again: the store saw its
                # answer taken, so the give-back is ours.
                failure = decided.exception()  # the store fails a check with StoreUnavailable only
                self._give_back(admission, decided.result() if failure is None else cast(StoreUnavailable, failure))
            raise
        except StoreUnavailable as error:
            self._metrics.store_error()
            # A full fail-open spool (at its cap, or the disk refusing writes) refuses as fail_closed does.
            if not self._settings.fail_open or self._spool.full:
                self._give_back_unknown(admission, error)  # refused here, but Redis may have counted it
                detail = ("the usage store is unavailable" if not self._settings.fail_open
                          else "the usage store is unavailable and the fail-open spool is full")
                raise Refusal("unavailable", detail, tenant=tenant, plan=compiled.plan, retry_after=1) from None
            self._spool_unless_applied(compiled.check, error)  # replayed into Redis, once, when it is back
            admission.spooled = True
            # Counted at admission means on disk before the request goes on: a SIGKILL loses none of it
            # (PRODUCT.md §5). Concurrent admissions share the write; a disk that does not answer in time
            # does not hold the request (it is served, its count waits in memory, and later admissions are
            # refused while the spool cannot write).
            try:
                async with asyncio.timeout(SPOOL_SYNC_SECONDS):
                    await self._spool.sync()
            except TimeoutError:
                pass
            except asyncio.CancelledError:  # the client went away meanwhile: its request goes no further
                self.abandon(admission)
                raise
            if fresh:
                self._keep_compiled(key, compiled)
            return admission
        if not decision.allowed:
            raise self._refusal(decision, compiled, now)
        if decision.shadow is not None:
            self._shadow.report(tenant, compiled.plan, *decision.shadow)
        if fresh:
            self._keep_compiled(key, compiled)
        if compiled.policy is not None:
            admission.ratelimit = ratelimit_values(compiled, decision, now)
        self._observe(compiled, decision.used)
        return admission

    def _keep_compiled(self, key: tuple[object, ...], compiled: Compiled) -> None:
        """Cache `compiled` for the next requests of its key, dropping the oldest entries to make room."""
        if not compiled.cacheable:
            return
        self._forget_compiled(key)
        size = compiled_size(key, compiled)
        cache = self._compiled
        while cache and (len(cache) >= COMPILED_CACHE_SIZE or self._compiled_bytes + size > COMPILED_CACHE_BYTES):
            self._forget_compiled(next(iter(cache)))
        cache[key] = (compiled, size)
        self._compiled_bytes += size

    def _forget_compiled(self, key: tuple[object, ...]) -> None:
        entry = self._compiled.pop(key, None)
        if entry is not None:
            self._compiled_bytes -= entry[1]

    def compiled_cache(self) -> tuple[int, int]:
        """(entries, estimated bytes) of the compiled-check cache."""
        return len(self._compiled), self._compiled_bytes

    def _compile(self, tenant: str, claimed_plan: str | None, counted: tuple[Meter, ...], hits: frozenset[Guard],
                 now: float) -> Compiled:
        """Everything of a request but its time (`quota.compile`); raises Refusal for a tenant that may not pass."""
        record, plan = self.resolve(tenant, claimed_plan)
        settings = self._settings
        return compile_check(
            tenant, plan, record, counted, hits, now, self.period(record.billing_anchor_day if record else None, now),
            bucket_seconds=settings.bucket_seconds, grace_seconds=settings.grace_seconds,
            past_due_grace_seconds=settings.past_due_grace_seconds,
            alert_from=None if self._on_counted is None else settings.alert_from, prepare=self._store.prepare)

    def _give_back(self, admission: Admission, outcome: Decision | StoreUnavailable) -> None:
        """Undo an admitted check whose request was abandoned before reaching the upstream."""
        if isinstance(outcome, StoreUnavailable):
            self._give_back_unknown(admission, outcome)
            return
        if outcome.allowed:
            self._refund_all(admission)

    def abandon(self, admission: Admission) -> None:
        """The request never reached the upstream whole (client gone, body timeout, upstream unreachable or
        busy): every unit it counted is given back and nothing is billed, whatever the meters bill for
        server errors (PRODUCT.md §5). The rate limit keeps it: it was admitted."""
        self._refund_all(admission)

    def _refund_all(self, admission: Admission) -> None:
        refund = tuple((m.name, 1) for m in admission.compiled.counted)
        if not refund:
            return
        record = self._record(admission.compiled, refund=refund)
        if admission.spooled:  # after the spooled admission, in the same file: replayed in that order
            self._spool.append(record)
            return
        self._store.record_later(record, self._on_record_failure)

    def _refusal(self, decision: Decision, compiled: Compiled, now: float) -> Refusal:
        plan, tenant, rate = compiled.plan, compiled.check.tenant, compiled.rate
        if decision.reason == "rate":
            self._metrics.rejected("rate", plan, "rate")
            return Refusal("rate", "the per-second rate limit is exceeded", tenant=tenant, plan=plan,
                           limit=rate.burst if rate else None, retry_after=max(1, math.ceil(decision.retry_after)),
                           headers=refusal_headers(compiled, decision, now, "burst"))
        meter = decision.meter or ""
        quota = compiled.quotas.get(meter)
        self._metrics.rejected("quota" if decision.reason == "quota" else "guard", plan, meter)
        resets_at = datetime.fromtimestamp(compiled.period_end, UTC)
        return Refusal("quota", f"the {meter} quota of this period is used up", tenant=tenant, plan=plan,
                       meter=meter, limit=quota.limit if quota else None, used=decision.used.get(meter),
                       retry_after=max(1, math.ceil(compiled.period_end - now)), resets_at=resets_at,
                       headers=refusal_headers(compiled, decision, now, meter))

    def _observe(self, compiled: Compiled, used: Mapping[str, float]) -> None:
        usage, alerts, tenant, quotas = self._metrics.usage, compiled.alerts, compiled.check.tenant, compiled.quotas
        for meter, value in used.items():
            quota = quotas.get(meter)
            usage(tenant, meter, value, None if quota is None else quota.limit)
            alert = alerts.get(meter)
            if alert is not None and value >= alert[0]:
                self._on_counted(tenant, meter, compiled.period_start, value, alert[1])  # type: ignore[misc]

    # ------------------------------------------------------------------ after the upstream

    def complete(self, admission: Admission, status: int, request_bytes: int, response_bytes: int,
                 usage_report: str | None) -> None:
        """Record what the response adds or gives back; the request does not wait for it."""
        compiled = admission.compiled
        if status < 500 and usage_report is None and not admission.spooled:
            add = self._byte_counts(request_bytes, response_bytes, failed=False)
            if add:  # the common case: just the byte counts, summed in the store until its next batch
                self._store.add_later(self._where(compiled), add, self._on_record_failure)
            return
        failed = status >= 500
        refund = tuple((m.name, 1) for m in compiled.counted if not m.bill_server_errors) if failed else ()
        add = self._byte_counts(request_bytes, response_bytes, failed=failed)
        gauges: tuple[tuple[str, float], ...] = ()
        if usage_report is not None:
            values, bad = parse_usage_report(usage_report, self._matcher.gauges)
            if bad:
                self._metrics.bad_usage_report(bad)
            gauges = tuple(values.items())
        if not (refund or add or gauges):
            return
        record = self._record(compiled, refund=refund, add=tuple(add), gauges=gauges)
        if admission.spooled:
            self._spool.append(record)
            return
        self._store.record_later(record, self._on_record_failure)

    def _byte_counts(self, request_bytes: int, response_bytes: int, *, failed: bool) -> list[tuple[str, int]]:
        """(meter, units) of the byte meters; a failed response only for meters that bill server errors."""
        add = []
        for name, of_request, bill_server_errors in self._byte_sources:  # a comprehension costs a frame in 3.11
            units = request_bytes if of_request else response_bytes
            if units > 0 and (bill_server_errors or not failed):
                add.append((name, units))
        return add

    def _spool_failed(self, record: Record, error: StoreUnavailable) -> None:
        self._metrics.store_error()
        self._spool_unless_applied(record, error)  # fail-open or not: a counted response is never lost

    def _spool_unless_applied(self, item: Record | Check, error: StoreUnavailable) -> None:
        """Spool what Redis did not count. A call that was sent may still have run (a timeout, a lost
        connection): a check's counts are spooled at once with its call marker, which decides at replay,
        in Redis, whether they still apply; a record waits for its late answer (its own id guards the rest)."""
        if isinstance(item, Check) and error.call is not None:
            self._spool.append(dataclasses.replace(Record.from_admitted(item), check_call=error.call))
            return
        if error.applied is None:
            self._spool.append(item)
            return
        error.applied.add_done_callback(lambda done: None if done.result() else self._spool.append(item))

    def _give_back_unknown(self, admission: Admission, error: StoreUnavailable) -> None:
        """Give back what a check whose outcome is unknown may have counted: decided in Redis by the call's
        marker (only if the call admitted it), or by its late answer."""
        if error.call is not None:
            refund = tuple((m.name, 1) for m in admission.compiled.counted)
            if refund:
                record = dataclasses.replace(self._record(admission.compiled, refund=refund),
                                             check_call=error.call, only_if_admitted=True)
                self._store.record_later(record, self._on_record_failure)
        elif error.applied is not None:
            error.applied.add_done_callback(lambda applied: self._give_back_late(admission, applied))

    def _give_back_late(self, admission: Admission, applied: asyncio.Future[bool]) -> None:
        if applied.result():
            self._refund_all(admission)

    def rebucket(self, record: Record) -> Record:
        """A spooled record whose billing bucket has closed meanwhile, moved into the open bucket."""
        writable = self._writable_bucket(record.bucket_start, record.period_end)
        return record if writable == record.bucket_start else dataclasses.replace(record, bucket_start=writable)

    def _writable_bucket(self, start: int, period_end: int) -> int:
        """`start`, unless the sync worker may have closed that billing bucket by now: then the current one,
        if it lies in the same period.

        A bucket is closed `grace_seconds` after its end and then moved to the ledger; a late write goes to
        the current bucket instead, so nothing lands in a bucket already billed (a refund there is carried
        as a debit, so the tenant's billed total stays right). Never into another period, though: a late
        write of a period that has ended stays in its own bucket, and the sync worker nets it within that
        period or parks it (PRODUCT.md §8: refunds are never carried into another period).
        """
        settings = self._settings
        now = self._clock()
        writable_until = start + settings.bucket_seconds + settings.grace_seconds - 1
        if now < writable_until:
            return start
        current = bucket_start(now, settings.bucket_seconds)
        return current if current < period_end else start

    def _where(self, compiled: Compiled) -> RecordKey:
        """Where what follows an admission is recorded: its own bucket while the sync worker cannot have
        closed it (`compiled.where`, built once), then the current one (`_writable_bucket`)."""
        if self._clock() < compiled.writable_until:
            return compiled.where
        tenant, period_start, period_end, bucket, ttl = compiled.where
        return tenant, period_start, period_end, self._writable_bucket(bucket, period_end), ttl

    def _record(self, compiled: Compiled, **parts: Any) -> Record:
        """A record of what happened after an admission, in the bucket it may still write to."""
        return Record(*self._where(compiled), **parts)

    async def drain(self) -> None:
        """Wait for records in flight and for the late replies of timed-out checks, and for what those
        decide (records, spool entries), so that a shutdown closes the spool after them (shutdown, tests)."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._store.flush(), timeout=DRAIN_SECONDS)

    async def usage(self, tenant: str, record: TenantRecord | None, meters: Sequence[str]) -> dict[str, float]:
        start, _ = self.period(record.billing_anchor_day if record else None, self._clock())
        return await self._store.usage(tenant, start, meters)

