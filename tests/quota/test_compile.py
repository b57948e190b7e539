"""The limiter's pure compile step: rules of a check and the RateLimit texts, without Redis."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from metering.meters import DEFAULT_METERS, MeterMatcher
from metering.store import Check, CounterRule, Decision, GuardRule, RateRule
from quota.compile import BUCKET_TTL, Compiled, compile_check, ratelimit_values, refusal_headers
from quota.limiter import Admission
from quota.plans import Override, Plan, Quota, Rate
from quota.tenants import TenantRecord

NOW = datetime(2026, 3, 10, 12, 0, 10, tzinfo=UTC).timestamp()  # 10 s into a 300 s billing bucket
PERIOD = (int(datetime(2026, 3, 1, tzinfo=UTC).timestamp()), int(datetime(2026, 4, 1, tzinfo=UTC).timestamp()))
WINDOW = PERIOD[1] - PERIOD[0]
RESET = PERIOD[1] - int(NOW)
CREATE_CHAIN = ("POST", "/api/chains")
MATCHER = MeterMatcher(DEFAULT_METERS)
DEPLOY = MATCHER.request_meters("POST", "/api/chains/c1/deployments")  # api_calls, chain_deployments

PRO = Plan("pro", Rate(10, 20), {
    "api_calls": Quota("api_calls", 1000),
    "chain_deployments": Quota("chain_deployments", 100),
    "chains": Quota("chains", 5, guards=(CREATE_CHAIN,)),
})


def compile_for(plan: Plan, counted: tuple[Any, ...] = DEPLOY, *, record: TenantRecord | None = None,
                hits: frozenset[Any] = frozenset(), prepared: list[Check] | None = None,
                alert_from: float | None = None) -> Compiled:
    sent = prepared if prepared is not None else []
    return compile_check("acme", plan, record, counted, hits, NOW, PERIOD, bucket_seconds=300, grace_seconds=10,
                         past_due_grace_seconds=7 * 86_400, alert_from=alert_from,
                         prepare=lambda check: sent.append(check) or ("prepared", check))


def decision(used: dict[str, float], rate_remaining: int | None = 19, *, allowed: bool = True) -> Decision:
    return Decision(allowed, None if allowed else "quota", None, 0.0, used, rate_remaining)


def test_ratelimit_headers_of_a_plan_with_a_rate_and_two_quotas() -> None:
    compiled = compile_for(PRO)
    policy = ("RateLimit-Policy",
              f'"burst";q=20;w=1, "api_calls";q=1000;w={WINDOW}, "chain_deployments";q=100;w={WINDOW}')
    assert compiled.policy == policy
    assert compiled.limited == (("api_calls", 1000), ("chain_deployments", 100))
    values = ratelimit_values(compiled, decision({"api_calls": 10, "chain_deployments": 3}), NOW)
    ratelimit = f'"burst";r=19;t=1, "api_calls";r=990;t={RESET}, "chain_deployments";r=97;t={RESET}'
    admission = Admission(compiled, values)
    assert admission.headers == (policy, ("RateLimit", ratelimit))
    assert admission.head_lines == f"RateLimit-Policy: {policy[1]}\r\nRateLimit: {ratelimit}\r\n"
    # What is left never shows below 0 (an overage quota counts past its limit).
    over = ratelimit_values(compiled, decision({"api_calls": 1500, "chain_deployments": 3}, 0), NOW)
    assert over == (0, 0, RESET, 97, RESET)


def test_a_refusal_shows_r0_for_the_violated_policy_only() -> None:
    compiled = compile_for(PRO)
    refused = decision({"api_calls": 10, "chain_deployments": 100}, allowed=False)
    assert refusal_headers(compiled, refused, NOW, "chain_deployments") == (compiled.policy, (
        "RateLimit", f'"burst";r=19;t=1, "api_calls";r=990;t={RESET}, "chain_deployments";r=0;t={RESET}'))
    assert refusal_headers(compiled, decision({"api_calls": 10, "chain_deployments": 3}, 0), NOW, "burst")[1] == (
        "RateLimit", f'"burst";r=0;t=1, "api_calls";r=990;t={RESET}, "chain_deployments";r=97;t={RESET}')


def test_an_unlimited_quota_is_absent_from_the_policy() -> None:
    plan = Plan("big", Rate(10, 20), {"api_calls": Quota("api_calls", None),
                                      "chain_deployments": Quota("chain_deployments", 100)})
    compiled = compile_for(plan)
    assert compiled.policy == ("RateLimit-Policy", f'"burst";q=20;w=1, "chain_deployments";q=100;w={WINDOW}')
    assert compiled.limited == (("chain_deployments", 100),)
    assert compiled.check.counters == (CounterRule("api_calls", 1, None, False),
                                       CounterRule("chain_deployments", 1, 100, True))
    # Nothing limited and no rate: no RateLimit headers at all, on an answer or on a refusal.
    free = compile_for(Plan("free", None, {"api_calls": Quota("api_calls", None)}))
    assert free.policy is None and free.head_lines == "" and free.limited == ()
    assert refusal_headers(free, decision({}), NOW, "api_calls") == ()
    assert Admission(free, ratelimit_values(free, decision({}), NOW)).headers == ()


def test_the_check_holds_every_rule_and_is_prepared_only_when_there_is_one() -> None:
    prepared: list[Check] = []
    plan = Plan("p", Rate(10, 20), {"chain_deployments": Quota("chain_deployments", 100, on_exceed="overage"),
                                    "chains": Quota("chains", 5, guards=(CREATE_CHAIN,))})
    compiled = compile_for(plan, hits=frozenset({CREATE_CHAIN}), prepared=prepared)
    check = compiled.check
    assert check.rate == RateRule(10, 20)
    assert check.counters == (CounterRule("api_calls", 1, None, False),
                              CounterRule("chain_deployments", 1, 100, False))  # overage: counted, not enforced
    assert check.guards == (GuardRule("chains", 5.0),)
    assert check.billable == (("api_calls", 1), ("chain_deployments", 1))
    assert (check.bucket_ttl, check.period_start, check.period_end) == (BUCKET_TTL, *PERIOD)
    assert prepared == [check] and compiled.prepared == ("prepared", check)
    assert compiled.route == "api_calls+chain_deployments"
    # No rate, nothing counted, no guard: nothing to send to the store.
    nothing = compile_for(Plan("p", None, {}), (), prepared=prepared)
    assert nothing.prepared is None and len(prepared) == 1 and nothing.route == "unmetered"


def test_validity_spans_one_bucket_and_a_past_due_grace() -> None:
    bucket = int(NOW) // 300 * 300
    compiled = compile_for(PRO, alert_from=0.8)
    assert (compiled.since, compiled.until, compiled.bucket) == (bucket, bucket + 300, bucket)
    assert compiled.writable_until == bucket + 300 + 10 - 1
    assert compiled.where == ("acme", *PERIOD, bucket, BUCKET_TTL)
    assert compiled.cacheable
    assert compiled.alerts["chain_deployments"] == (80.0, 100)
    assert compile_for(PRO).alerts == {}
    past_due = datetime.fromtimestamp(NOW, UTC) - timedelta(days=7, seconds=-60)  # grace ends in 60 s
    record = TenantRecord("acme", "pro", "active", "past_due", None, None, None, (), past_due_since=past_due)
    assert compile_for(PRO, record=record).until == NOW + 60


# --------------------------------------------------------------------------- shadow limits


def test_shadow_limits_become_rules_that_only_report_and_stay_out_of_the_headers() -> None:
    plan = Plan("next", None, {
        "api_calls": Quota("api_calls", 1000, shadow_limit=500),  # an enforced limit with a shadow one beside it
        "chain_deployments": Quota("chain_deployments", None, shadow_limit=10),
        "chains": Quota("chains", None, guards=(CREATE_CHAIN,), shadow_limit=2),
    }, shadow_rate=Rate(5, 10))
    compiled = compile_for(plan, hits=frozenset({CREATE_CHAIN}))
    check = compiled.check
    assert check.rate is None and check.shadow_rate == RateRule(5, 10)
    assert check.counters == (CounterRule("api_calls", 1, 1000, True, 500),
                              CounterRule("chain_deployments", 1, None, False, 10))
    assert check.guards == (GuardRule("chains", 2.0, shadow=True),)
    assert check.has_shadow
    # RateLimit headers advertise what is enforced only; alerts watch enforced limits only.
    assert compiled.policy == ("RateLimit-Policy", f'"api_calls";q=1000;w={WINDOW}')
    assert compiled.limited == (("api_calls", 1000),)
    assert compile_for(plan, alert_from=0.8).alerts == {"api_calls": (800.0, 1000)}
    # A shadow rate alone still needs the store.
    assert compile_for(Plan("p", None, {}, shadow_rate=Rate(1, 1)), ()).prepared is not None


def test_a_shadow_limit_of_an_overage_quota_reports_nothing() -> None:
    plan = Plan("p", None, {"api_calls": Quota("api_calls", 10, "overage", shadow_limit=5)})
    assert compile_for(plan).check.counters[0] == CounterRule("api_calls", 1, 10, False, None)


def test_shadow_overrides_compile_beside_the_plans_enforced_limits() -> None:
    record = TenantRecord("acme", "pro", "active", None, None, None, None, (
        Override("chain_deployments", limit=20, enforce="shadow"), Override("rate", per_second=1, enforce="shadow"),
        Override("chains", limit=1, enforce="shadow")))
    compiled = compile_for(PRO, record=record, hits=frozenset({CREATE_CHAIN}))
    check = compiled.check
    assert (check.rate, check.shadow_rate) == (RateRule(10, 20), RateRule(1, 20))
    assert check.counters[1] == CounterRule("chain_deployments", 1, 100, True, 20)
    assert check.guards == (GuardRule("chains", 5.0), GuardRule("chains", 1.0, shadow=True))
    assert compiled.policy == compile_for(PRO).policy  # the headers are the plan's enforced limits
