"""A local emulator of the Stripe Billing Meters API, for tests (not product code).

It answers the real ``stripe`` Python library (v16) in the shapes it parses:

- ``POST /v1/billing/meter_events`` (form encoded), with Stripe's documented rules: a secret key, a configured
  meter's ``event_name``, a known customer, a numeric string ``payload[value]``, an ``identifier`` unique for
  ``identifier_ttl`` seconds (24 h by default), a ``timestamp`` at most 35 days old and 5 minutes ahead, and
  ``Idempotency-Key`` replay.
- ``POST /v2/billing/meter_event_session`` and ``POST /v2/billing/meter_event_stream`` (JSON, up to 100 events,
  authenticated by the session's token; sessions last 15 minutes).
- ``GET /v1/billing/meters`` (paged), ``GET /v1/billing/meters/{id}`` and
  ``GET /v1/billing/meters/{id}/event_summaries`` (minute-aligned window, no ``value_grouping_window``).
- ``POST /v1/billing_portal/sessions`` (the customer portal), with the rules of Stripe's API reference: a secret
  key; one of ``customer`` (an existing customer) or ``customer_account``; ``configuration`` an existing portal
  configuration, else the account's default one (which a test-mode account has only once its portal settings
  were saved: ``StripeEmulator(portal_configured=False)`` is an account that never did); ``return_url`` a valid
  URL, required unless the configuration has a ``default_return_url``; ``locale`` one of Stripe's; unknown
  parameters refused. The session's ``url`` is ``GET /p/session/<secret>`` here: a small page standing in for
  Stripe's portal, with a link back to the ``return_url``.

Point a client at it with::

    stripe.StripeClient(
        "sk_test_x",
        base_addresses={"api": emulator.url, "meter_events": emulator.url},
        max_network_retries=0,
    )

Differences from real Stripe, on purpose: the customer and value checks are synchronous (real Stripe reports
some of them later through ``v1.billing.meter.error_report_triggered``); summaries are up to date at once
(real Stripe lags); the v2 stream validates synchronously and atomically by default (``stream_validation``);
portal sessions refuse ``flow_data``, ``on_behalf_of`` and ``customer_account`` (deep links, Connect and
Accounts v2 are not emulated) and never expire.
"""

from __future__ import annotations

import asyncio
import html
import itertools
import json
import re
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from aiohttp import web

DAY = 86_400
MAX_PAST_SECONDS = 35 * DAY
MAX_FUTURE_SECONDS = 5 * 60
SESSION_SECONDS = 15 * 60
MAX_STREAM_EVENTS = 100
MAX_VALUE_DIGITS = 15

# Error codes. The duplicate-identifier message is the one Stripe sends ("An event already exists with
# identifier X."); the code makes it recognisable without parsing the message.
DUPLICATE_IDENTIFIER_CODE = "duplicate_meter_event"
DUPLICATE_IDENTIFIER_MESSAGE = "An event already exists with identifier {identifier}."
NO_METER_CODE = "no_meter"
CUSTOMER_NOT_FOUND_CODE = "meter_event_customer_not_found"
NO_CUSTOMER_CODE = "meter_event_no_customer_defined"
INVALID_VALUE_CODE = "meter_event_invalid_value"
VALUE_NOT_FOUND_CODE = "meter_event_value_not_found"
TOO_OLD_CODE = "timestamp_too_far_in_past"
IN_FUTURE_CODE = "timestamp_in_future"
SESSION_EXPIRED_CODE = "billing_meter_event_session_expired"

_NUMBER = re.compile(r"^-?(\d+)(?:\.(\d+))?$")

ENDPOINTS = ("meter_events", "meter_event_session", "meter_event_stream", "meters", "meter", "event_summaries",
             "billing_portal_sessions")

# POST /v1/billing_portal/sessions (Stripe's API reference, "Create a portal session").
PORTAL_PARAMS = frozenset({"configuration", "customer", "customer_account", "expand", "flow_data", "locale",
                           "on_behalf_of", "return_url"})
PORTAL_LOCALES = frozenset({
    "auto", "bg", "cs", "da", "de", "el", "en", "en-AU", "en-CA", "en-GB", "en-IE", "en-IN", "en-NZ", "en-SG", "es",
    "es-419", "et", "fi", "fil", "fr", "fr-CA", "hr", "hu", "id", "it", "ja", "ko", "lt", "lv", "ms", "mt", "nb",
    "nl", "pl", "pt", "pt-BR", "ro", "ru", "sk", "sl", "sv", "th", "tr", "vi", "zh", "zh-HK", "zh-TW"})
