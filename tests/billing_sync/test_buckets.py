"""Bucket keys, Stripe identifiers, field values and carry targets: pure functions, no Redis or SQL."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from billing_sync.buckets import (
    bucket_datetime,
    bucket_identifier,
    carry_target,
    leftover_identifier,
    parse_bucket_key,
    parse_bucket_value,
)
from metering import keys

BUCKET = 300
MONTH_END = int(datetime(2027, 2, 1, tzinfo=UTC).timestamp())  # 2027-02-01 00:00 UTC
LAST = MONTH_END - BUCKET  # the last bucket of January


@pytest.mark.parametrize("tenant", ["acme", "org:beta:eu", "a}b", "x%41", "with space", "ü", "b:1}:b:2"])
def test_bucket_key_round_trip(tenant: str) -> None:
    assert parse_bucket_key(keys.bucket_key(tenant, 1_700_000_100)) == (tenant, 1_700_000_100)
    assert parse_bucket_key(keys.bucket_key(tenant, 5).encode()) == (tenant, 5)


@pytest.mark.parametrize("key", ["gw:{t:acme}:q:api_calls:1", "gw:{t:acme}:b:x", "gw:{t:}:b:1", "gw:tenants:seen",
                                 "gw:{t:a b}:b:1", "gw:{t:%zz}:b:1"])
def test_other_keys_are_not_buckets(key: str) -> None:
    assert parse_bucket_key(key) is None


def test_identifier_is_stable_and_short() -> None:
    # Pinned: a change re-bills every bucket inside Stripe's uniqueness window.
    assert bucket_identifier("acme", "api_calls", 1_800_000_000) == (
        "cg1_api_calls_1800000000_724c633c5d9f5b1c74bed33e20e7b898c366968f")
    assert len(bucket_identifier("t" * 64, "m" * 64, 10**12)) <= 100
    assert bucket_identifier("a", "b_c", 1) != bucket_identifier("a_b", "c", 1)


def test_leftover_identifier_is_stable_short_and_apart_from_the_buckets() -> None:
    # Pinned for the same reason as the bucket identifier.
    assert leftover_identifier("acme", "api_calls", 1_800_000_000, 1) == (
        "cg1l_api_calls_1800000000_1_7512119157c57d7fca44f2ce03f368e5")
    assert len(leftover_identifier("t" * 64, "m" * 64, 10**12, 999_999)) <= 100
    assert leftover_identifier("acme", "api_calls", 1_800_000_000, 1) != leftover_identifier(
        "acme", "api_calls", 1_800_000_000, 2)


def test_bucket_datetime_is_utc() -> None:
    assert bucket_datetime(MONTH_END) == datetime(2027, 2, 1, tzinfo=UTC)


@pytest.mark.parametrize(("raw", "value"), [(b"5", Decimal(5)), ("-2", Decimal(-2)),
                                            ("1.23456789", Decimal("1.234568")), (12.25, Decimal("12.25"))])
def test_bucket_values_are_kept_to_six_places(raw: object, value: Decimal) -> None:
    parsed = parse_bucket_value(raw)
    assert parsed == value and parsed.as_tuple().exponent == -6


@pytest.mark.parametrize("raw", [b"x", "", "nan", "inf", "-Infinity"])
def test_what_is_not_a_finite_number_is_no_value(raw: object) -> None:
    assert parse_bucket_value(raw) is None


def test_leftovers_go_to_the_next_bucket_or_the_open_one() -> None:
    start = LAST - 7200
    assert carry_target(start, BUCKET, start + BUCKET + 20, None) == start + BUCKET
    assert carry_target(start, BUCKET, LAST - 3600 + 5, None) == LAST - 3600  # idle since: the open bucket


def test_leftovers_never_cross_the_billing_period() -> None:
    assert carry_target(LAST, BUCKET, MONTH_END + 20, None) is None
    anchored_end = int(datetime(2027, 1, 15, tzinfo=UTC).timestamp())
    assert carry_target(anchored_end - BUCKET, BUCKET, anchored_end + 20, 15) is None
    assert carry_target(anchored_end - BUCKET, BUCKET, anchored_end + 20, None) == anchored_end  # calendar month
