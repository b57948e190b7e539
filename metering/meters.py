"""What is counted: meter definitions, the request matcher, and the upstream's usage report (pure)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

from metering.errors import ConfigError, expect_mapping, kind_of
from metering.match_cache import BoundedMatchCache
from metering.paths import canonical_glob, readings

Source = Literal["request", "request_bytes", "response_bytes", "reported"]
Kind = Literal["counter", "gauge"]

SOURCES: tuple[Source, ...] = ("request", "request_bytes", "response_bytes", "reported")
BYTE_SOURCES: frozenset[str] = frozenset({"request_bytes", "response_bytes"})
HTTP_METHODS: frozenset[str] = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)
METER_NAME = re.compile(r"[a-z0-9_]{1,64}")
# "rate" is the pseudo-meter of rate overrides (PUT /admin/tenants/{t}/overrides/rate).
RESERVED_NAMES: frozenset[str] = frozenset({"rate"})
# Stripe's meter event_name: kept to characters that need no escaping anywhere.
STRIPE_EVENT = re.compile(r"[A-Za-z0-9_.:-]{1,100}")


@dataclass(frozen=True, slots=True)
class Meter:
    name: str  # [a-z0-9_]{1,64}
    source: Source  # "request" when `match` is given and no source
    kind: Kind  # "gauge" only for source "reported"
    method: str | None  # match.method (upper-case) or None = any
    path: str | None  # match.path glob: "*" one segment, "**" any depth (incl. none)
    stripe_event: str | None
    bill_server_errors: bool = False  # count/bill responses >= 500 (default: no, units given back)


DEFAULT_METERS: tuple[Meter, ...] = (
    Meter("api_calls", "request", "counter", None, "/api/**", "api_calls"),
    Meter(
        "chain_deployments", "request", "counter", "POST", "/api/chains/*/deployments", "chain_deployments"
    ),
    Meter("bandwidth_bytes", "response_bytes", "counter", None, None, "bandwidth_bytes"),
    Meter("chains", "reported", "gauge", None, None, None),
    Meter("storage_gb", "reported", "gauge", None, None, "storage_gb"),
)


def glob_to_regex(pattern: str, *, ignore_case: bool = False) -> re.Pattern[str]:
    """Compile a path glob, anchored: `*` is one segment (or part of one), `**` any number of segments.

    `/status/**` matches `/status`, `/status/` and `/status/a/b`; everything else is literal, so a
    percent-encoded `%2F` is just three characters inside a segment. Raises ValueError on a bad glob.
    Requests are matched with `compile_glob`, on the readings of their path (`metering.paths`).
    """
    if not pattern.startswith("/"):
        raise ValueError("must start with '/'")
    parts: list[str] = []
    for segment in pattern[1:].split("/"):
        if segment == "**":
            # Includes the leading slash so that zero segments also match ("/a/**" matches "/a").
            parts.append("(?:/.*)?")
        elif "**" in segment:
            raise ValueError(f"'**' must be a whole path segment, got {segment!r}")
        elif segment == "*":
            parts.append("/[^/]+")
        else:
            parts.append("/" + "[^/]*".join(re.escape(piece) for piece in segment.split("*")))
    # Anchored in the pattern itself, so .match() and .search() callers cannot get a prefix match.
    return re.compile(r"\A" + "".join(parts) + r"\Z", re.IGNORECASE if ignore_case else 0)


def compile_glob(pattern: str, *, ignore_case: bool = False) -> re.Pattern[str]:
    """A path glob compiled to match the readings of a path (`metering.paths.readings`)."""
    return glob_to_regex(canonical_glob(pattern), ignore_case=ignore_case)


def check_path(value: Any, key: str) -> str:
    """A match/guard path glob, validated; shared with plan guards."""
    if not isinstance(value, str):
        raise ConfigError(key, f"expected a path glob string, got {kind_of(value)}")
    if any(c.isspace() or ord(c) < 0x20 or c in "?#" for c in value):
        raise ConfigError(key, "must not contain whitespace, control characters, '?' or '#'")
    try:
        compile_glob(value)
    except ValueError as exc:
        raise ConfigError(key, str(exc)) from None
    return value


def check_method(value: Any, key: str) -> str | None:
    """A match/guard method: None (any) or a known HTTP method, returned upper-case."""
    if value is None:
        return None
    if not isinstance(value, str) or value.upper() not in HTTP_METHODS:
        raise ConfigError(
            key, f"must be one of {', '.join(sorted(HTTP_METHODS))}, got {kind_of(value)}"
        )
    return value.upper()


def _parse_meter(name: Any, raw: Any) -> Meter:
    key = f"meters.{name}"
    if not isinstance(name, str) or not METER_NAME.fullmatch(name):
        raise ConfigError(key, "a meter name is 1-64 characters of a-z, 0-9 and _")
    if name in RESERVED_NAMES:
        raise ConfigError(key, f"{name!r} is reserved (rate overrides use it)")
    spec = expect_mapping(raw, key, {"match", "source", "kind", "stripe_event", "bill_server_errors"})

    method = path = None
    if "match" in spec:
        match = expect_mapping(spec["match"], f"{key}.match", {"method", "path"})
        method = check_method(match.get("method"), f"{key}.match.method")
        if match.get("path") is not None:
            path = check_path(match["path"], f"{key}.match.path")

    source = spec.get("source")
    if source is None and "match" in spec:
        source = "request"
    if source is None:
        raise ConfigError(key, "needs `match` (a request counter) or `source`")
    if source not in SOURCES:
        raise ConfigError(
            f"{key}.source", f"must be one of {', '.join(SOURCES)}, got {kind_of(source)}"
        )
    if "match" in spec and source != "request":
        # Byte and reported meters are recorded after the response for every metered request;
        # silently ignoring a match here would count more than the operator asked for.
        raise ConfigError(f"{key}.match", f"only applies to source request, not {source}")

    kind = spec.get("kind")
    if kind is None:
        kind = "gauge" if source == "reported" else "counter"
    if kind not in ("counter", "gauge"):
        raise ConfigError(f"{key}.kind", f"must be counter or gauge, got {kind_of(kind)}")
    if kind == "gauge" and source != "reported":
        raise ConfigError(f"{key}.kind", f"gauge needs source reported, not {source}")
    if kind == "counter" and source == "reported":
        raise ConfigError(
            f"{key}.kind", "a reported meter is a gauge (the last value the upstream sent)"
        )

    stripe_event = spec.get("stripe_event")
    if stripe_event is not None and (
        not isinstance(stripe_event, str) or not STRIPE_EVENT.fullmatch(stripe_event)
    ):
        raise ConfigError(
            f"{key}.stripe_event",
            f"expected 1-100 characters of A-Z, a-z, 0-9, _ . : -, got {kind_of(stripe_event)}",
        )

    bill_server_errors = spec.get("bill_server_errors", False)
    if not isinstance(bill_server_errors, bool):
        raise ConfigError(
            f"{key}.bill_server_errors", f"expected true or false, got {kind_of(bill_server_errors)}"
        )
    if bill_server_errors and kind == "gauge":
        raise ConfigError(
            f"{key}.bill_server_errors", "only applies to counters; a gauge is never given back"
        )

    return Meter(name, cast(Source, source), cast(Kind, kind), method, path, stripe_event, bill_server_errors)


def parse_meters(raw: Mapping[Any, Any] | None) -> tuple[Meter, ...]:  # any key: _parse_meter names a bad one
    """The `meters:` config section; None (no `meters:` key) gives DEFAULT_METERS."""
    if raw is None:
        return DEFAULT_METERS
    if not isinstance(raw, Mapping):
        raise ConfigError(
            "meters", f"expected a mapping of meter name to definition, got {kind_of(raw)}"
        )
    meters = tuple(_parse_meter(name, spec) for name, spec in raw.items())
    # Two meters feeding one Stripe meter would be summed there: almost surely a copy-paste slip.
    billed: dict[str, str] = {}
    for meter in meters:
        if meter.stripe_event is None:
            continue
        if meter.stripe_event in billed:
            raise ConfigError(
                f"meters.{meter.name}.stripe_event",
                f"{meter.stripe_event!r} is already the stripe_event of meter {billed[meter.stripe_event]!r}",
            )
        billed[meter.stripe_event] = meter.name
    return meters


class MeterMatcher:
    """Which meters a request touches; patterns compiled once, answers cached per (method, path)
    (`metering.match_cache`, bounded).

    A meter's path glob is matched on the readings of the request's path (`metering.paths`): it applies
    when any reading matches, case-insensitively (an upstream that routes `/API/...` like `/api/...`
    must not serve it unmetered; one that does not answers 404, and a 404 is counted like any call).
    """

    __slots__ = ("_cache", "_requests", "by_name", "byte_meters", "gauges", "meters")

    def __init__(self, meters: Sequence[Meter]) -> None:
        self.meters: tuple[Meter, ...] = tuple(meters)
        self.by_name: dict[str, Meter] = {m.name: m for m in self.meters}
        self.byte_meters: tuple[Meter, ...] = tuple(m for m in self.meters if m.source in BYTE_SOURCES)
        self.gauges: dict[str, Meter] = {m.name: m for m in self.meters if m.kind == "gauge"}
        self._requests: tuple[tuple[Meter, re.Pattern[str] | None], ...] = tuple(
            (m, compile_glob(m.path, ignore_case=True) if m.path is not None else None)
            for m in self.meters
            if m.source == "request"
        )
        self._cache: BoundedMatchCache[tuple[Meter, ...]] = BoundedMatchCache()

    def request_meters(self, method: str, path: str) -> tuple[Meter, ...]:
        """The request counters matching; `path` is the raw path (a query is ignored).

        Raises `metering.paths.UnsafePath` for a path that cannot be read safely (the proxy refuses
        those before anything is matched).
        """
        # Methods are case-sensitive on the wire, but an upstream that accepts "post" must not turn
        # it into an uncounted deployment.
        key = (method.upper(), path.partition("?")[0])
        found = self._cache.get(key)
        if found is None:
            method, path = key
            spelled = readings(path)
            found = tuple(
                meter
                for meter, pattern in self._requests
                if (meter.method is None or meter.method == method)
                and (pattern is None or any(pattern.fullmatch(reading) is not None for reading in spelled))
            )
            self._cache.put(key, found)
        return found

    def cache_size(self) -> int:
        return len(self._cache)


# name=number, optional spaces around '='; ASCII digits only (float() would take "nan", "1_0", "٣").
_NUMBER = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def parse_usage_report(value: str, gauges: Mapping[str, Meter]) -> tuple[dict[str, float], int]:
    """`"chains=3, storage_gb=12.5"` -> `({"chains": 3.0, "storage_gb": 12.5}, bad_count)`.

    Strict: each item is a known gauge name, '=', a finite number >= 0; anything else is skipped and
    counted. A repeated name keeps the last value (joined repeated headers: the later one is newer).
    """
    values: dict[str, float] = {}
    if not value.strip():
        return values, 0
    bad = 0
    for item in value.split(","):
        name, sep, number = item.partition("=")
        name, number = name.strip(), number.strip()
        if not sep or name not in gauges or not _NUMBER.fullmatch(number):
            bad += 1
            continue
        parsed = float(number)
        if not math.isfinite(parsed):  # "1e999"
            bad += 1
            continue
        values[name] = parsed
    return values, bad
