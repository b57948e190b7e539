from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from metering.meters import DEFAULT_METERS
from quota.plans import DEFAULT_CATALOG, Override
from quota.tenants import TenantRecord
from quota.usage_view import forecast, plan_catalog_view, tenant_view

# Half-way through December (31 days): 15.5 days elapsed.
NOW = datetime(2026, 12, 16, 12, 0, tzinfo=UTC)


def record(**changes: object) -> TenantRecord:
    values: dict[str, object] = {
        "id": "acme", "plan": "starter", "status": "active", "subscription_status": "active",
        "stripe_customer_id": "cus_1", "stripe_subscription_id": "sub_1", "billing_anchor_day": None,
        "overrides": (),
    }
    values.update(changes)
    return TenantRecord(**values)  # type: ignore[arg-type]


def view(rec: TenantRecord | None = None, usage: dict[str, float] | None = None, **kwargs: object) -> dict:
    args: dict[str, object] = {"tenant_id": "acme", "record": rec, "plans": DEFAULT_CATALOG,
                               "default_plan": "starter", "meters": DEFAULT_METERS, "usage": usage or {},
                               "now": NOW}
    args.update(kwargs)
    return tenant_view(**args)  # type: ignore[arg-type]


def test_shape_of_the_view() -> None:
    v = view(record(), {"chain_deployments": 31, "chains": 1, "storage_gb": 2.5})
    assert set(v) == {"tenant", "plan", "status", "subscription_status", "stripe_customer_id",
                      "stripe_subscription_id", "billing_anchor_day", "period", "rate", "meters", "alerts"}
    assert v["tenant"] == "acme" and v["plan"] == "starter" and v["status"] == "active"
    assert v["stripe_customer_id"] == "cus_1" and v["stripe_subscription_id"] == "sub_1"
    assert v["period"] == {"start": "2026-12-01T00:00:00Z", "end": "2027-01-01T00:00:00Z"}
    assert v["rate"] == {"per_second": 10, "burst": 20, "source": "plan", "shadow": None}
    assert v["meters"]["chain_deployments"] == {
        "used": 31, "limit": 100, "shadow_limit": None, "remaining": 69, "resets_at": "2027-01-01T00:00:00Z",
        "on_exceed": "reject", "source": "plan", "forecast": 62,
    }
    json.dumps(v)  # serialisable as it is


def test_every_quota_meter_appears_even_without_usage() -> None:
    v = view(record())
    assert set(v["meters"]) == {"chain_deployments", "chains", "storage_gb"}
    assert v["meters"]["chain_deployments"]["used"] == 0
    assert v["meters"]["chain_deployments"]["forecast"] == 0


def test_counter_meters_with_usage_appear_unlimited() -> None:
    v = view(record(), {"api_calls": 1000, "bandwidth_bytes": 12345})
    calls = v["meters"]["api_calls"]
    assert calls["limit"] is None and calls["remaining"] is None and calls["on_exceed"] is None
    assert calls["resets_at"] == "2027-01-01T00:00:00Z"
    assert calls["forecast"] == 2000
    assert "bandwidth_bytes" in v["meters"]


def test_unknown_or_gauge_usage_without_quota_is_not_listed() -> None:
    v = view(record(plan="sovereign"), {"nonsense": 3, "chains": 4})
    assert "nonsense" not in v["meters"]
    # sovereign keeps chains as a quota with limit None (so an override still guards creation)
    assert v["meters"]["chains"]["limit"] is None


def test_remaining_never_negative_and_overage_shown() -> None:
    v = view(record(), {"chain_deployments": 150})
    assert v["meters"]["chain_deployments"]["remaining"] == 0
    assert v["meters"]["chain_deployments"]["used"] == 150


def test_gauges_do_not_reset_and_forecast_their_value() -> None:
    v = view(record(), {"storage_gb": 7.25})
    storage = v["meters"]["storage_gb"]
    assert storage == {"used": 7.25, "limit": 10, "shadow_limit": None, "remaining": 2.75, "resets_at": None,
                       "on_exceed": "reject", "source": "plan", "forecast": 7.25}


def test_unlimited_plan() -> None:
    v = view(record(plan="enterprise"), {"chain_deployments": 5})
    assert v["meters"]["chain_deployments"]["limit"] is None
    assert v["meters"]["chain_deployments"]["remaining"] is None
    assert v["meters"]["storage_gb"]["limit"] == 500


