"""Quota periods (calendar month or anchor day, UTC) and billing buckets."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from metering.periods import bucket_start, period_bounds, seconds_until


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


# --------------------------------------------------------------------------- calendar month


@pytest.mark.parametrize(
    ("now", "start", "end"),
    [
        (utc(2024, 1, 15, 12), utc(2024, 1, 1), utc(2024, 2, 1)),
        (utc(2024, 12, 31, 23, 59, 59, 999_999), utc(2024, 12, 1), utc(2025, 1, 1)),
        (utc(2025, 1, 1), utc(2025, 1, 1), utc(2025, 2, 1)),
        (utc(2028, 2, 29, 23, 59, 59), utc(2028, 2, 1), utc(2028, 3, 1)),
        (utc(2027, 2, 28, 12), utc(2027, 2, 1), utc(2027, 3, 1)),
        (utc(2024, 4, 30), utc(2024, 4, 1), utc(2024, 5, 1)),
    ],
)
def test_calendar_month(now: datetime, start: datetime, end: datetime) -> None:
    assert period_bounds(now, None) == (start, end)


def test_exactly_at_the_boundary_belongs_to_the_new_period() -> None:
    boundary = utc(2025, 1, 1)
    assert period_bounds(boundary, None) == (utc(2025, 1, 1), utc(2025, 2, 1))
    just_before = boundary - timedelta(microseconds=1)
    assert period_bounds(just_before, None) == (utc(2024, 12, 1), utc(2025, 1, 1))


def test_other_timezones_are_converted_to_utc() -> None:
    # 2025-01-01 01:00 in UTC+2 is still December in UTC.
    plus_two = timezone(timedelta(hours=2))
    start, end = period_bounds(datetime(2025, 1, 1, 1, tzinfo=plus_two), None)
    assert (start, end) == (utc(2024, 12, 1), utc(2025, 1, 1))
    assert start.tzinfo is UTC and end.tzinfo is UTC
    # And 2024-12-31 23:30 in UTC-1 is already January.
    minus_one = timezone(timedelta(hours=-1))
    assert period_bounds(datetime(2024, 12, 31, 23, 30, tzinfo=minus_one), None)[0] == utc(2025, 1, 1)


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        period_bounds(datetime(2025, 1, 1), None)
    with pytest.raises(ValueError, match="timezone-aware"):
        period_bounds(datetime(2025, 1, 1), 15)


# --------------------------------------------------------------------------- anchor days


def test_anchor_one_is_the_calendar_month() -> None:
    for month in range(1, 13):
        now = utc(2026, month, 10)
        assert period_bounds(now, 1) == period_bounds(now, None)


@pytest.mark.parametrize(
    ("now", "start", "end"),
    [
        (utc(2025, 3, 15), utc(2025, 3, 15), utc(2025, 4, 15)),
        (utc(2025, 3, 14, 23, 59, 59), utc(2025, 2, 15), utc(2025, 3, 15)),
        (utc(2025, 1, 10), utc(2024, 12, 15), utc(2025, 1, 15)),
        (utc(2024, 12, 20), utc(2024, 12, 15), utc(2025, 1, 15)),
    ],
)
def test_anchor_15(now: datetime, start: datetime, end: datetime) -> None:
    assert period_bounds(now, 15) == (start, end)


@pytest.mark.parametrize(
    ("now", "start", "end"),
    [
        # Non-leap year: February has no 29th, the period starts on the 28th.
        (utc(2027, 2, 28), utc(2027, 2, 28), utc(2027, 3, 29)),
        (utc(2027, 2, 27, 23), utc(2027, 1, 29), utc(2027, 2, 28)),
        (utc(2027, 3, 28), utc(2027, 2, 28), utc(2027, 3, 29)),
        # Leap year: February 29th exists.
        (utc(2028, 2, 28), utc(2028, 1, 29), utc(2028, 2, 29)),
        (utc(2028, 2, 29), utc(2028, 2, 29), utc(2028, 3, 29)),
    ],
)
def test_anchor_29(now: datetime, start: datetime, end: datetime) -> None:
    assert period_bounds(now, 29) == (start, end)


@pytest.mark.parametrize(
    ("now", "start", "end"),
    [
        (utc(2025, 1, 30), utc(2025, 1, 30), utc(2025, 2, 28)),
        (utc(2025, 2, 28), utc(2025, 2, 28), utc(2025, 3, 30)),
        (utc(2025, 3, 29), utc(2025, 2, 28), utc(2025, 3, 30)),
        (utc(2025, 4, 30), utc(2025, 4, 30), utc(2025, 5, 30)),
        (utc(2028, 2, 29), utc(2028, 2, 29), utc(2028, 3, 30)),
    ],
)
def test_anchor_30(now: datetime, start: datetime, end: datetime) -> None:
    assert period_bounds(now, 30) == (start, end)


@pytest.mark.parametrize(
    ("now", "start", "end"),
    [
        (utc(2025, 1, 31), utc(2025, 1, 31), utc(2025, 2, 28)),
        (utc(2025, 2, 27), utc(2025, 1, 31), utc(2025, 2, 28)),
        (utc(2025, 2, 28), utc(2025, 2, 28), utc(2025, 3, 31)),
        # The clamped February start does not drag March back to the 28th.
        (utc(2025, 3, 30), utc(2025, 2, 28), utc(2025, 3, 31)),
        (utc(2025, 3, 31), utc(2025, 3, 31), utc(2025, 4, 30)),
        (utc(2025, 4, 30), utc(2025, 4, 30), utc(2025, 5, 31)),
        (utc(2028, 2, 28), utc(2028, 1, 31), utc(2028, 2, 29)),
        (utc(2028, 2, 29), utc(2028, 2, 29), utc(2028, 3, 31)),
        (utc(2025, 12, 31), utc(2025, 12, 31), utc(2026, 1, 31)),
        (utc(2026, 1, 1), utc(2025, 12, 31), utc(2026, 1, 31)),
    ],
)
def test_anchor_31(now: datetime, start: datetime, end: datetime) -> None:
    assert period_bounds(now, 31) == (start, end)


@pytest.mark.parametrize("anchor", [1, 15, 28, 29, 30, 31])
def test_anchor_periods_tile_a_few_years_without_gaps(anchor: int) -> None:
    start, end = period_bounds(utc(2027, 1, 1), anchor)
    for _ in range(48):
        assert start < end
        assert period_bounds(end, anchor)[0] == end  # the end is the next start, exactly
        assert period_bounds(end - timedelta(microseconds=1), anchor) == (start, end)
        assert timedelta(days=28) <= end - start <= timedelta(days=31)
        start, end = period_bounds(end, anchor)


@pytest.mark.parametrize("anchor", [0, 32, -1, True, 1.0, "15"])
def test_bad_anchor_days(anchor: object) -> None:
    with pytest.raises(ValueError, match="anchor_day"):
        period_bounds(utc(2025, 1, 1), anchor)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- buckets and seconds


@pytest.mark.parametrize(
    ("ts", "size", "expected"),
    [
        (0, 300, 0),
        (299.999, 300, 0),
        (300, 300, 300),
        (1_704_067_499.5, 300, 1_704_067_200),
        (1_704_067_500, 300, 1_704_067_500),
        (1_704_067_501, 60, 1_704_067_500),
        (59.9, 1, 59),
        (-0.5, 300, -300),
    ],
)
def test_bucket_start(ts: float, size: int, expected: int) -> None:
    result = bucket_start(ts, size)
    assert result == expected
    assert type(result) is int


@pytest.mark.parametrize(
    ("ts", "size"), [(1.0, 0), (1.0, -300), (1.0, 1.5), (float("nan"), 300), (float("inf"), 300)]
)
def test_bucket_start_rejects_bad_input(ts: float, size: int) -> None:
    with pytest.raises(ValueError):
        bucket_start(ts, size)


def test_seconds_until_rounds_up_and_never_goes_negative() -> None:
    end = utc(2025, 2, 1)
    assert seconds_until(end, utc(2025, 1, 31)) == 86_400
    assert seconds_until(end, end - timedelta(milliseconds=1)) == 1
    assert seconds_until(end, end) == 0
    assert seconds_until(end, end + timedelta(seconds=5)) == 0
    assert type(seconds_until(end, utc(2025, 1, 31))) is int


def test_seconds_until_refuses_naive() -> None:
    with pytest.raises(ValueError):
        seconds_until(datetime(2025, 2, 1), utc(2025, 1, 1))
    with pytest.raises(ValueError):
        seconds_until(utc(2025, 2, 1), datetime(2025, 1, 1))


_DAY_DIVISORS = [d for d in range(1, 86_401) if 86_400 % d == 0]


@given(ts=st.integers(min_value=946_684_800, max_value=4_102_444_800), size=st.sampled_from(_DAY_DIVISORS),
       anchor=st.one_of(st.none(), st.integers(min_value=1, max_value=31)))
@settings(max_examples=500, deadline=None)
def test_a_bucket_never_crosses_a_period_boundary(ts: int, size: int, anchor: int | None) -> None:
    """With a bucket length that divides a day (the config refuses others), a bucket's first and last
    second lie in the same period, calendar month or anchor day: Stripe gets each unit in its own period."""
    start = bucket_start(ts, size)
    first = period_bounds(datetime.fromtimestamp(start, UTC), anchor)
    last = period_bounds(datetime.fromtimestamp(start + size - 1, UTC), anchor)
    assert first == last