NO_DEFAULT_PORTAL_MESSAGE = (
    "No configuration provided and your test mode default configuration has not been created. Provide a "
    "configuration or create your default by saving your customer portal settings in test mode at "
    "https://dashboard.stripe.com/test/settings/billing/portal.")
NO_RETURN_URL_MESSAGE = ("Your PortalConfiguration does not have a `default_return_url`, and you did not provide a "
                         "`return_url`.")


class ManualClock:
    """A settable clock: ``StripeEmulator(clock=ManualClock(1_700_000_000))``; ``advance(seconds)``."""

    def __init__(self, now: float | None = None) -> None:
        self.now = float(time.time() if now is None else now)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Meter:
    id: str
    event_name: str
    formula: str = "sum"
    display_name: str = ""
    customer_key: str = "stripe_customer_id"
    value_key: str = "value"
    created: int = 0

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "billing.meter",
            "created": self.created,
            "customer_mapping": {"event_payload_key": self.customer_key, "type": "by_id"},
            "default_aggregation": {"formula": self.formula},
            "display_name": self.display_name or self.event_name,
            "event_name": self.event_name,
            "event_time_window": None,
            "livemode": False,
            "status": "active",
            "status_transitions": {"deactivated_at": None},
            "updated": self.created,
            "value_settings": {"event_payload_key": self.value_key},
        }


@dataclass
class PortalConfiguration:
    id: str
    default_return_url: str | None = None
    is_default: bool = False


@dataclass
class MeterEventRecord:
    """One event Stripe accepted."""

    event_name: str
    identifier: str
    customer: str
    value: Decimal
    timestamp: int
    created: int
    payload: dict[str, str]
    via: str  # "v1" or "v2"
    seq: int = 0


@dataclass
class _Fault:
    kind: str  # "fail" | "drop"
    endpoint: str | None
    status: int = 500
    error: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    after_accept: bool = False


class _StripeError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body: dict[str, Any] = {"type": type, "message": message}
        if code is not None:
            self.body["code"] = code
        if param is not None:
            self.body["param"] = param
        self.headers = headers or {}


def _duplicate_identifier(identifier: str) -> _StripeError:
    """Stripe's answer to an identifier it already holds (within its uniqueness window, or in the same batch)."""
    return _StripeError(
        400,
        DUPLICATE_IDENTIFIER_MESSAGE.format(identifier=identifier),
        code=DUPLICATE_IDENTIFIER_CODE,
        param="identifier",
        headers={"Stripe-Should-Retry": "false"},
    )


def _default_error(status: int) -> dict[str, Any]:
    if status == 429:
        return {
            "type": "invalid_request_error",
            "code": "rate_limit",
            "message": "Too many requests hit the API too quickly. We recommend an exponential backoff of your "
            "requests.",
        }
    if status == 409:
        return {
            "type": "idempotency_error",
            "message": "There is currently another in-progress request using this Idempotent Key (that probably "
            "means you submitted twice, and the other request is still going through). Please try again later.",
        }
    if status >= 500:
        return {"type": "api_error", "message": "Sorry, something went wrong. We've already been notified."}
    return {"type": "invalid_request_error", "message": f"Injected error {status}."}


