"""The limiter's pure compile step: a tenant's plan and a route turned into one `Compiled` check.

Everything here is computed from values: the plan, the tenant's record, the meters a request counts,
the guards it runs into, the period and the time. No store, no clock, no I/O (the store's `prepare`
is passed in), so it is tested without Redis (tests/quota/test_compile.py). `quota.limiter` caches what
`compile_check` returns per tenant and route and adds the per-request values (`ratelimit_values`).

The RateLimit / RateLimit-Policy texts (draft-ietf-httpapi-ratelimit-headers) are built here, once per
compiled check; where else a response's headers are touched: the map in gateway/proxy/headers.py. They
advertise the enforced limits only: a shadow limit (`enforce: shadow`) never refuses, so a client has
nothing to pace itself by.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from metering.meters import Meter
from metering.periods import bucket_start
from metering.store import Check, CounterRule, Decision, GuardRule, RateRule, RecordKey
from quota.plans import Guard, Plan, Quota, Rate, effective
from quota.tenants import TenantRecord

BUCKET_TTL = 7 * 86_400  # billing buckets outlive any sync outage worth surviving
_COMPILED_ENTRY_OVERHEAD = 2048  # the Compiled, its Check, rules and tuples beyond the strings counted


@dataclass(frozen=True, slots=True)
class Compiled:
    """What admit() derives from the tenant, plan, route, period and bucket (everything but the time);
    an `Admission` refers to it, so the tenant is `check.tenant` and the route's label `route`.

    It holds for the tenant's requests to one route while the tenant's record stays the same object
    (the directory replaces a record when it changes) and the time stays within [since, until): one
    period, one billing bucket, and for a tenant past due, its grace.
    """

    plan: str
    record: TenantRecord | None
    since: float
    until: float
    cacheable: bool  # False for a tenant with overrides (they may expire any time)
    period_start: int
    period_end: int
    bucket: int
    counted: tuple[Meter, ...]
    quotas: Mapping[str, Quota]
    rate: Rate | None
    check: Check  # its `now` is the first request's; kept for the fail-open spool, which ignores it
    prepared: Any | None  # the store's prepared form (UsageStore.prepare); None: nothing to check or count
    policy: tuple[str, str] | None  # the RateLimit-Policy header
    route: str  # the meter_route label
    limited: tuple[tuple[str, int], ...]  # (meter, limit) of the counted meters with a limit
    ratelimit: str  # the RateLimit header with %d in place of each remaining and reset
    head_lines: str  # both headers as head lines, with %d in place of each remaining and reset
    alerts: Mapping[str, tuple[float, float]]  # meter -> (usage from which alerts care, limit)
    where: RecordKey  # where a response's counts go while the bucket is writable
    writable_until: float  # then the sync worker may close the bucket (`Limiter._writable_bucket`)


def compile_check(tenant: str, plan: Plan, record: TenantRecord | None, counted: tuple[Meter, ...],
                  hits: frozenset[Guard], now: float, period: tuple[int, int], *, bucket_seconds: int,
                  grace_seconds: int, past_due_grace_seconds: float, alert_from: float | None,
                  prepare: Callable[[Check], Any]) -> Compiled:
    """Everything of a request but its time, for a tenant already resolved (`Limiter.resolve`).

    `period` is the tenant's [start, end) as epoch seconds; `alert_from` the lowest alert threshold,
    None when nothing observes usage; `prepare` the store's (`UsageStore.prepare`).
    """
    period_start, period_end = period
    bucket = bucket_start(now, bucket_seconds)
    overrides = record.overrides if record is not None else ()
    quotas: Mapping[str, Quota]
    if overrides:
        rate, quotas, _, shadow_rate = effective(plan, overrides, datetime.fromtimestamp(now, UTC))
    else:
        rate, quotas, shadow_rate = plan.rate, plan.quotas, plan.shadow_rate
    counters = tuple(_counter_rule(m, quotas.get(m.name)) for m in counted)
    guards = _guard_rules(quotas, hits)
    check = Check(
        tenant=tenant, now=now, period_start=period_start, period_end=period_end, bucket_start=bucket,
        bucket_ttl=BUCKET_TTL, rate=RateRule(rate.per_second, rate.burst) if rate else None,
        counters=counters, guards=guards, billable=tuple((m.name, 1) for m in counted),
        shadow_rate=RateRule(shadow_rate.per_second, shadow_rate.burst) if shadow_rate else None,
    )
    nothing = rate is None and shadow_rate is None and not counters and not guards
    prepared = None if nothing else prepare(check)
    policy, limited, ratelimit = _ratelimit_policy(rate, counted, quotas, period_end - period_start)
    # Meter names are [a-z0-9_]: nothing in the policy needs escaping for %.
    head_lines = "" if policy is None else f"{policy[0]}: {policy[1]}\r\nRateLimit: {ratelimit}\r\n"
    route = "+".join(m.name for m in counted) or "unmetered"
    # Alerts only care from the lowest threshold on; below it, the callback is not even called.
    alerts = {} if alert_from is None else {
        name: (quota.limit * alert_from, quota.limit)
        for name, quota in quotas.items() if quota.limit is not None}
    until = float(min(period_end, bucket + bucket_seconds))  # a float: mypyc keeps int and float apart
    past_due_since = None if record is None else record.past_due_since or record.subscription_changed_at
    if record is not None and record.subscription_status == "past_due" and past_due_since is not None:
        # Refused once its grace has run out (`Limiter.resolve`): the next request must look again.
        until = min(until, past_due_since.timestamp() + past_due_grace_seconds)
    where = (tenant, period_start, period_end, bucket, BUCKET_TTL)
    writable_until = bucket + bucket_seconds + grace_seconds - 1
    return Compiled(plan.name, record, max(period_start, bucket), until, not overrides, period_start, period_end,
                    bucket, counted, quotas, rate, check, prepared, policy, route, limited, ratelimit, head_lines,
                    alerts, where, writable_until)


def compiled_size(key: tuple[object, ...], compiled: Compiled) -> int:
    """Estimated bytes of a cache entry: its key's strings, the prepared command, the header lines."""
    prepared = compiled.prepared
    strings = sum(len(part) for part in key if isinstance(part, str)) + len(compiled.head_lines) + len(
        compiled.ratelimit)
    if prepared is not None:
        strings += 2 * (len(prepared.head) + len(prepared.tail)) + sum(len(k) for k in prepared.keys)
    return strings + _COMPILED_ENTRY_OVERHEAD


