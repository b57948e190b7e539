"""Input of the admin API: JSON bodies, path and query parameters, checked field by field.

Every problem is a 400 `invalid-request` whose `errors` name the field; several problems of one
body are reported together.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection, Mapping
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from gateway.errors import InvalidRequest
from metering.errors import kind_of
from metering.keys import TENANT_ID
from quota.plans import ENFORCE_VALUES, RATE_METER, Plan

_TENANT_FIELDS = frozenset({"plan", "status", "stripe_customer_id", "billing_anchor_day"})
_OVERRIDE_FIELDS = frozenset({"limit", "expires_at", "reason", "enforce"})
_RATE_FIELDS = frozenset({"per_second", "burst", "expires_at", "reason", "enforce"})
_STATUSES = ("active", "suspended")
_RFC3339 = re.compile(r"(\d{4}-\d{2}-\d{2})[Tt ](\d{2}:\d{2}:\d{2})(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")
_MAX_LIMIT = 2**63 - 1  # BIGINT
_MAX_REASON = 1000
_MAX_STRIPE_ID = 255
_TENANT_MESSAGE = "expected 1-64 characters of A-Z a-z 0-9 . _ : -"
_MAX_NAME_SHOWN = 64  # an unknown name is quoted in the answer, at most this much of it


class Errors:
    """Input problems collected field by field, raised together as one InvalidRequest."""

    def __init__(self) -> None:
        self.items: list[dict[str, str]] = []

    def add(self, field: str, message: str) -> None:
        self.items.append({"field": field, "message": message})

    def raise_if_any(self, detail: str) -> None:
        if self.items:
            fields = ", ".join(item["field"] for item in self.items)
            raise InvalidRequest(f"{detail}: {fields}", errors=self.items)


def invalid(field: str, message: str) -> InvalidRequest:
    return InvalidRequest(f"invalid {field}: {message}", errors=[{"field": field, "message": message}])


def quoted(name: str) -> str:
    """A name from the request as an answer shows it: quoted, escaped (repr) and cut at 64 characters."""
    return repr(name if len(name) <= _MAX_NAME_SHOWN else name[:_MAX_NAME_SHOWN] + "…")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A JSON number a float can hold: an integer of 400 digits is not one (math.isfinite raises on it)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


async def read_object(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 naming `body`."""
    raw = await request.read()
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise invalid("body", "not valid JSON") from None
    if not isinstance(body, dict):
        raise invalid("body", f"expected a JSON object, got {kind_of(body)}")
    return body


def _unknown_fields(body: Mapping[str, Any], allowed: frozenset[str], errors: Errors) -> None:
    for name in sorted(set(body) - allowed):
        errors.add(name[:64], f"unknown field (allowed: {', '.join(sorted(allowed))})")


def tenant_param(request: web.Request) -> str:
    tenant = request.match_info["tenant"]
    if not TENANT_ID.fullmatch(tenant):
        raise invalid("tenant", _TENANT_MESSAGE)
    return tenant


def meter_param(request: web.Request, meters: Collection[str]) -> str:
    """The `{meter}` of an override path: a configured meter, or `rate`."""
    meter = request.match_info["meter"]
    if meter != RATE_METER and meter not in meters:
        known = ", ".join(sorted({*meters, RATE_METER}))
        raise InvalidRequest(f"unknown meter {quoted(meter)}", errors=[
            {"field": "meter", "message": f"unknown meter {quoted(meter)} (known: {known})"}])
    return meter


def limit_param(request: web.Request, errors: Errors, *, default: int, maximum: int) -> int:
    text = request.query.get("limit")
    if text is None:
        return default
    if not re.fullmatch(r"[0-9]{1,6}", text) or not 1 <= int(text) <= maximum:
        errors.add("limit", f"expected an integer from 1 to {maximum}")
        return default
    return int(text)


