"""Usage history over HTTP (PRODUCT.md §6a): `GET /admin/tenants/{tenant}/usage` on the admin listener, and the
tenant's own `GET /_gateway/usage/history` on the proxy listener (gateway/proxy/own_endpoints.py), both answered
by `history_response` from `metering.usage_history`.

Query: `meter` (a billed meter; repeated or comma-separated; default every billed meter), `step` (`hour` or
`day`, UTC; default `day`), `from` and `to` (RFC 3339 date-times, or a plain date for its midnight UTC; `from`
is rounded down and `to` up to the step; defaults: the current billing period so far, at most 400 steps).
A `+` of an offset left unencoded in the query arrives as a space; it is read as the `+` it was.

Answer: JSON `{tenant, step, from, to, series: {<meter>: [{start, value}]}}` with every step of the range
(numbers written exactly; a gauge's step without a report is null), or with `Accept: text/csv` the rows
`start,meter,value` by start and meter (RFC 4180, an empty value where the JSON has null).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
from collections.abc import Awaitable, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import TypeVar

from aiohttp import web
from multidict import MultiMapping

from gateway.admin.input import Errors, parse_rfc3339, quoted, tenant_param
from gateway.admin.tenants import UsageReader, seen
from gateway.errors import DatabaseUnavailable, InvalidRequest, LimiterUnavailable, NotFound, Overloaded
from metering.clock import Clock, rfc3339
from metering.usage_history import STEPS, History, HistoryUnavailable, RangeError, UsageHistory, resolve_range
from quota.tenants import TenantDirectory

log = logging.getLogger("cosmos_gateway.admin")
DEFAULT_STEP = "day"
CSV = "text/csv"
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")
_SPACED_OFFSET = re.compile(r"(.*\d) (\d{2}:\d{2})")  # "…T00:00:00 01:00": a '+' decoded as a space
_MEDIA_RANGE = re.compile(r"\s*([^;,\s]+)\s*((?:;[^,]*)?)")
_RETRY = {"Retry-After": "1"}
T = TypeVar("T")


class UsageHistoryAdmin:
    """`GET /tenants/{tenant}/usage` of the admin API: 404 for a tenant never seen, as the tenant view."""

    def __init__(self, history: UsageHistory, *, directory: TenantDirectory, usage_reader: UsageReader,
                 clock: Clock) -> None:
        self._history = history
        self._directory = directory
        self._usage = usage_reader
        self._clock = clock

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/tenants/{tenant}/usage", self.get, allow_head=False)]

    async def get(self, request: web.Request) -> web.Response:
        tenant = tenant_param(request)
        record = self._directory.get(tenant) or await self._directory.reload(tenant)
        if record is None and not await seen(self._usage.tenant_seen(tenant)) \
                and not await _unavailable_as_503(self._history.known(tenant)):
            raise NotFound(f"tenant {tenant!r} has no record, no usage and has sent no traffic", tenant=tenant)
        anchor = record.billing_anchor_day if record is not None else None
        return await history_response(self._history, request, tenant, anchor, self._clock)


async def history_response(history: UsageHistory, request: web.BaseRequest, tenant: str, anchor_day: int | None,
                           clock: Clock) -> web.Response:
    """The history of `tenant` as the request's query and Accept header ask; 400 naming the field, 503 when a
    store is down or the process has too many history reads running."""
    meters, step, start, end = history_query(request.query, history.meters, clock(), anchor_day)
    result = await _unavailable_as_503(history.read(tenant, meters, step, start, end))
    if wants_csv(request.headers.get("Accept", "")):
        return web.Response(body=history_csv(result), content_type=CSV, charset="utf-8")
    return web.Response(body=history_json(result), content_type="application/json")


def history_query(query: MultiMapping[str], billed: Sequence[str], now: float,
                  anchor_day: int | None) -> tuple[list[str], str, int, int]:
    """(meters, step, start, end) from the query string; InvalidRequest naming every bad parameter."""
    errors = Errors()
    values = {name: _single(query, name, errors) for name in ("step", "from", "to")}
    step = values["step"] or DEFAULT_STEP
    if step not in STEPS:
        errors.add("step", f"expected one of {', '.join(STEPS)}")
    meters = _meters(query.getall("meter", []), billed, errors)
    instants: dict[str, datetime | None] = {}
    for name in ("from", "to"):
        text = values[name]
        instants[name] = None if text is None else _instant(text)
        if text is not None and instants[name] is None:
            errors.add(name, "expected an RFC 3339 date-time with offset (2026-12-01T00:00:00Z) or a date (2026-12-01)")
    errors.raise_if_any("invalid query")
    try:
        start, end = resolve_range(step, instants["from"], instants["to"], now=now, anchor_day=anchor_day)
    except RangeError as error:
        raise InvalidRequest(f"invalid range: {error.message}",
                             errors=[{"field": name, "message": error.message} for name in error.fields]) from None
    return meters, step, start, end


def _single(query: MultiMapping[str], name: str, errors: Errors) -> str | None:
    """A parameter given at most once; empty counts as not given (an HTML form's empty field)."""
    given = [value for value in query.getall(name, []) if value != ""]
    if len(given) > 1:
        errors.add(name, "given more than once")
    return given[0] if given else None


def _meters(given: list[str], billed: Sequence[str], errors: Errors) -> list[str]:
    names = [name.strip() for value in given for name in value.split(",") if name.strip()]
    if not names:
        return list(billed)
    known = set(billed)
    chosen: list[str] = []
    for name in names:
        if name not in known:
            errors.add("meter", f"unknown meter {quoted(name)}: only billed meters have a history "
                                f"({', '.join(billed) or 'none is configured'})")
        elif name not in chosen:
            chosen.append(name)
    return chosen


def _instant(text: str) -> datetime | None:
    if _DATE.fullmatch(text):
        try:
            return datetime.fromisoformat(text).replace(tzinfo=UTC)
        except ValueError:
            return None
    parsed = parse_rfc3339(text)
    if parsed is None and (spaced := _SPACED_OFFSET.fullmatch(text)) is not None:
        parsed = parse_rfc3339(f"{spaced.group(1)}+{spaced.group(2)}")
    return parsed


def wants_csv(accept: str) -> bool:
    """Whether the Accept header prefers text/csv to JSON (q-values weighed; no header or */*: JSON)."""
    best_csv = best_json = 0.0
    for match in _MEDIA_RANGE.finditer(accept[:2000]):
        media, params = match.group(1).lower(), match.group(2)
        q = 1.0
        for param in params.split(";"):
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = min(max(float(value.strip()), 0.0), 1.0)
                except ValueError:
                    q = 0.0
        if media == CSV:
            best_csv = max(best_csv, q)
        elif media in ("application/json", "application/*", "*/*"):
            best_json = max(best_json, q)
    return best_csv > 0 and best_csv > best_json


async def _unavailable_as_503(read: Awaitable[T]) -> T:
    """`read`, with a store that is down (or busy) as the 503 that says which."""
    try:
        return await read
    except HistoryUnavailable as exc:
        log.warning("usage history: %s (%r)", exc, exc.__cause__)
        if exc.part == "redis":
            raise LimiterUnavailable(f"{exc}; try again shortly", headers=dict(_RETRY)) from None
        if exc.part == "database":
            raise DatabaseUnavailable(f"{exc}; try again shortly", headers=dict(_RETRY)) from None
        raise Overloaded(f"{exc}; try again shortly") from None


def plain(value: Decimal) -> str:
    """A decimal as plain text without exponent or trailing zeros: `12.5`, `1000`, `-3`, `0`."""
    text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def history_json(history: History) -> bytes:
    """The JSON answer, numbers written exactly (json.dumps would go through a float)."""
    series = ",".join(
        f"{json.dumps(meter)}:[" + ",".join(
            f'{{"start":"{rfc3339(at)}","value":{"null" if value is None else plain(value)}}}'
            for at, value in points) + "]"
        for meter, points in history.series.items())
    head = json.dumps({"tenant": history.tenant, "step": history.step, "from": rfc3339(history.start),
                       "to": rfc3339(history.end)}, separators=(",", ":"))
    return f'{head[:-1]},"series":{{{series}}}}}'.encode()


def history_csv(history: History) -> bytes:
    """`start,meter,value` rows, by start then meter (RFC 4180 line ends)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(("start", "meter", "value"))
    rows = sorted((at, meter, value) for meter, points in history.series.items() for at, value in points)
    writer.writerows((rfc3339(at), meter, "" if value is None else plain(value)) for at, meter, value in rows)
    return out.getvalue().encode()

