"""Plans: the default catalog, `plans:` parsing (replacement, validation) and operator overrides."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import yaml

from metering.errors import ConfigError
from metering.meters import DEFAULT_METERS, parse_meters
from quota.plans import DEFAULT_CATALOG, Override, Plan, Quota, Rate, effective, parse_plans

NOW = datetime(2025, 6, 15, 12, tzinfo=UTC)
CHAINS_GUARD = (("POST", "/api/chains"),)


# --------------------------------------------------------------------------- the catalog


@pytest.mark.parametrize(
    ("plan", "chains", "deployments", "storage", "per_second", "burst"),
    [
        ("starter", 1, 100, 10, 10, 20),
        ("professional", 5, 500, 50, 50, 100),
        ("enterprise", None, None, 500, 200, 400),
        ("sovereign", None, None, None, 1000, 2000),
    ],
)
def test_default_catalog_matches_the_pricing_table(
    plan: str, chains: int | None, deployments: int | None, storage: int | None, per_second: int, burst: int
) -> None:
    p = DEFAULT_CATALOG[plan]
    assert p.name == plan
    assert p.rate == Rate(per_second, burst)
    assert p.quotas == {
        "chains": Quota("chains", chains, "reject", CHAINS_GUARD),
        "chain_deployments": Quota("chain_deployments", deployments, "reject", ()),
        "storage_gb": Quota("storage_gb", storage, "reject", ()),
    }


def test_catalog_has_exactly_the_four_plans_and_is_read_only() -> None:
    assert list(DEFAULT_CATALOG) == ["starter", "professional", "enterprise", "sovereign"]
    with pytest.raises(TypeError):
        DEFAULT_CATALOG["free"] = DEFAULT_CATALOG["starter"]  # type: ignore[index]
    with pytest.raises(TypeError):
        DEFAULT_CATALOG["starter"].quotas["chains"] = Quota("chains", 99)  # type: ignore[index]


def test_no_plans_key_gives_the_catalog() -> None:
    assert parse_plans(None, DEFAULT_METERS) == dict(DEFAULT_CATALOG)
    assert parse_plans({}, DEFAULT_METERS) == dict(DEFAULT_CATALOG)


def test_the_documented_starter_yaml_equals_the_catalog_starter() -> None:
    raw = yaml.safe_load(
        """
        starter:
          rate: {per_second: 10, burst: 20}
          quotas:
            chain_deployments: {limit: 100}
            chains: {limit: 1, guards: {method: POST, path: "/api/chains"}}
            storage_gb: {limit: 10}
        """
    )
    assert parse_plans(raw, DEFAULT_METERS)["starter"] == DEFAULT_CATALOG["starter"]


# --------------------------------------------------------------------------- replacement


def test_a_named_plan_replaces_the_catalog_plan_entirely_others_stay() -> None:
    plans = parse_plans({"starter": {"quotas": {"api_calls": {"limit": 1000}}}}, DEFAULT_METERS)
    assert plans["starter"] == Plan("starter", None, {"api_calls": Quota("api_calls", 1000)})
    for name in ("professional", "enterprise", "sovereign"):
        assert plans[name] is DEFAULT_CATALOG[name]


def test_new_plans_are_added() -> None:
    raw = {
        "free": {"rate": {"per_second": 0.5, "burst": 1}, "quotas": {"chain_deployments": {"limit": 0}}},
        "team-2": {"rate": None},
    }
    plans = parse_plans(raw, DEFAULT_METERS)
    assert list(plans) == ["starter", "professional", "enterprise", "sovereign", "free", "team-2"]
    assert plans["free"] == Plan("free", Rate(0.5, 1), {"chain_deployments": Quota("chain_deployments", 0)})
    assert plans["team-2"] == Plan("team-2", None, {})


def test_quota_options() -> None:
    raw = {
        "p": {
            "quotas": {
                "api_calls": {"limit": 1_000_000.0, "on_exceed": "overage"},
                "bandwidth_bytes": {"limit": None},
                "storage_gb": {"limit": 12.5, "on_exceed": "overage"},
                "chains": {
                    "limit": 3,
                    "guards": [{"method": "post", "path": "/api/chains"}, {"path": "/api/chains/*/clone"}],
                },
            }
        }
    }
    quotas = parse_plans(raw, DEFAULT_METERS)["p"].quotas
    assert quotas["api_calls"] == Quota("api_calls", 1_000_000, "overage")
    assert type(quotas["api_calls"].limit) is int  # counters count whole units
    assert quotas["bandwidth_bytes"] == Quota("bandwidth_bytes", None)
    assert quotas["storage_gb"] == Quota("storage_gb", 12.5, "overage")
    assert quotas["chains"].guards == (("POST", "/api/chains"), (None, "/api/chains/*/clone"))


def test_custom_meters_can_be_limited() -> None:
    meters = (*DEFAULT_METERS, *parse_meters({"nodes": {"source": "reported"}}))
    plans = parse_plans({"starter": {"quotas": {"nodes": {"limit": 2}}}}, meters)
    assert plans["starter"].quotas["nodes"] == Quota("nodes", 2)


def test_catalog_plans_kept_must_fit_the_configured_meters() -> None:
    only_calls = parse_meters({"api_calls": {"match": {"path": "/api/**"}}})
    with pytest.raises(ConfigError) as info:
        parse_plans({}, only_calls)
    assert info.value.key == "plans.starter.quotas.chain_deployments"
    assert "replace plan starter" in info.value.message
    # Replacing every catalog plan makes the custom meter set usable.
    raw = {name: {"quotas": {"api_calls": {"limit": 10}}} for name in DEFAULT_CATALOG}
    assert set(parse_plans(raw, only_calls)) == set(DEFAULT_CATALOG)


def test_catalog_guards_need_chains_to_be_a_gauge() -> None:
    meters = parse_meters(
        {
            "chain_deployments": {"source": "request"},
            "chains": {"match": {"method": "POST", "path": "/api/chains"}},
            "storage_gb": {"source": "reported"},
        }
    )
    with pytest.raises(ConfigError) as info:
        parse_plans({}, meters)
    assert info.value.key == "plans.starter.quotas.chains"


# --------------------------------------------------------------------------- validation

BAD_PLANS: list[tuple[Any, str]] = [
    (["starter"], "plans"),
    ({"Starter": {}}, "plans.Starter"),
    ({"pro plan": {}}, "plans.pro plan"),
    ({"x" * 65: {}}, "plans." + "x" * 65),
    ({"": {}}, "plans."),
    ({3: {}}, "plans.3"),
    ({"starter": None}, "plans.starter"),
    ({"starter": []}, "plans.starter"),
    ({"starter": {"limits": {}}}, "plans.starter.limits"),
    ({"starter": {"rate": 10}}, "plans.starter.rate"),
    ({"starter": {"rate": {"per_second": 10}}}, "plans.starter.rate.burst"),
    ({"starter": {"rate": {"burst": 10}}}, "plans.starter.rate.per_second"),
    ({"starter": {"rate": {"per_second": 10, "burst": 20, "window": 1}}}, "plans.starter.rate.window"),
    ({"starter": {"rate": {"per_second": 0, "burst": 20}}}, "plans.starter.rate.per_second"),
    ({"starter": {"rate": {"per_second": -1, "burst": 20}}}, "plans.starter.rate.per_second"),
    ({"starter": {"rate": {"per_second": "10", "burst": 20}}}, "plans.starter.rate.per_second"),
    ({"starter": {"rate": {"per_second": True, "burst": 20}}}, "plans.starter.rate.per_second"),
    ({"starter": {"rate": {"per_second": float("inf"), "burst": 20}}}, "plans.starter.rate.per_second"),
    ({"starter": {"rate": {"per_second": float("nan"), "burst": 20}}}, "plans.starter.rate.per_second"),
    ({"starter": {"rate": {"per_second": None, "burst": 20}}}, "plans.starter.rate.per_second"),
    ({"starter": {"rate": {"per_second": 10, "burst": 0}}}, "plans.starter.rate.burst"),
    ({"starter": {"rate": {"per_second": 10, "burst": 2.5}}}, "plans.starter.rate.burst"),
    ({"starter": {"rate": {"per_second": 10, "burst": True}}}, "plans.starter.rate.burst"),
    ({"starter": {"rate": {"per_second": 10, "burst": "20"}}}, "plans.starter.rate.burst"),
    ({"starter": {"quotas": []}}, "plans.starter.quotas"),
    ({"starter": {"quotas": {"widgets": {"limit": 1}}}}, "plans.starter.quotas.widgets"),
    ({"starter": {"quotas": {"rate": {"limit": 1}}}}, "plans.starter.quotas.rate"),
    ({"starter": {"quotas": {"chains": 1}}}, "plans.starter.quotas.chains"),
    ({"starter": {"quotas": {"chains": None}}}, "plans.starter.quotas.chains"),
    ({"starter": {"quotas": {"chains": {}}}}, "plans.starter.quotas.chains.limit"),
    ({"starter": {"quotas": {"chains": {"limit": 1, "max": 2}}}}, "plans.starter.quotas.chains.max"),
    (
        {"starter": {"quotas": {"chain_deployments": {"limit": -1}}}},
        "plans.starter.quotas.chain_deployments.limit",
    ),
    (
        {"starter": {"quotas": {"chain_deployments": {"limit": "100"}}}},
        "plans.starter.quotas.chain_deployments.limit",
    ),
    (
        {"starter": {"quotas": {"chain_deployments": {"limit": True}}}},
        "plans.starter.quotas.chain_deployments.limit",
    ),
    (
        {"starter": {"quotas": {"chain_deployments": {"limit": 1.5}}}},
        "plans.starter.quotas.chain_deployments.limit",
    ),
    (
        {"starter": {"quotas": {"chain_deployments": {"limit": float("inf")}}}},
        "plans.starter.quotas.chain_deployments.limit",
    ),
    (
        {"starter": {"quotas": {"storage_gb": {"limit": float("nan")}}}},
        "plans.starter.quotas.storage_gb.limit",
    ),
    ({"starter": {"quotas": {"storage_gb": {"limit": -0.5}}}}, "plans.starter.quotas.storage_gb.limit"),
    (
        {"starter": {"quotas": {"storage_gb": {"limit": 1, "on_exceed": "block"}}}},
        "plans.starter.quotas.storage_gb.on_exceed",
    ),
    (
        {"starter": {"quotas": {"storage_gb": {"limit": 1, "on_exceed": None}}}},
        "plans.starter.quotas.storage_gb.on_exceed",
    ),
    (
        {"starter": {"quotas": {"api_calls": {"limit": 1, "guards": {"path": "/api"}}}}},
        "plans.starter.quotas.api_calls.guards",
    ),
    (
        {"starter": {"quotas": {"chains": {"limit": 1, "on_exceed": "overage", "guards": {"path": "/a"}}}}},
        "plans.starter.quotas.chains.guards",
    ),
    (
        {"starter": {"quotas": {"chains": {"limit": 1, "guards": "/api"}}}},
        "plans.starter.quotas.chains.guards",
    ),
    (
        {"starter": {"quotas": {"chains": {"limit": 1, "guards": {"method": "POST"}}}}},
        "plans.starter.quotas.chains.guards.path",
    ),
    (
        {"starter": {"quotas": {"chains": {"limit": 1, "guards": {"method": "MAKE", "path": "/a"}}}}},
        "plans.starter.quotas.chains.guards.method",
    ),
    (
        {"starter": {"quotas": {"chains": {"limit": 1, "guards": {"path": "api/chains"}}}}},
        "plans.starter.quotas.chains.guards.path",
    ),
    (
        {"starter": {"quotas": {"chains": {"limit": 1, "guards": {"path": "/a", "host": "x"}}}}},
        "plans.starter.quotas.chains.guards.host",
    ),
    (
        {"starter": {"quotas": {"chains": {"limit": 1, "guards": [{"path": "/a"}, {"path": "/b/**c"}]}}}},
        "plans.starter.quotas.chains.guards[1].path",
    ),
    ({"starter": {"rate": {"per_second": 10, "burst": 20, "enforce": "off"}}}, "plans.starter.rate.enforce"),
    ({"starter": {"rate": {"per_second": 10, "burst": 20, "enforce": None}}}, "plans.starter.rate.enforce"),
    ({"starter": {"quotas": {"chains": {"limit": 1, "enforce": "shadows"}}}}, "plans.starter.quotas.chains.enforce"),
    ({"starter": {"quotas": {"chains": {"limit": 1, "enforce": True}}}}, "plans.starter.quotas.chains.enforce"),
    (
        {"starter": {"quotas": {"api_calls": {"limit": 1, "on_exceed": "overage", "enforce": "shadow"}}}},
        "plans.starter.quotas.api_calls.enforce",
    ),
]


@pytest.mark.parametrize(("raw", "key"), BAD_PLANS, ids=[key for _, key in BAD_PLANS])
def test_every_error_names_its_key(raw: Any, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_plans(raw, DEFAULT_METERS)
    assert info.value.key == key
    assert str(info.value).startswith(f"{key}: ")


def test_error_message_example() -> None:
    with pytest.raises(
        ConfigError, match=r"^plans\.starter\.quotas\.chain_deployments\.limit: .*>= 0"
    ):
        parse_plans({"starter": {"quotas": {"chain_deployments": {"limit": -1}}}}, DEFAULT_METERS)


def test_unknown_meter_message_lists_the_known_ones() -> None:
    with pytest.raises(
        ConfigError, match="api_calls, bandwidth_bytes, chain_deployments, chains, storage_gb"
    ):
        parse_plans({"starter": {"quotas": {"widgets": {"limit": 1}}}}, DEFAULT_METERS)


# --------------------------------------------------------------------------- effective()


STARTER = DEFAULT_CATALOG["starter"]


def test_no_overrides_is_the_plan() -> None:
    rate, quotas, sources, _ = effective(STARTER, [], NOW)
    assert rate == Rate(10, 20)
    assert quotas == dict(STARTER.quotas)
    assert sources == {"rate": "plan", "chains": "plan", "chain_deployments": "plan", "storage_gb": "plan"}


def test_override_replaces_the_limit_and_keeps_the_rest() -> None:
    rate, quotas, sources, _ = effective(STARTER, [Override("chains", limit=3)], NOW)
    assert quotas["chains"] == Quota("chains", 3, "reject", CHAINS_GUARD)
    assert sources["chains"] == "override"
    assert sources["chain_deployments"] == "plan"
    assert rate == STARTER.rate


def test_override_to_unlimited() -> None:
    _, quotas, sources, _ = effective(STARTER, [Override("chain_deployments", limit=None)], NOW)
    assert quotas["chain_deployments"].limit is None
    assert sources["chain_deployments"] == "override"


def test_override_keeps_overage_setting() -> None:
    plan = Plan("p", None, {"api_calls": Quota("api_calls", 10, "overage")})
    _, quotas, _, _ = effective(plan, [Override("api_calls", limit=20)], NOW)
    assert quotas["api_calls"] == Quota("api_calls", 20, "overage")


def test_override_on_a_meter_the_plan_does_not_limit_adds_a_rejecting_quota() -> None:
    _, quotas, sources, _ = effective(STARTER, [Override("api_calls", limit=5000)], NOW)
    assert quotas["api_calls"] == Quota("api_calls", 5000, "reject", ())
    assert sources["api_calls"] == "override"


def test_override_on_a_big_plan_keeps_the_chains_guard() -> None:
    _, quotas, _, _ = effective(DEFAULT_CATALOG["enterprise"], [Override("chains", limit=50)], NOW)
    assert quotas["chains"] == Quota("chains", 50, "reject", CHAINS_GUARD)


def test_expired_overrides_are_ignored_at_and_after_expiry() -> None:
    expiring = Override("chains", limit=3, expires_at=NOW)
    _, quotas, sources, _ = effective(STARTER, [expiring], NOW)
    assert quotas["chains"].limit == 1 and sources["chains"] == "plan"
    _, quotas, _, _ = effective(STARTER, [expiring], NOW - timedelta(microseconds=1))
    assert quotas["chains"].limit == 3
    _, quotas, _, _ = effective(STARTER, [Override("chains", limit=3, expires_at=NOW + timedelta(days=1))], NOW)
    assert quotas["chains"].limit == 3


def test_expired_rate_override_is_ignored() -> None:
    expired = Override("rate", per_second=500, burst=1000, expires_at=NOW - timedelta(seconds=1))
    rate, _, sources, _ = effective(STARTER, [expired], NOW)
    assert rate == Rate(10, 20) and sources["rate"] == "plan"


def test_rate_override() -> None:
    rate, quotas, sources, _ = effective(STARTER, [Override("rate", per_second=100, burst=150)], NOW)
    assert rate == Rate(100, 150)
    assert sources["rate"] == "override"
    assert "rate" not in quotas


def test_rate_override_without_burst_keeps_the_plan_burst() -> None:
    rate, _, _, _ = effective(STARTER, [Override("rate", per_second=100)], NOW)
    assert rate == Rate(100, 20)


def test_rate_override_on_a_plan_without_rate() -> None:
    plan = Plan("open", None, {})
    assert effective(plan, [Override("rate", per_second=2.5)], NOW)[0] == Rate(2.5, 3)
    assert effective(plan, [Override("rate", per_second=0.1)], NOW)[0] == Rate(0.1, 1)
    assert effective(plan, [], NOW)[0] is None


def test_rate_override_without_per_second_lifts_the_rate_limit() -> None:
    rate, _, sources, _ = effective(STARTER, [Override("rate")], NOW)
    assert rate is None and sources["rate"] == "override"


def test_several_overrides_together() -> None:
    overrides = [
        Override("rate", per_second=40, burst=80, reason="launch week"),
        Override("chains", limit=2, expires_at=NOW + timedelta(hours=1)),
        Override("storage_gb", limit=100, expires_at=NOW - timedelta(hours=1)),
    ]
    rate, quotas, sources, _ = effective(STARTER, overrides, NOW)
    assert rate == Rate(40, 80)
    assert (quotas["chains"].limit, quotas["storage_gb"].limit) == (2, 10)
    assert sources == {
        "rate": "override",
        "chains": "override",
        "chain_deployments": "plan",
        "storage_gb": "plan",
    }


def test_effective_does_not_change_the_plan() -> None:
    effective(STARTER, [Override("chains", limit=3), Override("api_calls", limit=1)], NOW)
    assert STARTER == DEFAULT_CATALOG["starter"]
    assert STARTER.quotas["chains"].limit == 1 and "api_calls" not in STARTER.quotas


def test_naive_times_are_refused() -> None:
    with pytest.raises(ValueError):
        effective(STARTER, [], datetime(2025, 1, 1))
    with pytest.raises(ValueError):
        Override("chains", limit=1, expires_at=datetime(2025, 1, 1))


# --------------------------------------------------------------------------- shadow limits (enforce: shadow)


def test_enforce_shadow_on_a_quota_and_a_rate_only_reports() -> None:
    raw = yaml.safe_load(
        """
        next:
          rate: {per_second: 5, burst: 10, enforce: shadow}
          quotas:
            chain_deployments: {limit: 50, enforce: shadow}
            chains: {limit: 2, enforce: shadow, guards: {method: POST, path: "/api/chains"}}
            storage_gb: {limit: 10, enforce: "on"}
        """
    )
    plan = parse_plans(raw, DEFAULT_METERS)["next"]
    assert (plan.rate, plan.shadow_rate) == (None, Rate(5, 10))
    assert plan.quotas["chain_deployments"] == Quota("chain_deployments", None, shadow_limit=50)
    assert plan.quotas["chains"] == Quota("chains", None, guards=CHAINS_GUARD, shadow_limit=2)
    assert plan.quotas["storage_gb"] == Quota("storage_gb", 10)
    assert parse_plans({"p": {"rate": {"per_second": 1, "burst": 1, "enforce": "on"}}}, DEFAULT_METERS)[
        "p"] == Plan("p", Rate(1, 1), {})


def test_a_shadow_override_keeps_the_enforced_limit_beside_its_own() -> None:
    _, quotas, sources, _ = effective(STARTER, [Override("chain_deployments", limit=40, enforce="shadow")], NOW)
    assert quotas["chain_deployments"] == Quota("chain_deployments", 100, shadow_limit=40)
    assert sources["chain_deployments"] == "override"
    # A meter the plan does not limit: only the shadow limit.
    _, quotas, _, _ = effective(STARTER, [Override("api_calls", limit=5, enforce="shadow")], NOW)
    assert quotas["api_calls"] == Quota("api_calls", None, shadow_limit=5)


def test_an_enforced_override_replaces_a_shadow_plan_quota_whole() -> None:
    plan = Plan("next", None, {"chain_deployments": Quota("chain_deployments", None, shadow_limit=50)})
    _, quotas, _, _ = effective(plan, [Override("chain_deployments", limit=500)], NOW)
    assert quotas["chain_deployments"] == Quota("chain_deployments", 500)


def test_shadow_rate_overrides() -> None:
    rate, _, sources, shadow = effective(STARTER, [Override("rate", per_second=2, enforce="shadow")], NOW)
    assert (rate, shadow, sources["rate"]) == (Rate(10, 20), Rate(2, 20), "override")
    plan = Plan("next", None, {}, shadow_rate=Rate(5, 10))
    assert effective(plan, [], NOW).shadow_rate == Rate(5, 10)
    enforced = effective(plan, [Override("rate", per_second=50)], NOW)
    assert (enforced.rate, enforced.shadow_rate) == (Rate(50, 10), None)
    expired = Override("rate", per_second=1, enforce="shadow", expires_at=NOW)
    assert effective(STARTER, [expired], NOW).shadow_rate is None
