"""metering.clock: the one clock type and its time helpers."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from metering.clock import rfc3339, utc, utcnow


def test_rfc3339() -> None:
    assert rfc3339(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)) == "2026-01-02T03:04:05Z"
    assert rfc3339(datetime(2026, 1, 2, 3, 4, 5, 250000, tzinfo=UTC)) == "2026-01-02T03:04:05.250000Z"
    # Alerts hash this text: whole seconds, from a datetime or epoch seconds alike.
    assert rfc3339(datetime(2026, 1, 2, 3, 4, 5, 250000, tzinfo=UTC), whole_seconds=True) == "2026-01-02T03:04:05Z"
    assert rfc3339(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC).timestamp() + 0.9, whole_seconds=True) == (
        "2026-01-02T03:04:05Z")
    assert rfc3339(None) is None
    with pytest.raises(ValueError):
        rfc3339(datetime(2026, 1, 2))


def test_utc_and_utcnow_follow_the_clock() -> None:
    assert utc(0) == datetime(1970, 1, 1, tzinfo=UTC)
    assert utcnow(lambda: 86_400.5) == datetime(1970, 1, 2, 0, 0, 0, 500000, tzinfo=UTC)