class StripeEmulator:
    """Stripe Billing Meters emulator on 127.0.0.1. See the module docstring."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] | None = None,
        api_keys: set[str] | None = None,
        identifier_ttl: float = DAY,
        idempotency_ttl: float = DAY,
        stream_validation: str = "sync",
        portal_configured: bool = True,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        if stream_validation not in ("sync", "async"):
            raise ValueError("stream_validation is 'sync' or 'async'")
        self.clock: Callable[[], float] = clock or time.time
        self.api_keys = api_keys  # None: any sk_test_/sk_live_ key is valid
        self.identifier_ttl = identifier_ttl
        self.idempotency_ttl = idempotency_ttl
        self.stream_validation = stream_validation
        self.host = host
        self.port = port
        self.customers: set[str] = set()
        self.meters: dict[str, Meter] = {}
        self.events: list[MeterEventRecord] = []
        self.rejected: list[dict[str, Any]] = []  # events refused: {"via", "event", "status", "error"}
        self.requests: Counter[str] = Counter()  # per endpoint name (see ENDPOINTS)
        self.request_log: list[dict[str, Any]] = []
        self.sessions: dict[str, dict[str, Any]] = {}  # token -> {"id", "expires_at"}
        self._identifiers: dict[str, float] = {}  # identifier -> accepted at
        self._idempotency: dict[str, dict[str, Any]] = {}
        self._in_flight: set[str] = set()
        self._faults: list[_Fault] = []
        self._slow: dict[str | None, tuple[float, bool]] = {}
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self.url = ""
        self.portal_configurations: dict[str, PortalConfiguration] = {}
        self.portal_sessions: dict[str, dict[str, Any]] = {}  # the secret of its URL -> the session object
        if portal_configured:
            self.add_portal_configuration(is_default=True)

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> StripeEmulator:
        app = web.Application()
        app.router.add_post("/v1/billing/meter_events", self._meter_events)
        app.router.add_post("/v2/billing/meter_event_session", self._meter_event_session)
        app.router.add_post("/v2/billing/meter_event_stream", self._meter_event_stream)
        app.router.add_get("/v1/billing/meters", self._meters)
        app.router.add_get("/v1/billing/meters/{id}", self._meter)
        app.router.add_get("/v1/billing/meters/{id}/event_summaries", self._event_summaries)
        app.router.add_post("/v1/billing_portal/sessions", self._billing_portal_sessions)
        app.router.add_get("/p/session/{secret}", self._portal_page)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = site._server
        assert server is not None
        port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.port = port
        self.url = f"http://{self.host}:{port}"
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> StripeEmulator:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---------------------------------------------------------------- test control

    def add_customer(self, customer_id: str) -> str:
        self.customers.add(customer_id)
        return customer_id

    def add_portal_configuration(self, *, default_return_url: str | None = None, is_default: bool = False) -> str:
        """A customer portal configuration (``bpc_...``); ``is_default`` makes it the account's default."""
        config_id = f"bpc_test_{next(self._ids):08d}{secrets.token_hex(4)}"
        if is_default:
            for config in self.portal_configurations.values():
                config.is_default = False
        self.portal_configurations[config_id] = PortalConfiguration(config_id, default_return_url, is_default)
        return config_id

    def add_meter(
        self,
        event_name: str,
        formula: str = "sum",
        *,
        display_name: str | None = None,
        customer_key: str = "stripe_customer_id",
        value_key: str = "value",
    ) -> str:
        """Configure a meter; returns its id (``mtr_test_...``). ``formula``: "sum", "last" or "count"."""
        if formula not in ("sum", "last", "count"):
            raise ValueError(f"unknown formula {formula!r}")
        if any(m.event_name == event_name for m in self.meters.values()):
            raise ValueError(f"a meter with event_name {event_name!r} exists")
        meter_id = f"mtr_test_{next(self._ids):08d}{secrets.token_hex(4)}"
        self.meters[meter_id] = Meter(
            id=meter_id,
            event_name=event_name,
            formula=formula,
            display_name=display_name or event_name,
            customer_key=customer_key,
            value_key=value_key,
            created=int(self.clock()),
        )
        return meter_id

    def meter_for(self, event_name: str) -> Meter | None:
        return next((m for m in self.meters.values() if m.event_name == event_name), None)

    def totals(self, customer: str, event_name: str, start: float | None = None, end: float | None = None) -> Decimal:
        """The meter's aggregate (by its formula) of accepted events for ``customer``; ``[start, end)`` optional."""
        meter = self.meter_for(event_name)
        formula = meter.formula if meter else "sum"
        chosen = [
            e
            for e in self.events
            if e.customer == customer
            and e.event_name == event_name
            and (start is None or e.timestamp >= start)
            and (end is None or e.timestamp < end)
        ]
        return _aggregate(chosen, formula)

    def fail_next(
        self,
        n: int = 1,
        status: int = 500,
        *,
        endpoint: str | None = None,
        type: str | None = None,
        code: str | None = None,
        message: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        """The next ``n`` requests (to ``endpoint``, or any) answer ``status`` with a Stripe error, unprocessed.

        500 → ``stripe.APIError``, 429 → ``stripe.RateLimitError``, 409 → ``stripe.APIError`` (idempotency_error),
        400 → ``stripe.InvalidRequestError``. ``headers`` e.g. ``{"Stripe-Should-Retry": "false"}``."""
        error = _default_error(status)
        if type is not None:
            error["type"] = type
        if code is not None:
            error["code"] = code
        if message is not None:
            error["message"] = message
        for _ in range(n):
            self._faults.append(_Fault("fail", endpoint, status=status, error=dict(error), headers=headers or {}))

    def drop_next(self, n: int = 1, *, after_accept: bool = False, endpoint: str | None = None) -> None:
        """Close the connection of the next ``n`` requests without an answer.

        ``after_accept=False``: before anything is recorded. ``after_accept=True``: the request is processed
        (events recorded, identifier taken, idempotent result stored) and then the client hears nothing."""
        for _ in range(n):
            self._faults.append(_Fault("drop", endpoint, after_accept=after_accept))

    def slow(self, seconds: float, *, endpoint: str | None = None, after_accept: bool = False) -> None:
        """Delay every later request (to ``endpoint``, or any) by ``seconds``; ``slow(0)`` ends it.

        ``after_accept=True`` delays after processing, so a client that times out has still been accepted."""
        if seconds <= 0:
            self._slow.pop(endpoint, None)
        else:
            self._slow[endpoint] = (seconds, after_accept)

    def clear_faults(self) -> None:
        self._faults.clear()
        self._slow.clear()

    def expire_sessions(self) -> None:
        """Make every v2 meter event session's token expired."""
        for session in self.sessions.values():
            session["expires_at"] = self.clock() - 1

    def forget_identifiers(self) -> None:
        """As if the identifier uniqueness window had passed for every identifier."""
        self._identifiers.clear()

    # ---------------------------------------------------------------- plumbing

    def _take_fault(self, endpoint: str) -> _Fault | None:
        for i, fault in enumerate(self._faults):
            if fault.endpoint is None or fault.endpoint == endpoint:
                return self._faults.pop(i)
        return None

    def _slow_for(self, endpoint: str) -> tuple[float, bool] | None:
        return self._slow.get(endpoint) or self._slow.get(None)

    def _request_id(self) -> str:
        return "req_" + secrets.token_hex(7)

    def _response(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> web.Response:
        all_headers = {"Request-Id": self._request_id(), "Stripe-Version": "2025-03-31.basil"}
        all_headers.update(headers or {})
        return web.Response(
            status=status,
            text=json.dumps(body, default=_json_default),
            content_type="application/json",
            headers=all_headers,
        )

    def _error_response(self, err: _StripeError) -> web.Response:
        return self._response(err.status, {"error": err.body}, err.headers)

    async def _handle(
        self,
        request: web.Request,
        endpoint: str,
        process: Callable[[web.Request, str], Any],
        *,
        idempotent: bool = False,
    ) -> web.StreamResponse:
        """Counting, fault injection, idempotency, then ``process(request, raw_body)`` → (status, body)."""
        self.requests[endpoint] += 1
        raw = await request.text()
        entry: dict[str, Any] = {
            "endpoint": endpoint,
            "method": request.method,
            "path": request.path_qs,
            "idempotency_key": request.headers.get("Idempotency-Key"),
            "status": None,
        }
        self.request_log.append(entry)
        fault = self._take_fault(endpoint)
        slow = self._slow_for(endpoint)
        if fault and fault.kind == "drop" and not fault.after_accept:
            entry["status"] = "dropped"
            return self._drop(request)
        if fault and fault.kind == "fail":
            entry["status"] = fault.status
            return self._response(fault.status, {"error": fault.error}, fault.headers)

        key = request.headers.get("Idempotency-Key") if idempotent else None
        fingerprint = (request.method, request.path, _fingerprint(request, raw))
        now = self.clock()
        if key:
            stored = self._idempotency.get(key)
            if stored is not None and now - stored["at"] > self.idempotency_ttl:
                del self._idempotency[key]
                stored = None
            if stored is not None:
                if stored["fingerprint"] != fingerprint:
                    err = _StripeError(
                        400,
                        "Keys for idempotent requests can only be used with the same parameters they were first "
                        f"used with. Try using a key other than '{key}' if you meant to execute a different "
                        "request.",
                        type="idempotency_error",
                    )
                    entry["status"] = 400
                    return self._error_response(err)
                entry["status"] = stored["status"]
                entry["replayed"] = True
                return self._response(
                    stored["status"], stored["body"], {"Idempotent-Replayed": "true", "Idempotency-Key": key}
                )
            if key in self._in_flight:
                entry["status"] = 409
                return self._response(409, {"error": _default_error(409)})
            self._in_flight.add(key)
        try:
            if slow and not slow[1]:  # slow while holding the idempotency key, as a slow Stripe would
                await asyncio.sleep(slow[0])
            try:
                status, body = process(request, raw)
                headers: dict[str, str] = {}
            except _StripeError as err:
                status, body, headers = err.status, {"error": err.body}, err.headers
            # Stripe saves results only of requests that executed; validation failures are not saved.
            if key and 200 <= status < 300:
                self._idempotency[key] = {"fingerprint": fingerprint, "status": status, "body": body, "at": now}
        finally:
            if key:
                self._in_flight.discard(key)
        if slow and slow[1]:
            await asyncio.sleep(slow[0])
        if fault and fault.kind == "drop":
            entry["status"] = "dropped"
            entry["accepted_status"] = status
            return self._drop(request)
        entry["status"] = status
        if key:
            headers = {**headers, "Idempotency-Key": key}
        return self._response(status, body, headers)

    def _drop(self, request: web.Request) -> web.StreamResponse:
        transport = request.transport
        if transport is not None:
            transport.abort()
        raise _DroppedConnection()

    def _authenticate_secret_key(self, request: web.Request) -> None:
        key = _bearer(request)
        if not key:
            raise _StripeError(
                401,
                "You did not provide an API key. You need to provide your API key in the Authorization header, "
                "using Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY').",
            )
        valid = key.startswith(("sk_test_", "sk_live_", "rk_test_", "rk_live_"))
        if self.api_keys is not None:
            valid = key in self.api_keys
        if not valid:
            raise _StripeError(401, f"Invalid API Key provided: {_redact(key)}")

    # ---------------------------------------------------------------- validation shared by v1 and v2

    def _validate_event(
        self, event_name: str | None, payload: dict[str, str], identifier: str | None, timestamp: int, via: str
    ) -> tuple[Meter, str, Decimal, str]:
        now = self.clock()
        if not event_name:
            raise _StripeError(400, "Missing required param: event_name.", code="parameter_missing", param="event_name")
        if len(event_name) > 100:
            raise _StripeError(
                400, "event_name is longer than 100 characters.", code="invalid_string_length", param="event_name"
            )
        meter = self.meter_for(event_name)
        if meter is None:
            raise _StripeError(
                400,
                f"No active meter was found matching event_name `{event_name}`.",
                code=NO_METER_CODE,
                param="event_name",
            )
        customer = payload.get(meter.customer_key)
        if not customer:
            raise _StripeError(
                400,
                f"The payload does not contain the customer mapping key `{meter.customer_key}`.",
                code=NO_CUSTOMER_CODE,
                param=f"payload[{meter.customer_key}]",
            )
        if customer not in self.customers:
            raise _StripeError(
                400,
                f"No such customer: '{customer}'",
                code=CUSTOMER_NOT_FOUND_CODE,
                param=f"payload[{meter.customer_key}]",
            )
        raw_value = payload.get(meter.value_key)
        if raw_value is None:
            raise _StripeError(
                400,
                f"The payload does not contain the value key `{meter.value_key}`.",
                code=VALUE_NOT_FOUND_CODE,
                param=f"payload[{meter.value_key}]",
            )
        value = _parse_value(raw_value, meter.value_key)
        if identifier is not None and len(identifier) > 100:
            raise _StripeError(
                400, "identifier is longer than 100 characters.", code="invalid_string_length", param="identifier"
            )
        if timestamp < now - MAX_PAST_SECONDS:
            raise _StripeError(
                400, "The timestamp must be within the past 35 calendar days.", code=TOO_OLD_CODE, param="timestamp"
            )
        if timestamp > now + MAX_FUTURE_SECONDS:
            raise _StripeError(
                400,
                "The timestamp must not be more than 5 minutes in the future.",
                code=IN_FUTURE_CODE,
                param="timestamp",
            )
        ident = identifier or f"{via}_{secrets.token_hex(12)}"
        seen = self._identifiers.get(ident)
        if seen is not None and now - seen < self.identifier_ttl:
            raise _duplicate_identifier(ident)
        return meter, customer, value, ident

    def _accept(
        self,
        event_name: str,
        ident: str,
        customer: str,
        value: Decimal,
        timestamp: int,
        payload: dict[str, str],
        via: str,
    ) -> MeterEventRecord:
        now = self.clock()
        record = MeterEventRecord(
            event_name=event_name,
            identifier=ident,
            customer=customer,
            value=value,
            timestamp=timestamp,
            created=int(now),
            payload=dict(payload),
            via=via,
            seq=len(self.events),
        )
        self._identifiers[ident] = now
        self.events.append(record)
        return record

    # ---------------------------------------------------------------- v1 meter events

    async def _meter_events(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "meter_events", self._process_meter_event, idempotent=True)

    def _process_meter_event(self, request: web.Request, raw: str) -> tuple[int, dict[str, Any]]:
        self._authenticate_secret_key(request)
        params = dict(parse_qsl(raw, keep_blank_values=True))
        payload = {
            k[len("payload[") : -1]: v for k, v in params.items() if k.startswith("payload[") and k.endswith("]")
        }
        event_name = params.get("event_name")
        if not payload and event_name:
            raise _StripeError(400, "Missing required param: payload.", code="parameter_missing", param="payload")
        raw_ts = params.get("timestamp")
        if raw_ts is None or raw_ts == "":
            timestamp = int(self.clock())
        else:
            try:
                timestamp = int(raw_ts)
            except ValueError:
                raise _StripeError(
                    400, f"Invalid integer: {raw_ts}", code="parameter_invalid_integer", param="timestamp"
                ) from None
        meter, customer, value, ident = self._validate_event(
            event_name, payload, params.get("identifier"), timestamp, "v1"
        )
        record = self._accept(meter.event_name, ident, customer, value, timestamp, payload, "v1")
        return 200, {
            "object": "billing.meter_event",
            "created": record.created,
            "event_name": record.event_name,
            "identifier": record.identifier,
            "livemode": False,
            "payload": record.payload,
            "timestamp": record.timestamp,
        }

    # ---------------------------------------------------------------- v2 stream

    async def _meter_event_session(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "meter_event_session", self._process_session, idempotent=True)

    def _process_session(self, request: web.Request, raw: str) -> tuple[int, dict[str, Any]]:
        self._authenticate_secret_key(request)
        now = self.clock()
        token = "mes_tok_" + secrets.token_hex(16)
        session_id = "mes_" + secrets.token_hex(12)
        self.sessions[token] = {"id": session_id, "expires_at": now + SESSION_SECONDS}
        return 200, {
            "id": session_id,
            "object": "v2.billing.meter_event_session",
            "authentication_token": token,
            "created": _rfc3339(now),
            "expires_at": _rfc3339(now + SESSION_SECONDS),
            "livemode": False,
        }

    async def _meter_event_stream(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "meter_event_stream", self._process_stream, idempotent=True)

    def _process_stream(self, request: web.Request, raw: str) -> tuple[int, dict[str, Any]]:
        token = _bearer(request)
        session = self.sessions.get(token or "")
        if session is None:
            raise _StripeError(
                401,
                "The meter event session authentication token is not valid.",
                type="invalid_request_error",
                code="invalid_api_key",
            )
        if self.clock() >= session["expires_at"]:
            raise _StripeError(
                401,
                "The meter event session has expired. Create a new session.",
                type="temporary_session_expired",
                code=SESSION_EXPIRED_CODE,
            )
        try:
            body = json.loads(raw or "{}")
        except ValueError:
            raise _StripeError(400, "The request body is not valid JSON.", code="invalid_json") from None
        events = body.get("events") if isinstance(body, dict) else None
        if not isinstance(events, list) or not events:
            raise _StripeError(400, "Missing required param: events.", code="parameter_missing", param="events")
        if len(events) > MAX_STREAM_EVENTS:
            raise _StripeError(
                400,
                f"events can contain at most {MAX_STREAM_EVENTS} items.",
                code="invalid_array_length",
                param="events",
            )
        accepted: list[tuple[Meter, str, Decimal, str, int, dict[str, str]]] = []
        # An identifier repeated within the batch is a duplicate of the earlier one. Nothing is taken before the
        # whole batch is validated (sync validation refuses it whole), so no copy of the taken identifiers is
        # needed to undo: a batch costs what it holds, not what the emulator has seen.
        batch_identifiers: set[str] = set()
        for i, event in enumerate(events):
            try:
                if not isinstance(event, dict):
                    raise _StripeError(400, "Each event must be an object.", param=f"events[{i}]")
                payload = event.get("payload") or {}
                if not isinstance(payload, dict) or not all(isinstance(v, str) for v in payload.values()):
                    raise _StripeError(
                        400,
                        "payload must be a map of strings.",
                        code="parameter_invalid",
                        param=f"events[{i}].payload",
                    )
                timestamp = _parse_rfc3339(event.get("timestamp"), i) if event.get("timestamp") else int(self.clock())
                meter, customer, value, ident = self._validate_event(
                    event.get("event_name"), payload, event.get("identifier"), timestamp, "v2"
                )
                if ident in batch_identifiers:
                    raise _duplicate_identifier(ident)
                batch_identifiers.add(ident)
                accepted.append((meter, customer, value, ident, timestamp, payload))
            except _StripeError as err:
                if self.stream_validation == "sync":
                    if err.body.get("param") and not err.body["param"].startswith("events"):
                        err.body["param"] = f"events[{i}].{err.body['param']}"
                    raise
                self.rejected.append({"via": "v2", "event": event, "status": err.status, "error": err.body})
        for meter, customer, value, ident, timestamp, payload in accepted:
            self._accept(meter.event_name, ident, customer, value, timestamp, payload, "v2")
        return 200, {}

    # ---------------------------------------------------------------- meters and summaries

    async def _meters(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "meters", self._process_meters)

    def _process_meters(self, request: web.Request, raw: str) -> tuple[int, dict[str, Any]]:
        self._authenticate_secret_key(request)
        query = request.query
        limit = _int_param(query.get("limit"), "limit", 10)
        if not 1 <= limit <= 100:
            raise _StripeError(400, "limit must be between 1 and 100.", code="parameter_invalid_integer", param="limit")
        status = query.get("status")
        meters = [m for m in reversed(list(self.meters.values())) if status in (None, "active")]
        start = 0
        if query.get("starting_after"):
            ids = [m.id for m in meters]
            if query["starting_after"] not in ids:
                raise _StripeError(
                    400,
                    f"No such billing meter: '{query['starting_after']}'",
                    code="resource_missing",
                    param="starting_after",
                )
            start = ids.index(query["starting_after"]) + 1
        page = meters[start : start + limit]
        return 200, {
            "object": "list",
            "url": "/v1/billing/meters",
            "has_more": start + limit < len(meters),
            "data": [m.as_json() for m in page],
        }

    async def _meter(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "meter", self._process_meter)

    def _process_meter(self, request: web.Request, raw: str) -> tuple[int, dict[str, Any]]:
        self._authenticate_secret_key(request)
        return 200, self._get_meter(request.match_info["id"]).as_json()

    def _get_meter(self, meter_id: str) -> Meter:
        meter = self.meters.get(meter_id)
        if meter is None:
            raise _StripeError(404, f"No such billing meter: '{meter_id}'", code="resource_missing", param="id")
        return meter

    async def _event_summaries(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "event_summaries", self._process_summaries)

    def _process_summaries(self, request: web.Request, raw: str) -> tuple[int, dict[str, Any]]:
        self._authenticate_secret_key(request)
        meter = self._get_meter(request.match_info["id"])
        query = request.query
        for name in ("customer", "start_time", "end_time"):
            if not query.get(name):
                raise _StripeError(400, f"Missing required param: {name}.", code="parameter_missing", param=name)
        if query.get("value_grouping_window"):
            raise _StripeError(
                400,
                "value_grouping_window is not supported by this emulator.",
                code="parameter_unknown",
                param="value_grouping_window",
            )
        start = _int_param(query["start_time"], "start_time", 0)
        end = _int_param(query["end_time"], "end_time", 0)
        for name, value in (("start_time", start), ("end_time", end)):
            if value % 60:
                raise _StripeError(
                    400, f"{name} must be aligned with minute boundaries.", code="parameter_invalid_integer", param=name
                )
        if end <= start:
            raise _StripeError(
                400, "end_time must be after start_time.", code="parameter_invalid_integer", param="end_time"
            )
        customer = query["customer"]
        chosen = [
            e
            for e in self.events
            if e.event_name == meter.event_name and e.customer == customer and start <= e.timestamp < end
        ]
        total = _aggregate(chosen, meter.formula)
        summary = {
            "id": f"mtrusg_{meter.id}_{customer}_{start}",
            "object": "billing.meter_event_summary",
            "aggregated_value": total,
            "end_time": end,
            "livemode": False,
            "meter": meter.id,
            "start_time": start,
        }
        return 200, {
            "object": "list",
            "url": f"/v1/billing/meters/{meter.id}/event_summaries",
            "has_more": False,
            "data": [summary],
        }


    # ---------------------------------------------------------------- the customer portal

    async def _billing_portal_sessions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "billing_portal_sessions", self._process_portal_session, idempotent=True)

    def _process_portal_session(self, request: web.Request, raw: str) -> tuple[int, dict[str, Any]]:
        self._authenticate_secret_key(request)
        pairs = parse_qsl(raw, keep_blank_values=True)
        for name, _ in pairs:
            top = name.split("[", 1)[0]
            if top not in PORTAL_PARAMS:
                raise _StripeError(400, f"Received unknown parameter: {top}", code="parameter_unknown", param=top)
        params = dict(pairs)
        for name in ("flow_data", "on_behalf_of"):
            if any(key.split("[", 1)[0] == name for key, _ in pairs):
                raise _StripeError(400, f"{name} is not supported by this emulator.", code="parameter_unknown",
                                   param=name)
        customer, account = params.get("customer"), params.get("customer_account")
        if customer and account:
            raise _StripeError(400, "You may only specify one of these parameters: customer, customer_account.",
                               code="parameter_invalid", param="customer")
        if not customer and not account:
            raise _StripeError(400, "Missing required param: customer.", code="parameter_missing", param="customer")
        if account:
            raise _StripeError(400, f"No such account: '{account}'", code="resource_missing", param="customer_account")
        if customer not in self.customers:
            raise _StripeError(400, f"No such customer: '{customer}'", code="resource_missing", param="customer")
        config_id = params.get("configuration")
        if config_id:
            config = self.portal_configurations.get(config_id)
            if config is None:
                raise _StripeError(400, f"No such configuration: '{config_id}'", code="resource_missing",
                                   param="configuration")
        else:
            config = next((c for c in self.portal_configurations.values() if c.is_default), None)
            if config is None:
                raise _StripeError(400, NO_DEFAULT_PORTAL_MESSAGE)
        return_url = params.get("return_url") or None
        if return_url is not None and not _valid_url(return_url):
            raise _StripeError(400, "Not a valid URL", code="url_invalid", param="return_url")
        if return_url is None and config.default_return_url is None:
            raise _StripeError(400, NO_RETURN_URL_MESSAGE, param="return_url")
        locale = params.get("locale") or None
        if locale is not None and locale not in PORTAL_LOCALES:
            raise _StripeError(400, f"Invalid locale: must be one of {', '.join(sorted(PORTAL_LOCALES))}",
                               code="parameter_invalid", param="locale")
        livemode = (_bearer(request) or "").startswith(("sk_live_", "rk_live_"))
        secret = ("live_" if livemode else "test_") + secrets.token_urlsafe(24)
        session = {
            "id": "bps_" + secrets.token_hex(12),
            "object": "billing_portal.session",
            "configuration": config.id,
            "created": int(self.clock()),
            "customer": customer,
            "customer_account": None,
            "flow": None,
            "livemode": livemode,
            "locale": locale,
            "on_behalf_of": None,
            "return_url": return_url or config.default_return_url,
            "url": f"{self.url}/p/session/{secret}",
        }
        self.portal_sessions[secret] = session
        return 200, session

    async def _portal_page(self, request: web.Request) -> web.Response:
        """What the session's URL shows here: whose portal it is, and the way back."""
        session = self.portal_sessions.get(request.match_info["secret"])
        if session is None:
            return web.Response(status=404, text="This portal session does not exist.", content_type="text/plain")
        back = html.escape(session["return_url"] or "", quote=True)
        body = (f"<!doctype html><title>Stripe customer portal (emulator)</title><h1>Customer portal</h1>"
                f"<p id='customer'>{html.escape(session['customer'])}</p><p><a href=\"{back}\">Return</a></p>")
        return web.Response(text=body, content_type="text/html")


def _valid_url(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.netloc) and not any(ch.isspace() for ch in url)


class _DroppedConnection(web.HTTPException):
    """Raised after aborting the transport: aiohttp then writes nothing and logs nothing."""

    status_code = 499

    def __init__(self) -> None:
        super().__init__()


def _aggregate(events: list[MeterEventRecord], formula: str) -> Decimal:
    if not events:
        return Decimal(0)
    if formula == "count":
        return Decimal(len(events))
    if formula == "last":
        return max(events, key=lambda e: (e.timestamp, e.seq)).value
    return sum((e.value for e in events), Decimal(0))


def _parse_value(raw: str, key: str) -> Decimal:
    match = _NUMBER.match(raw) if isinstance(raw, str) else None
    if match is None:
        raise _StripeError(
            400,
            f"The value in the event payload must be a number. Received `{raw}`.",
            code=INVALID_VALUE_CODE,
            param=f"payload[{key}]",
        )
    digits = (match.group(1) + (match.group(2) or "")).lstrip("0")
    if len(digits) > MAX_VALUE_DIGITS:
        raise _StripeError(
            400,
            f"The value in the event payload can have at most {MAX_VALUE_DIGITS} digits. Received `{raw}`.",
            code="meter_event_value_too_many_digits",
            param=f"payload[{key}]",
        )
    try:
        return Decimal(raw)
    except InvalidOperation:
        raise _StripeError(400, f"Invalid value `{raw}`.", code=INVALID_VALUE_CODE, param=f"payload[{key}]") from None


def _int_param(raw: str | None, name: str, default: int) -> int:
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise _StripeError(400, f"Invalid integer: {raw}", code="parameter_invalid_integer", param=name) from None


def _parse_rfc3339(raw: Any, index: int) -> int:
    try:
        parsed = datetime.fromisoformat(str(raw))
    except ValueError:
        raise _StripeError(
            400, f"Invalid timestamp: {raw}", code="parameter_invalid", param=f"events[{index}].timestamp"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return int(parsed.timestamp())


def _rfc3339(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    if header.startswith("Bearer "):
        return header[len("Bearer ") :].strip() or None
    if header.startswith("Basic "):
        import base64

        try:
            decoded = base64.b64decode(header[len("Basic ") :]).decode()
        except ValueError:
            return None
        return decoded.split(":", 1)[0] or None
    return None


def _redact(key: str) -> str:
    return key[:8] + "*" * 12 + key[-4:] if len(key) > 12 else "*" * len(key)


def _fingerprint(request: web.Request, raw: str) -> Any:
    if request.content_type == "application/json":
        try:
            return json.dumps(json.loads(raw or "{}"), sort_keys=True)
        except ValueError:
            return raw
    return tuple(sorted(parse_qsl(raw, keep_blank_values=True)))


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    raise TypeError(f"not JSON serialisable: {type(value)!r}")