def _counter_rule(meter: Meter, quota: Quota | None) -> CounterRule:
    limit = None if quota is None or quota.limit is None else int(quota.limit)
    enforce = quota is not None and limit is not None and quota.on_exceed == "reject"
    # A shadow limit reports what an enforced one would refuse: nothing, under on_exceed: overage.
    shadow = None if quota is None or quota.shadow_limit is None or quota.on_exceed != "reject" else int(
        quota.shadow_limit)
    return CounterRule(meter=meter.name, units=1, limit=limit, enforce=enforce, shadow_limit=shadow)


def _guard_rules(quotas: Mapping[str, Quota], hits: frozenset[Guard]) -> tuple[GuardRule, ...]:
    """The gauge guards of `quotas` that apply to a request matching the guards `hits`: the enforced ones,
    then the shadow ones (which only report)."""
    if not hits:
        return ()
    applying = [quota for quota in quotas.values()
                if quota.on_exceed == "reject" and not hits.isdisjoint(quota.guards)]
    return (*(GuardRule(meter=q.meter, limit=float(q.limit)) for q in applying if q.limit is not None),
            *(GuardRule(meter=q.meter, limit=float(q.shadow_limit), shadow=True)
              for q in applying if q.shadow_limit is not None))


def _ratelimit_policy(rate: Rate | None, counted: Sequence[Meter], quotas: Mapping[str, Quota],
                      window: int) -> tuple[tuple[str, str] | None, tuple[tuple[str, int], ...], str]:
    """RateLimit-Policy (draft-ietf-httpapi-ratelimit-headers) as a header, the limited meters, and the
    RateLimit template.

    All three are the same for every request of a compiled check, so they are built once.
    """
    policies = [f'"burst";q={rate.burst};w=1'] if rate is not None else []
    template = ['"burst";r=%d;t=1'] if rate is not None else []
    limited = []
    for meter in counted:
        quota = quotas.get(meter.name)
        if quota is not None and quota.limit is not None:
            policies.append(f'"{meter.name}";q={int(quota.limit)};w={window}')
            template.append(f'"{meter.name}";r=%d;t=%d')
            limited.append((meter.name, int(quota.limit)))
    policy = ("RateLimit-Policy", ", ".join(policies)) if policies else None
    return policy, tuple(limited), ", ".join(template)


def ratelimit_values(compiled: Compiled, decision: Decision, now: float,
                     violated: str | None = None) -> tuple[int | float, ...]:
    """What is left of each policy, and when it is whole again: the values of the RateLimit template.
    The `violated` policy of a refusal ("burst" or a meter) shows 0 left."""
    reset = compiled.period_end - int(now)  # = ceil(period_end - now): the period ends on a whole second after now
    used = decision.used
    # The script keeps the rate's remaining within [0, burst]; %d truncates what is left of a quota.
    values: list[int | float] = (
        [0 if violated == "burst" else decision.rate_remaining or 0] if compiled.rate is not None else [])
    for name, limit in compiled.limited:
        left = 0 if name == violated else limit - used.get(name, 0)
        values.append(left if left > 0 else 0)
        values.append(reset)
    return tuple(values)


def refusal_headers(compiled: Compiled, decision: Decision, now: float,
                    violated: str) -> tuple[tuple[str, str], ...]:
    """RateLimit-Policy and RateLimit of a 429 (PRODUCT.md §4), `r=0` for the violated policy."""
    if compiled.policy is None:
        return ()
    values = ratelimit_values(compiled, decision, now, violated)
    return compiled.policy, ("RateLimit", compiled.ratelimit % values)
