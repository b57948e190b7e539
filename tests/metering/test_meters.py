"""Meters: parsing `meters:`, matching requests to meters, globs, and the upstream's usage report."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from metering import match_cache
from metering.errors import ConfigError
from metering.match_cache import BoundedMatchCache
from metering.meters import (
    DEFAULT_METERS,
    Meter,
    MeterMatcher,
    glob_to_regex,
    parse_meters,
    parse_usage_report,
)

PRODUCT_METERS_YAML = """
api_calls:         {match: {path: "/api/**"},                                 stripe_event: api_calls}
chain_deployments: {match: {method: POST, path: "/api/chains/*/deployments"}, stripe_event: chain_deployments}
bandwidth_bytes:   {source: response_bytes,                                   stripe_event: bandwidth_bytes}
chains:            {source: reported, kind: gauge}
storage_gb:        {source: reported, kind: gauge, stripe_event: storage_gb}
"""


def by_name(meters: tuple[Meter, ...]) -> dict[str, Meter]:
    return {m.name: m for m in meters}


# --------------------------------------------------------------------------- defaults


def test_none_gives_the_default_meters() -> None:
    assert parse_meters(None) is DEFAULT_METERS


def test_defaults_are_the_five_meters_of_the_product_contract() -> None:
    meters = by_name(DEFAULT_METERS)
    assert list(meters) == ["api_calls", "chain_deployments", "bandwidth_bytes", "chains", "storage_gb"]
    assert meters["api_calls"] == Meter("api_calls", "request", "counter", None, "/api/**", "api_calls")
    assert meters["chain_deployments"] == Meter(
        "chain_deployments", "request", "counter", "POST", "/api/chains/*/deployments", "chain_deployments"
    )
    assert meters["bandwidth_bytes"] == Meter(
        "bandwidth_bytes", "response_bytes", "counter", None, None, "bandwidth_bytes"
    )
    assert meters["chains"] == Meter("chains", "reported", "gauge", None, None, None)
    assert meters["storage_gb"] == Meter("storage_gb", "reported", "gauge", None, None, "storage_gb")
    assert not any(m.bill_server_errors for m in DEFAULT_METERS)


def test_the_documented_yaml_parses_to_the_defaults() -> None:
    assert parse_meters(yaml.safe_load(PRODUCT_METERS_YAML)) == DEFAULT_METERS


def test_empty_mapping_means_no_meters() -> None:
    assert parse_meters({}) == ()


# --------------------------------------------------------------------------- parsing


def test_match_without_source_is_a_request_counter_and_method_is_upper_cased() -> None:
    (meter,) = parse_meters({"writes": {"match": {"method": "put", "path": "/api/**"}}})
    assert meter == Meter("writes", "request", "counter", "PUT", "/api/**", None)


def test_explicit_request_source_without_match_counts_every_request() -> None:
    (meter,) = parse_meters({"all": {"source": "request"}})
    assert (meter.source, meter.kind, meter.method, meter.path) == ("request", "counter", None, None)


def test_match_with_only_a_method_or_null_path() -> None:
    (meter,) = parse_meters({"posts": {"match": {"method": "POST", "path": None}}})
    assert (meter.method, meter.path) == ("POST", None)


def test_reported_defaults_to_gauge_and_nulls_mean_omitted() -> None:
    (meter,) = parse_meters({"g": {"source": "reported", "kind": None, "stripe_event": None}})
    assert (meter.kind, meter.stripe_event) == ("gauge", None)


def test_request_bytes_and_bill_server_errors() -> None:
    (meter,) = parse_meters({"upload": {"source": "request_bytes", "bill_server_errors": True}})
    assert (meter.source, meter.kind, meter.bill_server_errors) == ("request_bytes", "counter", True)


def test_stripe_event_may_differ_from_the_meter_name() -> None:
    (meter,) = parse_meters({"api_calls": {"match": {"path": "/api/**"}, "stripe_event": "cb.api-calls:v2"}})
    assert meter.stripe_event == "cb.api-calls:v2"


BAD_METERS: list[tuple[Any, str]] = [
    (["api_calls"], "meters"),
    ({"Api": {"source": "request"}}, "meters.Api"),
    ({"a-b": {"source": "request"}}, "meters.a-b"),
    ({"x" * 65: {"source": "request"}}, "meters." + "x" * 65),
    ({"": {"source": "request"}}, "meters."),
    ({1: {"source": "request"}}, "meters.1"),
    ({"rate": {"source": "request"}}, "meters.rate"),
    ({"m": None}, "meters.m"),
    ({"m": "request"}, "meters.m"),
    ({"m": {}}, "meters.m"),
    ({"m": {"source": None}}, "meters.m"),
    ({"m": {"source": "request", "limit": 3}}, "meters.m.limit"),
    ({"m": {"match": None}}, "meters.m.match"),
    ({"m": {"match": ["/api"]}}, "meters.m.match"),
    ({"m": {"match": {"path": "/a", "host": "x"}}}, "meters.m.match.host"),
    ({"m": {"match": {"method": "FETCH"}}}, "meters.m.match.method"),
    ({"m": {"match": {"method": 1}}}, "meters.m.match.method"),
    ({"m": {"match": {"path": "api/**"}}}, "meters.m.match.path"),
    ({"m": {"match": {"path": ""}}}, "meters.m.match.path"),
    ({"m": {"match": {"path": 5}}}, "meters.m.match.path"),
    ({"m": {"match": {"path": "/api/**x"}}}, "meters.m.match.path"),
    ({"m": {"match": {"path": "/api/a**"}}}, "meters.m.match.path"),
    ({"m": {"match": {"path": "/api/x?y=1"}}}, "meters.m.match.path"),
    ({"m": {"match": {"path": "/api/x#f"}}}, "meters.m.match.path"),
    ({"m": {"match": {"path": "/api/ x"}}}, "meters.m.match.path"),
    ({"m": {"match": {"path": "/api/\x00"}}}, "meters.m.match.path"),
    ({"m": {"source": "requests"}}, "meters.m.source"),
    ({"m": {"source": 3}}, "meters.m.source"),
    ({"m": {"source": "response_bytes", "match": {"path": "/a"}}}, "meters.m.match"),
    ({"m": {"source": "reported", "match": {"path": "/a"}}}, "meters.m.match"),
    ({"m": {"source": "request", "kind": "histogram"}}, "meters.m.kind"),
    ({"m": {"source": "request", "kind": "gauge"}}, "meters.m.kind"),
    ({"m": {"source": "response_bytes", "kind": "gauge"}}, "meters.m.kind"),
    ({"m": {"match": {"path": "/a"}, "kind": "gauge"}}, "meters.m.kind"),
    ({"m": {"source": "reported", "kind": "counter"}}, "meters.m.kind"),
    ({"m": {"source": "request", "stripe_event": ""}}, "meters.m.stripe_event"),
    ({"m": {"source": "request", "stripe_event": "has space"}}, "meters.m.stripe_event"),
    ({"m": {"source": "request", "stripe_event": "e" * 101}}, "meters.m.stripe_event"),
    ({"m": {"source": "request", "stripe_event": 7}}, "meters.m.stripe_event"),
    ({"m": {"source": "request", "bill_server_errors": "yes"}}, "meters.m.bill_server_errors"),
    ({"m": {"source": "request", "bill_server_errors": 1}}, "meters.m.bill_server_errors"),
    ({"m": {"source": "request", "bill_server_errors": None}}, "meters.m.bill_server_errors"),
    ({"m": {"source": "reported", "bill_server_errors": True}}, "meters.m.bill_server_errors"),
    (
        {
            "a": {"source": "request", "stripe_event": "e"},
            "b": {"source": "request_bytes", "stripe_event": "e"},
        },
        "meters.b.stripe_event",
    ),
]


@pytest.mark.parametrize(("raw", "key"), BAD_METERS, ids=[key for _, key in BAD_METERS])
def test_every_error_names_its_key(raw: Any, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_meters(raw)
    assert info.value.key == key
    assert str(info.value).startswith(f"{key}: ")
    assert len(info.value.message) > 5


def test_error_is_a_value_error_with_the_design_note_name() -> None:
    assert issubclass(ConfigError, ValueError)
    with pytest.raises(ConfigError, match=r"^meters\.m\.match\.path: must start with '/'$"):
        parse_meters({"m": {"match": {"path": "api"}}})


def test_unknown_key_message_lists_the_allowed_keys() -> None:
    with pytest.raises(
        ConfigError, match="allowed: bill_server_errors, kind, match, source, stripe_event"
    ):
        parse_meters({"m": {"source": "request", "limit": 3}})


# --------------------------------------------------------------------------- globs


@pytest.mark.parametrize(
    ("pattern", "path", "expected"),
    [
        ("/status/**", "/status", True),
        ("/status/**", "/status/", True),
        ("/status/**", "/status/a", True),
        ("/status/**", "/status/a/b", True),
        ("/status/**", "/statusx", False),
        ("/status/**", "/x/status", False),
        ("/api/chains/*/deployments", "/api/chains/c1/deployments", True),
        ("/api/chains/*/deployments", "/api/chains//deployments", False),
        ("/api/chains/*/deployments", "/api/chains/a/b/deployments", False),
        ("/api/chains/*/deployments", "/api/chains/c1/deployments/", False),
        ("/api/chains/*/deployments", "/api/chains/c1/deployments/d1", False),
        ("/api/chains/*/deployments", "/api/chains/a%2Fb/deployments", True),
        ("/api/*", "/api/", False),
        ("/api/*", "/api/x", True),
        ("/a/**/z", "/a/z", True),
        ("/a/**/z", "/a/b/z", True),
        ("/a/**/z", "/a/b/c/z", True),
        ("/a/**/z", "/a/bz", False),
        ("/a/**/z", "/a/b/z/c", False),
        ("/**", "/", True),
        ("/**", "/anything/at/all", True),
        ("/api/v*/x", "/api/v1/x", True),
        ("/api/v*/x", "/api/v/x", True),
        ("/api/v*/x", "/api/w1/x", False),
        ("/api/v*/x", "/api/v1/2/x", False),
        ("/api/chains", "/api/chains", True),
        ("/api/chains", "/api/chains/", False),
        ("/api/chains", "/API/chains", False),
        ("/api/chains/", "/api/chains/", True),
        ("/a.b+c(d)", "/a.b+c(d)", True),
        ("/a.b", "/aXb", False),
        ("/a%2Fb", "/a%2Fb", True),
        ("/a%2Fb", "/a/b", False),
        ("/", "/", True),
        ("/", "/x", False),
    ],
)
def test_glob_to_regex(pattern: str, path: str, expected: bool) -> None:
    assert (glob_to_regex(pattern).fullmatch(path) is not None) is expected


def test_glob_is_anchored_even_with_match() -> None:
    assert glob_to_regex("/api").match("/api/x") is None
    assert glob_to_regex("/api").search("/v2/api") is None


@pytest.mark.parametrize("pattern", ["api", "", "/a/**b", "/a/b**", "/***"])
def test_bad_globs_raise_value_error(pattern: str) -> None:
    with pytest.raises(ValueError):
        glob_to_regex(pattern)


# --------------------------------------------------------------------------- matcher


def names(found: tuple[Meter, ...]) -> list[str]:
    return [m.name for m in found]


def test_request_meters_by_method_and_path() -> None:
    matcher = MeterMatcher(DEFAULT_METERS)
    assert names(matcher.request_meters("POST", "/api/chains/c1/deployments")) == [
        "api_calls",
        "chain_deployments",
    ]
    assert names(matcher.request_meters("GET", "/api/chains/c1/deployments")) == ["api_calls"]
    assert names(matcher.request_meters("POST", "/api/chains")) == ["api_calls"]
    assert names(matcher.request_meters("GET", "/api")) == ["api_calls"]
    assert names(matcher.request_meters("GET", "/api/")) == ["api_calls"]
    assert names(matcher.request_meters("GET", "/apix")) == []
    assert names(matcher.request_meters("GET", "/health")) == []


def test_method_case_does_not_dodge_a_meter() -> None:
    matcher = MeterMatcher(DEFAULT_METERS)
    assert names(matcher.request_meters("post", "/api/chains/c1/deployments")) == [
        "api_calls",
        "chain_deployments",
    ]


def test_trailing_slash_is_ignored_but_extra_segments_do_not_match_a_single_segment() -> None:
    matcher = MeterMatcher(DEFAULT_METERS)
    assert names(matcher.request_meters("POST", "/api/chains/c1/deployments/")) == ["api_calls", "chain_deployments"]
    assert names(matcher.request_meters("POST", "/api/chains/a/b/deployments")) == ["api_calls"]


def test_path_is_matched_on_its_readings() -> None:
    matcher = MeterMatcher(DEFAULT_METERS)
    deployment = ["api_calls", "chain_deployments"]
    # %2F read as part of a segment: one segment between chains/ and /deployments.
    assert names(matcher.request_meters("POST", "/api/chains/a%2Fb/deployments")) == deployment
    # and as a separator, as servers that decode before routing read it.
    assert names(matcher.request_meters("POST", "/api%2Fchains%2Fc1%2Fdeployments")) == deployment
    assert names(matcher.request_meters("POST", "/%61pi/chains/c1/deployments")) == deployment
    assert names(matcher.request_meters("POST", "/API/Chains/c1/DEPLOYMENTS")) == deployment
    assert names(matcher.request_meters("POST", "/api/chains/c1/deployments;v=1")) == deployment


def test_query_string_is_ignored_for_matching_and_caching() -> None:
    matcher = MeterMatcher(DEFAULT_METERS)
    assert names(matcher.request_meters("POST", "/api/chains/c1/deployments?dry=1")) == [
        "api_calls",
        "chain_deployments",
    ]
    matcher.request_meters("POST", "/api/chains/c1/deployments?dry=2")
    assert matcher.cache_size() == 1


def test_meter_without_method_or_path_matches_everything() -> None:
    matcher = MeterMatcher(parse_meters({"all": {"source": "request"}, "gets": {"match": {"method": "GET"}}}))
    assert names(matcher.request_meters("DELETE", "/whatever")) == ["all"]
    assert names(matcher.request_meters("GET", "/whatever")) == ["all", "gets"]


def test_matcher_groups_byte_meters_and_gauges() -> None:
    matcher = MeterMatcher(
        parse_meters(
            {
                "calls": {"match": {"path": "/**"}},
                "up": {"source": "request_bytes"},
                "down": {"source": "response_bytes"},
                "chains": {"source": "reported"},
            }
        )
    )
    assert names(matcher.byte_meters) == ["up", "down"]
    assert list(matcher.gauges) == ["chains"]
    assert set(matcher.by_name) == {"calls", "up", "down", "chains"}
    # Byte and reported meters are never request counters.
    assert names(matcher.request_meters("GET", "/x")) == ["calls"]


def test_default_matcher_groups() -> None:
    matcher = MeterMatcher(DEFAULT_METERS)
    assert names(matcher.byte_meters) == ["bandwidth_bytes"]
    assert set(matcher.gauges) == {"chains", "storage_gb"}


def test_cached_answer_is_the_same_object() -> None:
    matcher = MeterMatcher(DEFAULT_METERS)
    first = matcher.request_meters("GET", "/api/x")
    assert matcher.request_meters("GET", "/api/x") is first


def test_cache_is_bounded_and_drops_its_oldest_entries_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(match_cache, "MATCH_CACHE_SIZE", 8)
    matcher = MeterMatcher(DEFAULT_METERS)
    answers = [matcher.request_meters("GET", f"/api/chains/{i}") for i in range(8)]
    assert matcher.cache_size() == 8
    assert names(matcher.request_meters("POST", "/api/chains/9/deployments")) == [
        "api_calls",
        "chain_deployments",
    ]
    assert matcher.cache_size() == 8  # no cliff: only the oldest answer went
    assert matcher.request_meters("GET", "/api/chains/7") is answers[7]
    assert matcher.request_meters("GET", "/api/chains/0") is not answers[0]
    for i in range(100):
        matcher.request_meters("GET", f"/api/chains/{i}")
        assert matcher.cache_size() <= 8


def test_long_paths_are_not_cached() -> None:
    matcher = MeterMatcher(DEFAULT_METERS)
    long_path = "/api/" + "x" * match_cache.MATCH_CACHE_MAX_PATH
    assert names(matcher.request_meters("GET", long_path)) == ["api_calls"]
    assert matcher.cache_size() == 0


def test_cache_bound_at_the_real_size() -> None:
    matcher = MeterMatcher(DEFAULT_METERS)
    for i in range(match_cache.MATCH_CACHE_SIZE + 5):
        matcher.request_meters("GET", f"/api/chains/{i}")
    assert matcher.cache_size() <= match_cache.MATCH_CACHE_SIZE


# --------------------------------------------------------------------------- the match cache itself


def test_match_cache_never_holds_more_than_its_size() -> None:
    cache: BoundedMatchCache[int] = BoundedMatchCache(size=3)
    for i in range(50):
        key = ("GET", f"/api/chains/{i}")
        assert cache.get(key) is None
        cache.put(key, i)
        assert len(cache) <= 3
        assert cache.get(key) == i
    # The oldest went first: the last three are kept, in order.
    assert [cache.get(("GET", f"/api/chains/{i}")) for i in (46, 47, 48, 49)] == [None, 47, 48, 49]


def test_match_cache_keeps_no_long_path() -> None:
    cache: BoundedMatchCache[int] = BoundedMatchCache(size=3)
    at_limit = ("GET", "/" + "x" * (match_cache.MATCH_CACHE_MAX_PATH - 1))
    too_long = ("GET", "/" + "x" * match_cache.MATCH_CACHE_MAX_PATH)
    cache.put(too_long, 1)
    assert cache.get(too_long) is None and len(cache) == 0
    cache.put(at_limit, 2)
    assert cache.get(at_limit) == 2 and len(cache) == 1


def test_match_cache_size_defaults_to_the_module_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    assert BoundedMatchCache().size == match_cache.MATCH_CACHE_SIZE
    monkeypatch.setattr(match_cache, "MATCH_CACHE_SIZE", 2)
    assert BoundedMatchCache().size == 2


# --------------------------------------------------------------------------- usage report

GAUGES = MeterMatcher(DEFAULT_METERS).gauges


@pytest.mark.parametrize(
    ("header", "values", "bad"),
    [
        ("chains=3, storage_gb=12.5", {"chains": 3.0, "storage_gb": 12.5}, 0),
        ("chains=3,storage_gb=12.5", {"chains": 3.0, "storage_gb": 12.5}, 0),
        ("  chains = 3 ,\tstorage_gb =12.5  ", {"chains": 3.0, "storage_gb": 12.5}, 0),
        ("chains=0", {"chains": 0.0}, 0),
        ("storage_gb=0.5", {"storage_gb": 0.5}, 0),
        ("storage_gb=.5", {"storage_gb": 0.5}, 0),
        ("storage_gb=5.", {"storage_gb": 5.0}, 0),
        ("storage_gb=1e3", {"storage_gb": 1000.0}, 0),
        ("storage_gb=1.5E-1", {"storage_gb": 0.15}, 0),
        ("", {}, 0),
        ("   ", {}, 0),
        ("chains=abc", {}, 1),
        ("chains=-1", {}, 1),
        ("chains=-0", {}, 1),
        ("chains=+1", {}, 1),
        ("chains=nan", {}, 1),
        ("chains=NaN", {}, 1),
        ("chains=inf", {}, 1),
        ("chains=infinity", {}, 1),
        ("chains=1e999", {}, 1),
        ("chains=1_000", {}, 1),
        ("chains=0x10", {}, 1),
        ("chains=\u0663", {}, 1),
        ("chains=", {}, 1),
        ("chains=1 2", {}, 1),
        ("chains=1=2", {}, 1),
        ("unknown=1", {}, 1),
        ("Chains=1", {}, 1),
        ("=3", {}, 1),
        ("chains", {}, 1),
        ("chains=3,,storage_gb=1", {"chains": 3.0, "storage_gb": 1.0}, 1),
        ("chains=3,", {"chains": 3.0}, 1),
        ("chains=3, unknown=1, chains=nan, =3", {"chains": 3.0}, 3),
        ("chains=1, chains=4", {"chains": 4.0}, 0),
        ("chains=1, chains=abc", {"chains": 1.0}, 1),
    ],
)
def test_parse_usage_report(header: str, values: dict[str, float], bad: int) -> None:
    assert parse_usage_report(header, GAUGES) == (values, bad)


def test_usage_report_accepts_only_the_given_gauges() -> None:
    assert parse_usage_report("chains=1, api_calls=5", {}) == ({}, 2)
