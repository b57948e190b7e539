"""Stripe's asynchronous rejections of v2 meter events: `v1.billing.meter.error_report_triggered` (PRODUCT.md §8).

The v2 meter event stream answers 200 for a batch and validates its events afterwards; the events it
then refuses are reported by a v2 event, delivered to the webhook endpoint as a *thin* event
(`object: "v2.core.event"`, `created` an RFC 3339 string, `related_object` the meter, no `data`); the
report itself is the event's `data`, fetched with `GET /v2/core/events/{id}` (StripeEventFetcher):

    {"developer_message_summary": "There is 1 invalid event",
     "reason": {"error_count": 1,
                "error_types": [{"code": "meter_event_no_customer_defined", "error_count": 1,
                                 "sample_errors": [{"error_message": "Customer mapping key ... not found",
                                                    "request": {"identifier": "<our identifier>"}}]}]},
     "validation_start": "2024-09-26T17:46:10.000Z", "validation_end": "2024-09-26T17:46:20.000Z"}

The ledger rows whose identifiers the report names are parked with Stripe's reason
(`rejected: <code>: <message>`), so an operator sees them in `GET /admin/sync` and can requeue them.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import stripe
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession

from billing_sync.metrics import METER_ERROR_PARKED, METER_ERROR_UNATTRIBUTED
from metering.models import LedgerEntry

log = logging.getLogger("cosmos_gateway.meter_errors")

EVENT_TYPE = "v1.billing.meter.error_report_triggered"
PARKED_REASON = "rejected"  # the bounded reason at the head of last_error (billing_sync.metrics)
_MAX_MESSAGE = 500
_MAX_IDENTIFIER = 100  # the width of usage_ledger.identifier
# Stripe validates an event shortly after the stream accepted it; a row sent this long before the
# validation window opened may still be among the events validated in it.
WINDOW_SLACK = timedelta(minutes=5)


class ReportUnreadable(ValueError):
    """The event's data is not an error report (a 400 for the webhook)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


@dataclass(frozen=True, slots=True)
class Rejection:
    """One sample of a rejected event, as Stripe names it."""

    identifier: str
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class MeterErrorReport:
    meter_id: str | None  # related_object.id, `mtr_...`
    rejections: tuple[Rejection, ...]  # the named samples
    unnamed: dict[str, int]  # per error code: rejected events the report counts but does not name
    validation_start: datetime | None
    validation_end: datetime | None


def has_data(event: Mapping[str, Any]) -> bool:
    """Whether the event carries its report (a thin event does not: its data must be fetched)."""
    return isinstance(event.get("data"), dict)


def parse_report(event: Mapping[str, Any]) -> MeterErrorReport:
    """The report in a full `v1.billing.meter.error_report_triggered` event; ReportUnreadable if it has none."""
    data = event.get("data")
    if not isinstance(data, dict):
        raise ReportUnreadable("data", "must be the error report object")
    reason = data.get("reason")
    types = reason.get("error_types") if isinstance(reason, dict) else None
    if not isinstance(types, list):
        raise ReportUnreadable("data.reason.error_types", "must be a list")
    rejections: list[Rejection] = []
    unnamed: dict[str, int] = {}
    for i, error_type in enumerate(types):
        if not isinstance(error_type, dict):
            raise ReportUnreadable(f"data.reason.error_types[{i}]", "must be an object")
        code = _text(error_type.get("code"), 64) or "unknown"
        samples = error_type.get("sample_errors")
        named = 0
        for sample in samples if isinstance(samples, list) else ():
            request = sample.get("request") if isinstance(sample, dict) else None
            identifier = request.get("identifier") if isinstance(request, dict) else None
            if isinstance(identifier, str) and 0 < len(identifier) <= _MAX_IDENTIFIER:
                named += 1
                rejections.append(Rejection(identifier, code, _text(sample.get("error_message"), _MAX_MESSAGE)))
        count = error_type.get("error_count")
        if isinstance(count, int) and not isinstance(count, bool) and count > named:
            unnamed[code] = unnamed.get(code, 0) + min(count - named, 1 << 31)
    related = event.get("related_object")
    meter_id = related.get("id") if isinstance(related, dict) else None
    return MeterErrorReport(meter_id if isinstance(meter_id, str) and len(meter_id) <= 255 else None,
                            tuple(rejections), unnamed,
                            _time(data.get("validation_start")), _time(data.get("validation_end")))