def test_overrides_apply_until_they_expire() -> None:
    overrides = (
        Override("chain_deployments", limit=1000, expires_at=datetime(2026, 12, 20, tzinfo=UTC)),
        Override("rate", per_second=5, burst=7),
        Override("storage_gb", limit=None),
    )
    v = view(record(overrides=overrides), {"chain_deployments": 10})
    assert v["meters"]["chain_deployments"]["limit"] == 1000
    assert v["meters"]["chain_deployments"]["source"] == "override"
    assert v["meters"]["storage_gb"]["limit"] is None and v["meters"]["storage_gb"]["source"] == "override"
    assert v["rate"] == {"per_second": 5, "burst": 7, "source": "override", "shadow": None}
    expired = datetime(2026, 12, 20, tzinfo=UTC)
    later = view(record(overrides=overrides), {"chain_deployments": 10}, now=expired)
    assert later["meters"]["chain_deployments"]["limit"] == 100
    assert later["meters"]["chain_deployments"]["source"] == "plan"


def test_rate_override_to_unlimited() -> None:
    v = view(record(overrides=(Override("rate", per_second=None),)))
    assert v["rate"] == {"per_second": None, "burst": None, "source": "override", "shadow": None}


def test_anchor_day_sets_the_period() -> None:
    v = view(record(billing_anchor_day=20))
    assert v["period"] == {"start": "2026-11-20T00:00:00Z", "end": "2026-12-20T00:00:00Z"}
    assert v["meters"]["chain_deployments"]["resets_at"] == "2026-12-20T00:00:00Z"
    assert v["billing_anchor_day"] == 20


def test_tenant_without_record_is_on_the_default_plan() -> None:
    v = view(None, {"api_calls": 3}, default_plan="professional")
    assert v["plan"] == "professional" and v["status"] == "active"
    assert v["stripe_customer_id"] is None and v["subscription_status"] is None
    assert v["meters"]["chain_deployments"]["limit"] == 500


def test_no_plan_at_all_limits_nothing() -> None:
    v = view(None, {"api_calls": 3}, default_plan=None)
    assert v["plan"] is None
    assert v["rate"] == {"per_second": None, "burst": None, "source": "plan", "shadow": None}
    assert set(v["meters"]) == {"api_calls"}


def test_alerts_are_passed_through() -> None:
    alerts = [{"meter": "chain_deployments", "threshold": 0.8, "at": "2026-12-10T00:00:00Z"}]
    assert view(record(), alerts=alerts)["alerts"] == alerts


@pytest.mark.parametrize(("used", "now", "expected"), [
    (0, datetime(2026, 12, 16, tzinfo=UTC), 0),
    (10, datetime(2026, 12, 1, tzinfo=UTC), 10),  # no time elapsed: nothing to extrapolate
    (10, datetime(2026, 12, 11, 8, tzinfo=UTC), 30),  # a third of the month
    (1, datetime(2026, 12, 31, tzinfo=UTC), 1),  # 1.03: whole units stay whole
    (20, datetime(2026, 12, 31, tzinfo=UTC), 21),  # 20.67
    (1.5, datetime(2026, 12, 16, 12, tzinfo=UTC), 3.0),
])
def test_forecast(used: float, now: datetime, expected: float) -> None:
    start, end = datetime(2026, 12, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC)
    assert forecast(used, start, end, now) == expected



def test_plan_catalog_view() -> None:
    catalog = plan_catalog_view(DEFAULT_CATALOG, "starter")
    assert catalog["default_plan"] == "starter"
    assert list(catalog["plans"]) == ["enterprise", "professional", "sovereign", "starter"]
    starter = catalog["plans"]["starter"]
    assert starter["rate"] == {"per_second": 10, "burst": 20}
    assert starter["shadow_rate"] is None
    assert starter["quotas"]["chains"] == {"limit": 1, "shadow_limit": None, "on_exceed": "reject",
                                           "guards": [{"method": "POST", "path": "/api/chains"}]}
    assert catalog["plans"]["sovereign"]["quotas"]["storage_gb"]["limit"] is None
    json.dumps(catalog)
