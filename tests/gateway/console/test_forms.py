"""gateway/console/forms.py: form fields to the admin API's bodies."""

from __future__ import annotations

from gateway.console.forms import override_body, tenant_body, utc_instant


def test_override_fields_become_the_api_body() -> None:
    assert override_body({"limit": " 250 ", "expires_at": "2099-01-31T12:30", "reason": " launch "},
                         "chain_deployments") == {"limit": 250, "expires_at": "2099-01-31T12:30:00Z",
                                                  "reason": "launch"}
    assert override_body({"limit": "5", "unlimited": "on"}, "api_calls") == {"limit": None}
    assert override_body({"limit": ""}, "api_calls") == {}  # the API says the limit is required
    assert override_body({"limit": "ten"}, "api_calls") == {"limit": "ten"}  # the API names the field
    assert override_body({"per_second": "2.5", "burst": "5", "limit": "9"}, "rate") == {"per_second": 2.5,
                                                                                        "burst": 5}
    assert override_body({"per_second": "3"}, "rate") == {"per_second": 3}
    assert override_body({"unlimited": "on"}, "rate") == {"per_second": None}


def test_instants() -> None:
    assert utc_instant("2099-01-31T12:30") == "2099-01-31T12:30:00Z"
    assert utc_instant("2099-01-31T12:30:15") == "2099-01-31T12:30:15Z"
    assert utc_instant("2099-01-31T12:30:00+02:00") == "2099-01-31T12:30:00+02:00"  # RFC 3339 as given
    assert utc_instant("tomorrow") == "tomorrow"


def test_tenant_fields() -> None:
    assert tenant_body({"plan": "starter", "status": "", "csrf": "x"}) == {"plan": "starter"}