def tenant_body(body: Mapping[str, Any], plans: Mapping[str, Plan]) -> dict[str, Any]:
    """The changes of `PUT /admin/tenants/{tenant}`, validated."""
    errors = Errors()
    _unknown_fields(body, _TENANT_FIELDS, errors)
    if "plan" in body:
        plan = body["plan"]
        if not isinstance(plan, str):
            errors.add("plan", f"expected a plan name, got {kind_of(plan)}")
        elif plan not in plans:
            errors.add("plan", f"unknown plan {quoted(plan)} (known: {', '.join(sorted(plans))})")
    if "status" in body and body["status"] not in _STATUSES:
        errors.add("status", "expected 'active' or 'suspended'")
    if "stripe_customer_id" in body:
        customer = body["stripe_customer_id"]
        if customer is not None and (not isinstance(customer, str) or not customer
                                     or len(customer) > _MAX_STRIPE_ID or not customer.isprintable()):
            errors.add("stripe_customer_id", "expected a Stripe customer id (a string) or null")
    if "billing_anchor_day" in body:
        day = body["billing_anchor_day"]
        if day is not None and (not _is_int(day) or not 1 <= day <= 28):
            errors.add("billing_anchor_day", "expected an integer from 1 to 28, or null")
    errors.raise_if_any("invalid tenant")
    return {name: body[name] for name in _TENANT_FIELDS if name in body}


def parse_rfc3339(text: str) -> datetime | None:
    """An RFC 3339 date-time with its offset as an aware datetime, or None."""
    match = _RFC3339.fullmatch(text)
    if match is None:
        return None
    date, time, fraction, offset = match.groups()
    fraction = (fraction or "")[:7]  # Python keeps microseconds
    offset = "+00:00" if offset in ("Z", "z") else offset
    try:
        return datetime.fromisoformat(f"{date}T{time}{fraction}{offset}")
    except ValueError:
        return None


def overrides_body(body: Mapping[str, Any], meter: str, now: datetime) -> dict[str, Any]:
    """The values of `PUT /admin/tenants/{tenant}/overrides/{meter}`, validated."""
    errors = Errors()
    values: dict[str, Any] = {}
    if meter == RATE_METER:
        _unknown_fields(body, _RATE_FIELDS, errors)
        per_second = body.get("per_second")
        if "per_second" not in body:
            errors.add("per_second", "required (null = no rate limit)")
        elif per_second is not None and (not _is_number(per_second) or per_second <= 0):
            errors.add("per_second", f"expected a number > 0 or null, got {kind_of(per_second)}")
        values["per_second"] = float(per_second) if _is_number(per_second) else None
        burst = body.get("burst")
        if burst is not None and (not _is_int(burst) or not 1 <= burst <= 2**31 - 1):
            errors.add("burst", "expected an integer >= 1 or null")
        values["burst"] = burst
    else:
        _unknown_fields(body, _OVERRIDE_FIELDS, errors)
        limit = body.get("limit")
        if "limit" not in body:
            errors.add("limit", "required (null = unlimited)")
        elif limit is not None and not _is_int(limit):
            errors.add("limit", f"expected a whole number >= 0 or null, got {kind_of(limit)}")
        elif limit is not None and not 0 <= limit <= _MAX_LIMIT:
            errors.add("limit", "expected a whole number >= 0 or null")
        values["limit"] = limit
    expires = body.get("expires_at")
    values["expires_at"] = None
    if expires is not None:
        parsed = parse_rfc3339(expires) if isinstance(expires, str) else None
        if parsed is None:
            errors.add("expires_at", "expected an RFC 3339 date-time with offset, e.g. 2026-12-31T00:00:00Z")
        elif parsed <= now:
            errors.add("expires_at", "must be in the future")
        else:
            values["expires_at"] = parsed.astimezone(UTC)
    reason = body.get("reason")
    if reason is not None and (not isinstance(reason, str) or len(reason) > _MAX_REASON):
        errors.add("reason", f"expected a string of at most {_MAX_REASON} characters, or null")
    values["reason"] = reason
    enforce = body.get("enforce")  # null or absent: "on"
    if enforce is not None and enforce not in ENFORCE_VALUES:
        errors.add("enforce", "expected 'on' or 'shadow' (shadow: the limit only reports what it would refuse)")
    values["enforce"] = enforce if enforce in ENFORCE_VALUES else "on"
    errors.raise_if_any("invalid override")
    return values
