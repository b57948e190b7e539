"""Redis key names: one hash tag per tenant, distinct keys per tenant, meter and period."""

from __future__ import annotations

import re

import pytest

from metering.keys import (
    TENANTS_SEEN_KEY,
    bucket_key,
    gauge_key,
    quota_key,
    rate_key,
    seen_key,
    shadow_hits_key,
    shadow_rate_key,
    tenant_prefix,
    tenant_slot_tag,
)


def hash_tag(key: str) -> str:
    """What Redis Cluster hashes: the content of the first non-empty {...}."""
    start = key.index("{")
    end = key.index("}", start + 1)
    return key[start + 1 : end]


def all_keys(tenant: str) -> list[str]:
    return [
        rate_key(tenant),
        quota_key(tenant, "api_calls", 1_704_067_200),
        gauge_key(tenant, "chains"),
        bucket_key(tenant, 1_704_067_500),
        seen_key(tenant),
        shadow_rate_key(tenant),
        shadow_hits_key(tenant, 1_704_067_200),
    ]


def test_documented_key_shapes() -> None:
    assert rate_key("acme") == "gw:{t:acme}:rate"
    assert (
        quota_key("acme", "chain_deployments", 1_704_067_200) == "gw:{t:acme}:q:chain_deployments:1704067200"
    )
    assert gauge_key("acme", "chains") == "gw:{t:acme}:g:chains"
    assert bucket_key("acme", 1_704_067_500) == "gw:{t:acme}:b:1704067500"
    assert seen_key("acme") == "gw:{t:acme}:seen"
    assert shadow_rate_key("acme") == "gw:{t:acme}:rate:s"
    assert shadow_hits_key("acme", 1_704_067_200) == "gw:{t:acme}:sh:1704067200"
    assert TENANTS_SEEN_KEY == "gw:tenants:seen"
    assert "{" not in TENANTS_SEEN_KEY
    assert tenant_prefix("acme") == "gw:{t:acme}:"


@pytest.mark.parametrize("tenant", ["acme", "org_123", "a.b-c:d", "A" * 64, "x"])
def test_every_key_of_a_tenant_shares_one_hash_tag(tenant: str) -> None:
    tag = tenant_slot_tag(tenant)
    assert tag == f"{{t:{tenant}}}"
    for key in all_keys(tenant):
        assert key.startswith(f"gw:{tag}:")
        assert hash_tag(key) == f"t:{tenant}"


def test_keys_differ_per_tenant_meter_and_period() -> None:
    assert rate_key("acme") != rate_key("acme2")
    assert quota_key("acme", "api_calls", 100) != quota_key("globex", "api_calls", 100)
    assert quota_key("acme", "api_calls", 100) != quota_key("acme", "chain_deployments", 100)
    assert quota_key("acme", "api_calls", 100) != quota_key("acme", "api_calls", 200)
    assert gauge_key("acme", "chains") != gauge_key("acme", "storage_gb")
    assert gauge_key("acme", "chains") != gauge_key("globex", "chains")
    assert bucket_key("acme", 300) != bucket_key("acme", 600)
    assert bucket_key("acme", 300) != bucket_key("globex", 300)
    assert seen_key("acme") != seen_key("globex")
    assert len({*all_keys("acme"), *all_keys("globex")}) == 2 * len(all_keys("acme"))


def test_colons_in_tenant_ids_do_not_collide() -> None:
    # "a:b" is a valid tenant id; the tag delimits it, so it never reads as tenant "a" plus more.
    assert hash_tag(rate_key("a:b")) != hash_tag(rate_key("a"))
    assert quota_key("a:q:x", "m", 1) != quota_key("a", "x", 1)


@pytest.mark.parametrize(
    "tenant", ["a}b", "a{b", "}", "{", "a b", "a\r\nb", "ünï", "a%7Db", "a/b", "x" * 65, "a}:rate"]
)
def test_invalid_tenant_ids_still_give_safe_keys(tenant: str) -> None:
    tag = tenant_slot_tag(tenant)
    assert tag.startswith("{t:") and tag.endswith("}")
    inner = tag[1:-1]
    assert re.fullmatch(r"[A-Za-z0-9._:%-]+", inner)
    for key in all_keys(tenant):
        assert hash_tag(key) == inner
        assert key.isprintable() and " " not in key


def test_escaping_is_one_to_one() -> None:
    tenants = ["a}b", "a%7Db", "a%257Db", "a{b", "a}", "a", "a b", "a+b", "a%20b"]
    tags = [tenant_slot_tag(t) for t in tenants]
    assert len(set(tags)) == len(tenants)
    # A valid-looking id never equals the escaped form of another.
    assert tenant_slot_tag("a}b") == "{t:a%7Db}"
    assert tenant_slot_tag("a%7Db") == "{t:a%257Db}"


def test_empty_tenant_is_refused() -> None:
    with pytest.raises(ValueError):
        rate_key("")


@pytest.mark.parametrize("meter", ["", "Api", "a:b", "a}b", "x" * 65])
def test_bad_meter_names_are_refused(meter: str) -> None:
    with pytest.raises(ValueError):
        quota_key("acme", meter, 1)
    with pytest.raises(ValueError):
        gauge_key("acme", meter)


@pytest.mark.parametrize("epoch", [1.0, True, "1"])
def test_epochs_must_be_integers(epoch: object) -> None:
    with pytest.raises(TypeError):
        quota_key("acme", "api_calls", epoch)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        bucket_key("acme", epoch)  # type: ignore[arg-type]
