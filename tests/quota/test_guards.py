"""The guard matcher: which gauge guards a request runs into, and its bounded (method, path) cache."""

from __future__ import annotations

import pytest

from metering import match_cache
from quota.guards import NONE, GuardMatcher

CREATE_CHAIN = ("POST", "/api/chains")


def test_hits_on_every_reading_of_the_path_and_ignores_the_query() -> None:
    matcher = GuardMatcher([CREATE_CHAIN, CREATE_CHAIN])
    assert matcher.hits("POST", "/api/chains") == {CREATE_CHAIN}
    assert matcher.hits("post", "/API/chains/?x=1") == {CREATE_CHAIN}
    assert matcher.hits("GET", "/api/chains") is NONE
    assert GuardMatcher([]).hits("POST", "/api/chains") is NONE


def test_hits_cache_is_bounded_and_keeps_no_long_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(match_cache, "MATCH_CACHE_SIZE", 4)
    matcher = GuardMatcher([CREATE_CHAIN])
    for i in range(20):
        assert matcher.hits("GET", f"/api/chains/{i}") is NONE
        assert len(matcher._cache) <= 4  # the cache itself: its bound is the point
    long_path = "/api/chains" + "/x" * match_cache.MATCH_CACHE_MAX_PATH
    matcher.hits("GET", long_path)
    assert matcher._cache.get(("GET", long_path)) is None
