"""`billing.stripe.portal_return_url` (PRODUCT.md §1, §2): null, or an absolute http(s) URL; shown by check-config."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.config import parse_settings
from gateway.config.effective import effective_config
from gateway.config.parse import load_settings
from metering.errors import ConfigError

AUTH = {"auth": {"hs256_secret": "x" * 32}}


def settings(stripe: dict[str, Any]) -> Any:
    return parse_settings({**AUTH, "billing": {"stripe": stripe}})


def test_the_return_url_is_optional_and_shown_where_it_is_written() -> None:
    assert settings({}).billing.portal_return_url is None
    assert settings({"portal_return_url": None}).billing.portal_return_url is None
    chosen = settings({"portal_return_url": "https://app.cosmosbuilder.io/billing?from=portal"})
    assert chosen.billing.portal_return_url == "https://app.cosmosbuilder.io/billing?from=portal"
    shown = effective_config(chosen)["billing"]
    assert shown["stripe"]["portal_return_url"] == "https://app.cosmosbuilder.io/billing?from=portal"
    assert "portal_return_url" not in shown
    assert parse_settings({**AUTH, "billing": shown}).billing == chosen.billing  # the output reads back


@pytest.mark.parametrize("value", ["/billing", "app.example.com/billing", "ftp://example.com/", "https://",
                                   "https://exa mple.com/", "https://example.com:99999/", "javascript:alert(1)",
                                   42, ["https://example.com/"], "https://example.com/" + "x" * 2000])
def test_anything_else_is_an_error_naming_the_key(value: Any) -> None:
    with pytest.raises(ConfigError) as info:
        settings({"portal_return_url": value})
    assert str(info.value).startswith("billing.stripe.portal_return_url: expected an absolute http(s) URL")


def test_it_can_come_from_the_environment() -> None:
    loaded = load_settings(None, {"GATEWAY_JWT_HS256_SECRET": "y" * 32,
                                  "GATEWAY__BILLING__STRIPE__PORTAL_RETURN_URL": "https://app.example.com/"})
    assert loaded.billing.portal_return_url == "https://app.example.com/"
