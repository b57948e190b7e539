"""The console's form input: read bounded, then turned into the admin API's request bodies.

The bodies are validated by the admin API's own code (gateway/admin/input.py) when the operation runs, so
a form and a JSON call get the same checks and the same field names in their errors. A value that does not
convert (a limit of "ten") is passed on as the text, so the check names the field instead of this module
guessing a message.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web

from gateway.admin.input import invalid
from gateway.errors import PayloadTooLarge
from quota.plans import RATE_METER

MAX_FORM_BYTES = 16 * 1024  # the longest form (an override with a 1000-character reason) is far below
MAX_FIELDS = 32
_LOCAL_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d{1,6})?)?")
_INTEGER = re.compile(r"[0-9]{1,19}")
_DECIMAL = re.compile(r"[0-9]{1,12}(\.[0-9]{1,6})?")


async def read_form(request: web.Request) -> dict[str, str]:
    """The urlencoded form of a POST; 413 beyond MAX_FORM_BYTES, 400 for anything but UTF-8 form fields."""
    if request.content_length is not None and request.content_length > MAX_FORM_BYTES:
        raise PayloadTooLarge("the form is too large")
    raw = await request.content.read(MAX_FORM_BYTES + 1)
    while len(raw) <= MAX_FORM_BYTES and not request.content.at_eof():
        chunk = await request.content.read(MAX_FORM_BYTES + 1 - len(raw))
        if not chunk:
            break
        raw += chunk
    if len(raw) > MAX_FORM_BYTES:
        raise PayloadTooLarge("the form is too large")
    if request.content_type != "application/x-www-form-urlencoded":
        raise invalid("body", "expected a form (application/x-www-form-urlencoded)")
    try:
        pairs = parse_qsl(raw.decode("utf-8"), keep_blank_values=True, max_num_fields=MAX_FIELDS)
    except (UnicodeDecodeError, ValueError):
        raise invalid("body", "not a UTF-8 form of at most 32 fields") from None
    form: dict[str, str] = {}
    for name, value in pairs:
        form.setdefault(name, value)  # the first value of a repeated field
    return form


def _integer(text: str) -> int | str:
    text = text.strip()
    return int(text) if _INTEGER.fullmatch(text) else text


def _number(text: str) -> float | int | str:
    text = text.strip()
    if _INTEGER.fullmatch(text):
        return int(text)
    return float(text) if _DECIMAL.fullmatch(text) else text


def utc_instant(text: str) -> str:
    """A `datetime-local` value (the form says it is UTC) as RFC 3339 with `Z`; anything else as given."""
    text = text.strip()
    if _LOCAL_TIME.fullmatch(text):
        return text + (":00Z" if text.count(":") == 1 else "Z")
    return text


def override_body(form: dict[str, str], meter: str) -> dict[str, Any]:
    """The body of `PUT /admin/tenants/{tenant}/overrides/{meter}` from the override editor's fields."""
    body: dict[str, Any] = {}
    if meter == RATE_METER:
        if form.get("unlimited") == "on":
            body["per_second"] = None
        elif form.get("per_second", "").strip():
            body["per_second"] = _number(form["per_second"])
        if form.get("burst", "").strip():
            body["burst"] = _integer(form["burst"])
    elif form.get("unlimited") == "on":
        body["limit"] = None
    elif form.get("limit", "").strip():
        body["limit"] = _integer(form["limit"])
    if form.get("enforce", "").strip():
        body["enforce"] = form["enforce"].strip()
    if form.get("expires_at", "").strip():
        body["expires_at"] = utc_instant(form["expires_at"])
    if form.get("reason", "").strip():
        body["reason"] = form["reason"].strip()
    return body


def tenant_body(form: dict[str, str]) -> dict[str, Any]:
    """The body of `PUT /admin/tenants/{tenant}` from the plan and status form (fields left empty are kept)."""
    return {name: form[name] for name in ("plan", "status") if form.get(name, "")}