async def park_reported(session: AsyncSession, report: MeterErrorReport, *, meters: tuple[str, ...] = ()) -> int:
    """Park the ledger rows the report names; returns how many were parked. Runs in the caller's transaction.

    `meters`: the ledger meters of the report's Stripe meter, when the caller could resolve it. Stripe only
    gives samples of the rejected events (`sample_errors`) with a count per error code; the rest are named by
    nothing but the meter and the validation window. Those are parked too, by that meter and window: a row
    parked that Stripe did accept is visible to an operator (and to `reconcile`), a rejected row left `sent`
    would be unbilled usage nobody sees. Without the meter they cannot be told apart from other meters'
    rows, so they are logged and counted instead (`billing_sync_meter_error_unattributed_total`).
    """
    parked = 0
    for rejection in report.rejections:
        note = f"{PARKED_REASON}: stripe rejected the meter event ({rejection.code}): {rejection.message}"
        result = await session.execute(
            update(LedgerEntry)
            # A row already parked keeps its first reason; a pending row is not sent again.
            .where(LedgerEntry.identifier == rejection.identifier, LedgerEntry.state != "parked")
            .values(state="parked", last_error=note, next_attempt_at=None)
            .execution_options(synchronize_session=False))
        parked += int(result.rowcount or 0)  # type: ignore[attr-defined]
    unnamed = sum(report.unnamed.values())
    if unnamed:
        if meters and report.validation_start is not None and report.validation_end is not None:
            codes = ", ".join(sorted(report.unnamed))
            note = (f"{PARKED_REASON}: stripe rejected {unnamed} unnamed meter event(s) of meter "
                    f"{report.meter_id} validated {report.validation_start.isoformat()} to "
                    f"{report.validation_end.isoformat()} ({codes}); this bucket was sent then")
            result = await session.execute(
                update(LedgerEntry)
                .where(LedgerEntry.meter.in_(meters), LedgerEntry.state == "sent",
                       LedgerEntry.sent_at >= report.validation_start - WINDOW_SLACK,
                       LedgerEntry.sent_at <= report.validation_end)
                .values(state="parked", last_error=note, next_attempt_at=None)
                .execution_options(synchronize_session=False))
            parked += int(result.rowcount or 0)  # type: ignore[attr-defined]
        else:
            log.error("stripe reported %d rejected meter event(s) of meter %s without naming them (%s); "
                      "their buckets stay marked sent: compare with `cosmos-gateway reconcile`",
                      unnamed, report.meter_id, ", ".join(f"{c}: {n}" for c, n in sorted(report.unnamed.items())))
            METER_ERROR_UNATTRIBUTED.inc(unnamed)
    if parked:
        METER_ERROR_PARKED.inc(parked)
    return parked


FetchEvent = Callable[[str], Awaitable[dict[str, Any]]]


class StripeEventFetcher:
    """Reads what a thin event leaves out: the event's data, and its meter's event name."""

    def __init__(self, api_key: str, *, api_base: str | None = None,
                 http_client: stripe.HTTPClient | None = None) -> None:
        bases: Any = {"api": api_base} if api_base else {}
        self._http = http_client or stripe.AIOHTTPClient()
        self._client = stripe.StripeClient(api_key, base_addresses=bases, max_network_retries=0,
                                           http_client=self._http)

    async def aclose(self) -> None:
        await self._http.close_async()

    async def event(self, event_id: str) -> dict[str, Any]:
        """`GET /v2/core/events/{id}`: the full event, data included."""
        event = await self._client.v2.core.events.retrieve_async(event_id)
        return _plain(event)

    async def meter_event_name(self, meter_id: str) -> str | None:
        """`GET /v1/billing/meters/{id}`: the meter's event_name."""
        meter = await self._client.v1.billing.meters.retrieve_async(meter_id)
        name = _plain(meter).get("event_name")
        return name if isinstance(name, str) else None


def _plain(obj: Any) -> dict[str, Any]:
    return obj.to_dict() if hasattr(obj, "to_dict") else dict(obj)


def _text(value: Any, limit: int) -> str:
    return value[:limit] if isinstance(value, str) else ""


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str) or len(value) > 40:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else None
