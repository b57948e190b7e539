"""Meter events out to Stripe: v1 one by one, the v2 stream in batches, or a dry run (PRODUCT.md §8).

Every sender answers one `SendResult` per event; stripe's exceptions are translated here, once
(`classify`), into four outcomes:

    SENT        Stripe answered 2xx
    DUPLICATE   Stripe already holds the identifier (code duplicate_meter_event): counts as sent
    RETRY       network, timeout, 409, 429, 5xx, an expired v2 session, a rejected API key: try later
    PARK        any other 4xx: the bucket waits for an operator, with `reason` (bounded) and `detail`

An invalid or revoked API key (401/403 on the secret key) is retried, not parked: it is not the bucket's
fault, and parking every bucket would need a manual re-queue once the key is fixed.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import logging
import re
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Protocol

import stripe

from billing_sync.settings import StripeSettings
from metering.clock import Clock, system_clock, utc

log = logging.getLogger("cosmos_gateway.billing_sync")

DUPLICATE_CODE = "duplicate_meter_event"
DUPLICATE_MESSAGE_PREFIX = "An event already exists with identifier"
MAX_STREAM_EVENTS = 100
SESSION_RENEW_BEFORE = 60.0  # seconds before a v2 session's expiry at which a new one is made
DRY_RUN_KEPT = 10_000  # events a dry run keeps in memory (the newest)

# Stripe error codes that park a bucket, to a bounded reason (the metric label).
_PARK_REASONS = {
    "meter_event_customer_not_found": "customer_not_found",
    "meter_event_no_customer_defined": "customer_not_found",
    "timestamp_too_far_in_past": "too_old",
    "timestamp_in_future": "in_future",
    "no_meter": "no_meter",
    "meter_event_invalid_value": "invalid_value",
    "meter_event_value_not_found": "invalid_value",
    "meter_event_value_too_many_digits": "invalid_value",
}
_EVENT_PARAM = re.compile(r"events\[(\d+)\]")


class Outcome(enum.Enum):
    SENT = "sent"
    DUPLICATE = "duplicate"
    RETRY = "retry"
    PARK = "park"


@dataclass(frozen=True, slots=True)
class MeterEvent:
    identifier: str
    event_name: str
    customer: str
    value: Decimal
    timestamp: int  # epoch seconds: the bucket start

    def payload(self) -> dict[str, str]:
        return {"stripe_customer_id": self.customer, "value": format_value(self.value)}


@dataclass(frozen=True, slots=True)
class SendResult:
    outcome: Outcome
    reason: str | None = None  # bounded, for RETRY and PARK
    detail: str | None = None  # Stripe's message

    @property
    def delivered(self) -> bool:
        return self.outcome in (Outcome.SENT, Outcome.DUPLICATE)


SENT = SendResult(Outcome.SENT)
DUPLICATE = SendResult(Outcome.DUPLICATE)


class MeterEventSender(Protocol):
    max_batch: int  # events per `send` call
    client: stripe.StripeClient | None  # the secret-key client, for reads (event summaries); None: dry run

    async def send(self, events: Sequence[MeterEvent]) -> list[SendResult]:
        """One result per event, in order; never raises for a Stripe or network error."""
        ...

    async def aclose(self) -> None: ...


def format_value(value: Decimal) -> str:
    """'5', '12.5': no exponent, no trailing zeros (Stripe takes a numeric string)."""
    return format(value.normalize(), "f")


def classify(exc: Exception) -> SendResult:
    """The one translation of stripe's (and the transport's) exceptions into an outcome."""
    if isinstance(exc, stripe.TemporarySessionExpiredError):
        return SendResult(Outcome.RETRY, "session_expired", str(exc))
    if isinstance(exc, stripe.APIConnectionError):
        return SendResult(Outcome.RETRY, "network", _message(exc))
    if isinstance(exc, TimeoutError):
        return SendResult(Outcome.RETRY, "timeout", "timed out")
    if not isinstance(exc, stripe.StripeError):
        log.error("unexpected error sending meter events: %r", exc, exc_info=exc)
        return SendResult(Outcome.RETRY, "other", repr(exc))
    status = exc.http_status or 0
    code = _error_field(exc, "code")
    message = _message(exc)
    if code == DUPLICATE_CODE or message.startswith(DUPLICATE_MESSAGE_PREFIX):
        return DUPLICATE
    if status == 429 or isinstance(exc, stripe.RateLimitError):
        return SendResult(Outcome.RETRY, "rate_limited", message)
    if status == 409:
        return SendResult(Outcome.RETRY, "conflict", message)
    if status >= 500 or status == 0:
        return SendResult(Outcome.RETRY, "server_error", f"{status}: {message}")
    if status in (401, 403):
        return SendResult(Outcome.RETRY, "auth", f"{status}: {message}")
    return SendResult(Outcome.PARK, _PARK_REASONS.get(code or "", "rejected"), f"{status} {code or ''}: {message}")


def _error_field(exc: stripe.StripeError, name: str) -> str | None:
    value = getattr(exc, name, None)
    if value:
        return str(value)
    body = exc.json_body if isinstance(exc.json_body, dict) else {}
    error = body.get("error") if isinstance(body.get("error"), dict) else {}
    found = error.get(name)
    return str(found) if found else None


def _message(exc: Exception) -> str:
    if isinstance(exc, stripe.StripeError):
        return exc.user_message or _error_field(exc, "message") or type(exc).__name__
    return str(exc) or type(exc).__name__


class StripeV1Sender:
    """`POST /v1/billing/meter_events`, one request per event; the identifier is also the idempotency key."""

    max_batch = 1

    def __init__(self, client: stripe.StripeClient, http_client: stripe.AIOHTTPClient | None = None) -> None:
        self._client = self.client = client
        self._http = http_client  # closed by aclose() when given

    async def send(self, events: Sequence[MeterEvent]) -> list[SendResult]:
        return [await self._send_one(event) for event in events]

    async def _send_one(self, event: MeterEvent) -> SendResult:
        params: dict[str, Any] = {
            "event_name": event.event_name, "identifier": event.identifier,
            "timestamp": event.timestamp, "payload": event.payload(),
        }
        try:
            await self._client.v1.billing.meter_events.create_async(
                params=params, options={"idempotency_key": event.identifier})
        except Exception as exc:
            return classify(exc)
        return SENT

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.close_async()


class StripeV2StreamSender:
    """The v2 meter event stream: a 15-minute session renewed before expiry, batches of at most 100.

    `client` (secret key) creates sessions; `stream_client_factory(token)` gives a client authenticated
    by a session token. Stripe refuses a batch whole when one event is invalid and names it in `param`
    (`events[i]....`): that event gets its outcome and the rest is sent again at once.
    """

    max_batch = MAX_STREAM_EVENTS

    def __init__(
        self,
        client: stripe.StripeClient,
        stream_client_factory: Callable[[str], stripe.StripeClient],
        *,
        clock: Clock = system_clock,
        http_client: stripe.AIOHTTPClient | None = None,
    ) -> None:
        self._client = self.client = client
        self._factory = stream_client_factory
        self._clock = clock
        self._http = http_client
        self._streamer: stripe.StripeClient | None = None
        self._expires_at = 0.0
        self._lock = asyncio.Lock()

    async def _session(self) -> stripe.StripeClient:
        async with self._lock:
            if self._streamer is None or self._clock() >= self._expires_at - SESSION_RENEW_BEFORE:
                session = await self._client.v2.billing.meter_event_session.create_async()
                self._expires_at = _epoch(session.expires_at)
                self._streamer = self._factory(session.authentication_token)
            return self._streamer

    async def send(self, events: Sequence[MeterEvent]) -> list[SendResult]:
        results: list[SendResult | None] = [None] * len(events)
        remaining = list(range(len(events)))
        renewed = False
        while remaining:
            batch = [events[i] for i in remaining]
            try:
                streamer = await self._session()
                await streamer.v2.billing.meter_event_stream.create_async(
                    params={"events": [_stream_event(e) for e in batch]},
                    options={"idempotency_key": _batch_key(batch)},
                )
            except Exception as exc:
                result = classify(exc)
                if result.reason == "session_expired" and not renewed:
                    self._streamer, renewed = None, True
                    continue
                index = _event_index(exc) if isinstance(exc, stripe.StripeError) else None
                if index is None or index >= len(remaining):
                    for i in remaining:
                        results[i] = result
                    break
                results[remaining.pop(index)] = result
                continue
            for i in remaining:
                results[i] = SENT
            break
        return [r if r is not None else SendResult(Outcome.RETRY, "server_error", "no answer") for r in results]

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.close_async()


def _stream_event(event: MeterEvent) -> dict[str, Any]:
    timestamp = utc(event.timestamp).isoformat(timespec="milliseconds")
    return {
        "event_name": event.event_name, "identifier": event.identifier,
        "timestamp": timestamp.replace("+00:00", "Z"), "payload": event.payload(),
    }


def _batch_key(batch: Sequence[MeterEvent]) -> str:
    digest = hashlib.sha256("\n".join(e.identifier for e in batch).encode()).hexdigest()
    return f"cg1b_{digest[:48]}"


def _event_index(exc: stripe.StripeError) -> int | None:
    match = _EVENT_PARAM.match(_error_field(exc, "param") or "")
    return int(match.group(1)) if match else None


def _epoch(value: Any) -> float:
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, int | float):
        return float(value)
    parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


class DryRunSender:
    """Sends nothing: logs each event it would have sent and keeps the last `kept` of them (`self.events`).

    Its SENT means "would be sent": the worker marks such rows previewed, never sent. A dry-run `sync` runs for
    as long as there is no API key, so what it keeps is bounded; the log has every event.
    """

    max_batch = MAX_STREAM_EVENTS
    client = None

    def __init__(self, kept: int = DRY_RUN_KEPT) -> None:
        self.events: deque[MeterEvent] = deque(maxlen=kept)

    async def send(self, events: Sequence[MeterEvent]) -> list[SendResult]:
        for event in events:
            log.info("dry run: would send %s %s=%s for %s at %d", event.identifier, event.event_name,
                     format_value(event.value), event.customer, event.timestamp)
        self.events.extend(events)
        return [SENT] * len(events)

    async def aclose(self) -> None:
        return None


def build_sender(settings: StripeSettings, *, clock: Clock = system_clock,
                 timeout: float = 30.0) -> MeterEventSender:
    """The sender `settings` ask for: dry run, or v1 / v2 stream against `api_base` (Stripe by default)."""
    if settings.mode == "dry_run":
        return DryRunSender()
    if not settings.api_key:
        raise ValueError("stripe mode live needs an API key")
    http = stripe.AIOHTTPClient(timeout=timeout)
    bases: dict[str, str] = {}
    if settings.api_base:
        bases = {"api": settings.api_base, "meter_events": settings.api_base}

    def make(key: str) -> stripe.StripeClient:
        # Retries are the worker's (with backoff and the ledger); the library must not retry on its own.
        if bases:
            return stripe.StripeClient(key, base_addresses=bases, max_network_retries=0, http_client=http)
        return stripe.StripeClient(key, max_network_retries=0, http_client=http)

    client = make(settings.api_key)
    if settings.transport == "v2_stream":
        return StripeV2StreamSender(client, make, clock=clock, http_client=http)
    return StripeV1Sender(client, http_client=http)
