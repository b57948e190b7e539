"""Which of the plan catalog's gauge guards a request runs into (pure, cached).

A guard is `(method or None, path glob)` on a gauge quota: requests it matches are refused while the
gauge is at its limit (PRODUCT.md §2). Paths are matched as meters are (`metering.paths`): on every
reading of the raw path, any of them, case-insensitively. What a request runs into depends on its
method and path only, so the answer is cached per (method, path), bounded as the meter matcher's is
(`metering.match_cache`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from metering.match_cache import BoundedMatchCache
from metering.meters import compile_glob
from metering.paths import readings
from quota.plans import Guard

NONE: frozenset[Guard] = frozenset()


class GuardMatcher:
    """The guards of `guards` (all plans' together) that a request matches."""

    def __init__(self, guards: Iterable[Guard]) -> None:
        self._guards: tuple[tuple[Guard, re.Pattern[str]], ...] = tuple(
            (guard, compile_glob(guard[1], ignore_case=True)) for guard in sorted(set(guards), key=repr))
        self._cache: BoundedMatchCache[frozenset[Guard]] = BoundedMatchCache()

    def hits(self, method: str, path: str) -> frozenset[Guard]:
        """The guards matching; `path` is the raw path (a query is ignored). UnsafePath for a path that
        cannot be read safely (the proxy refuses those first)."""
        if not self._guards:
            return NONE
        key = (method.upper(), path.partition("?")[0])
        found = self._cache.get(key)
        if found is None:
            method, path = key
            spelled = readings(path)
            found = frozenset(
                guard for guard, pattern in self._guards
                if (guard[0] is None or guard[0] == method)
                and any(pattern.fullmatch(reading) is not None for reading in spelled)) or NONE
            self._cache.put(key, found)
        return found
