"""Reconciliation: what the ledger sent to Stripe in a period against Stripe's meter event summaries.

`cosmos-gateway reconcile [--period YYYY-MM]` (PRODUCT.md §1, §8): for every tenant with a Stripe customer and
every billed meter (one with a `stripe_event`), the ledger value is

- counters: the sum of the values of the rows in state "sent" whose bucket starts in [start, end);
- gauges: the value of the latest sent bucket in the period (the Stripe meter's formula is "last"),

and the Stripe value is read from `GET /v1/billing/meters` (paged; event_name → meter id) and
`GET /v1/billing/meters/{id}/event_summaries` over the period, widened to minute boundaries as Stripe requires.
Only differences are returned. Real Stripe computes summaries with a delay, so a very recent period can show
differences that disappear later.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import stripe
from sqlalchemy import Numeric, and_, func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from metering.clock import utc
from metering.meters import Meter
from metering.models import LedgerEntry, Tenant
from metering.periods import period_bounds

SENT = "sent"
# Stripe's maximum page size for list endpoints.
PAGE_SIZE = 100
ZERO = Decimal(0)
_PERIOD = re.compile(r"(\d{4})-(\d{2})")
# The aggregation a Stripe meter needs for the ledger value to be comparable.
EXPECTED_FORMULA = {"counter": "sum", "gauge": "last"}


@dataclass(frozen=True, slots=True)
class Difference:
    """One tenant and billed meter whose ledger value and Stripe value disagree."""

    tenant: str
    customer: str
    meter: str  # the gateway's meter name
    event_name: str  # the Stripe meter's event_name
    ledger: Decimal  # what the ledger sent
    stripe: Decimal  # what Stripe's event summaries hold
    note: str = ""  # e.g. "no Stripe meter with event_name 'x'"
    parked_refund: Decimal = ZERO  # refunds the period could not net (parked, negative): Stripe holds them

    @property
    def delta(self) -> Decimal:
        """ledger - stripe: positive when Stripe has less than was sent."""
        return self.ledger - self.stripe


# ---------------------------------------------------------------------------------------------- period


def parse_period(text: str | None, now: datetime) -> tuple[datetime, datetime]:
    """`"YYYY-MM"` → [first of that month, first of the next) in UTC; None → the calendar month holding `now`.

    Raises ValueError with a message naming the expected format on anything else.
    """
    if text is None:
        return period_bounds(now, None)
    match = _PERIOD.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"period must be YYYY-MM (e.g. 2025-03), got {text!r}")
    year, month = int(match.group(1)), int(match.group(2))
    if not 1 <= month <= 12:
        raise ValueError(f"period must be YYYY-MM with a month 01-12, got {text!r}")
    if year < 1970:
        raise ValueError(f"period must be YYYY-MM with a year from 1970, got {text!r}")
    return period_bounds(datetime(year, month, 1, tzinfo=UTC), None)


def _minute_window(period: tuple[datetime, datetime]) -> tuple[int, int]:
    """Epoch seconds of the period, start floored and end ceiled to whole minutes (Stripe's requirement)."""
    start, end = period
    for name, value in (("start", start), ("end", end)):
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"period {name} must be timezone-aware, got naive {value.isoformat()}")
    if end <= start:
        raise ValueError(f"period end {end.isoformat()} must be after its start {start.isoformat()}")
    return math.floor(start.timestamp() / 60) * 60, math.ceil(end.timestamp() / 60) * 60


# ---------------------------------------------------------------------------------------------- ledger


async def _ledger_values(
    sessions: async_sessionmaker[AsyncSession], meters: Sequence[Meter], period: tuple[datetime, datetime]
) -> tuple[list[tuple[str, str]], dict[tuple[str, str], Decimal]]:
    """(tenants with a Stripe customer as (id, customer), {(tenant, meter name): ledger value})."""
    start, end = period
    counters = [m.name for m in meters if m.kind == "counter"]
    gauges = [m.name for m in meters if m.kind == "gauge"]
    in_period = and_(LedgerEntry.state == SENT, LedgerEntry.bucket_start >= start, LedgerEntry.bucket_start < end)
    # Only what Stripe accepted: pending rows (a dry run's previewed ones too) and parked ones are not counted.
    values: dict[tuple[str, str], Decimal] = {}
    async with sessions() as session:
        tenants = [
            (tenant_id, customer)
            for tenant_id, customer in (
                await session.execute(
                    select(Tenant.id, Tenant.stripe_customer_id)
                    .where(Tenant.stripe_customer_id.is_not(None), Tenant.stripe_customer_id != "")
                    .order_by(Tenant.id)
                )
            ).all()
        ]
        if counters:
            # The explicit type keeps the Numeric result processor: SQLite hands back sums as floats.
            total = func.sum(LedgerEntry.value, type_=Numeric(20, 6))
            rows = await session.execute(
                select(LedgerEntry.tenant_id, LedgerEntry.meter, total)
                .where(in_period, LedgerEntry.meter.in_(counters))
                .group_by(LedgerEntry.tenant_id, LedgerEntry.meter)
            )
            for tenant_id, meter, value in rows.all():
                values[(tenant_id, meter)] = Decimal(value or 0)
        if gauges:
            latest = (
                select(
                    LedgerEntry.tenant_id.label("tenant_id"),
                    LedgerEntry.meter.label("meter"),
                    func.max(LedgerEntry.bucket_start).label("bucket_start"),
                )
                .where(in_period, LedgerEntry.meter.in_(gauges))
                .group_by(LedgerEntry.tenant_id, LedgerEntry.meter)
                .subquery()
            )
            rows = await session.execute(
                select(LedgerEntry.tenant_id, LedgerEntry.meter, LedgerEntry.value).join(
                    latest,
                    and_(
                        LedgerEntry.tenant_id == latest.c.tenant_id,
                        LedgerEntry.meter == latest.c.meter,
                        LedgerEntry.bucket_start == latest.c.bucket_start,
                    ),
                )
            )
            for tenant_id, meter, value in rows.all():
                values[(tenant_id, meter)] = Decimal(value)
    return tenants, values


# ---------------------------------------------------------------------------------------------- Stripe


async def _parked_refunds(sessions: async_sessionmaker[AsyncSession], meters: Sequence[Meter],
                          period: tuple[datetime, datetime]) -> dict[tuple[str, str], Decimal]:
    """{(tenant, meter): units} of the refunds that could not be netted within the period (negative, parked)."""
    start, end = period
    total = func.sum(LedgerEntry.value, type_=Numeric(20, 6))
    async with sessions() as session:
        rows = await session.execute(
            select(LedgerEntry.tenant_id, LedgerEntry.meter, total)
            .where(LedgerEntry.state == "parked", LedgerEntry.value < 0, LedgerEntry.bucket_start >= start,
                   LedgerEntry.bucket_start < end, LedgerEntry.meter.in_([m.name for m in meters]))
            .group_by(LedgerEntry.tenant_id, LedgerEntry.meter))
        return {(tenant, meter): Decimal(value or 0) for tenant, meter, value in rows.all()}


async def _stripe_meters(client: stripe.StripeClient, page_size: int) -> dict[str, Any]:
    """event_name → Stripe meter, every page of `GET /v1/billing/meters`; an active meter wins over others."""
    found: dict[str, Any] = {}
    params: dict[str, Any] = {"limit": page_size}
    while True:
        page = await client.v1.billing.meters.list_async(params=params)  # type: ignore[arg-type]
        for meter in page.data:
            current = found.get(meter.event_name)
            if current is None or (current.status != "active" and meter.status == "active"):
                found[meter.event_name] = meter
        if not page.has_more or not page.data:
            return found
        params = {"limit": page_size, "starting_after": page.data[-1].id}


async def _stripe_value(
    client: stripe.StripeClient, meter_id: str, customer: str, window: tuple[int, int], kind: str, page_size: int
) -> Decimal:
    """The customer's aggregate over `window`: the sum of the summaries (counters) or the latest one (gauges)."""
    summaries: list[Any] = []
    params: dict[str, Any] = {
        "customer": customer,
        "start_time": window[0],
        "end_time": window[1],
        "limit": page_size,
    }
    while True:
        page = await client.v1.billing.meters.event_summaries.list_async(meter_id, params=params)  # type: ignore[arg-type]
        summaries.extend(page.data)
        if not page.has_more or not page.data:
            break
        params = {**params, "starting_after": page.data[-1].id}
    if not summaries:
        return ZERO
    if kind == "gauge":
        # "last" per summary window: the newest window holds the value in force at the end of the period.
        # Without value_grouping_window there is a single summary anyway.
        return _decimal(max(summaries, key=lambda s: s.start_time).aggregated_value)
    return sum((_decimal(s.aggregated_value) for s in summaries), ZERO)


def _decimal(value: Any) -> Decimal:
    # JSON numbers arrive as int or float; str() gives the shortest repr, not the binary expansion.
    return Decimal(str(value)) if value is not None else ZERO


class WindowCheck:
    """What Stripe holds for one bucket, read from its event summaries (PRODUCT.md §8).

    Stripe forgets an identifier after 24 h; a bucket sent longer ago whose answer was lost is compared
    with the summary of its window before it is sent again. The window is the bucket widened to whole
    minutes, so the ledger's sent rows of that window are taken off what Stripe holds there.
    """

    def __init__(self, client: stripe.StripeClient, sessions: async_sessionmaker[AsyncSession],
                 bucket_seconds: int) -> None:
        self._client = client
        self._sessions = sessions
        self._bucket_seconds = bucket_seconds
        self._meters: dict[str, Any] | None = None

    async def unaccounted(self, row: Any, event_name: str, customer: str) -> Decimal | None:
        """Stripe's sum in the bucket's window minus the ledger's sent rows there; None: no such Stripe meter.

        `row` is a ledger row, or a result row with its `tenant_id`, `meter` and `bucket_start`."""
        if self._meters is None or event_name not in self._meters:
            self._meters = await _stripe_meters(self._client, PAGE_SIZE)
        remote = self._meters.get(event_name)
        if remote is None:
            return None
        start = int(row.bucket_start.timestamp())
        window = (start // 60 * 60, math.ceil((start + self._bucket_seconds) / 60) * 60)
        held = await _stripe_value(self._client, remote.id, customer, window, "counter", PAGE_SIZE)
        bounds = (utc(window[0]), utc(window[1]))
        async with self._sessions() as session:
            sent = await session.scalar(select(func.sum(LedgerEntry.value, type_=Numeric(20, 6))).where(
                LedgerEntry.tenant_id == row.tenant_id, LedgerEntry.meter == row.meter, LedgerEntry.state == SENT,
                LedgerEntry.bucket_start >= bounds[0], LedgerEntry.bucket_start < bounds[1]))
        return held - Decimal(sent or 0)


# ---------------------------------------------------------------------------------------------- reconcile


async def reconcile(
    *,
    sessions: async_sessionmaker[AsyncSession],
    client: stripe.StripeClient,
    meters: Sequence[Meter],
    period: tuple[datetime, datetime],
    page_size: int = PAGE_SIZE,
) -> list[Difference]:
    """Differences between the ledger's sent usage and Stripe's summaries, for every tenant with a Stripe
    customer and every billed meter, in tenant then meter order. An empty list means everything agrees.

    A billed meter with no Stripe meter of its event_name is a difference for every tenant (Stripe value 0,
    with a note); Stripe errors propagate (`stripe.StripeError`).
    """
    if not 1 <= page_size <= PAGE_SIZE:
        raise ValueError(f"page_size must be 1-{PAGE_SIZE}, got {page_size!r}")
    window = _minute_window(period)
    billed = [m for m in meters if m.stripe_event is not None]
    if not billed:
        return []
    tenants, ledger = await _ledger_values(sessions, billed, period)
    if not tenants:
        return []
    refunds = await _parked_refunds(sessions, billed, period)
    stripe_meters = await _stripe_meters(client, page_size)

    differences: list[Difference] = []
    for tenant_id, customer in tenants:
        for meter in billed:
            event_name = meter.stripe_event
            assert event_name is not None
            sent = ledger.get((tenant_id, meter.name), ZERO)
            remote = stripe_meters.get(event_name)
            if remote is None:
                # Reported even when nothing was sent: usage of this meter could never be billed.
                note = f"no Stripe meter with event_name {event_name!r}"
                differences.append(Difference(tenant_id, customer, meter.name, event_name, sent, ZERO, note=note))
                continue
            held = await _stripe_value(client, remote.id, customer, window, meter.kind, page_size)
            refund = refunds.get((tenant_id, meter.name), ZERO)
            if refund:
                # Stripe holds these units and the customer was refunded them: billed once too often.
                note = f"{_number(-refund)} refunded units could not be netted in the period (parked)"
                differences.append(Difference(tenant_id, customer, meter.name, event_name, sent, held, note, refund))
                continue
            if held == sent:
                continue
            note = ""
            formula = _formula(remote)
            expected = EXPECTED_FORMULA[meter.kind]
            if formula is not None and formula != expected:
                note = f"Stripe meter {remote.id} aggregates with {formula!r}, a {meter.kind} needs {expected!r}"
            differences.append(Difference(tenant_id, customer, meter.name, event_name, sent, held, note=note))
    return differences


def _formula(remote: Any) -> str | None:
    try:
        return str(remote.default_aggregation.formula)
    except (AttributeError, KeyError):
        return None


# ---------------------------------------------------------------------------------------------- output


def _number(value: Decimal) -> str:
    text = f"{value.normalize():f}"
    return "0" if text in ("-0", "") else text


def format_differences(diffs: Sequence[Difference]) -> str:
    """A plain-text table (tenant, customer, meter, ledger, stripe, note), or one summary line when none."""
    if not diffs:
        return "No differences: the ledger and Stripe agree for every tenant and billed meter."
    headers = ("tenant", "customer", "meter", "ledger", "stripe", "note")
    rows = [
        (d.tenant, d.customer, d.meter, _number(d.ledger), _number(d.stripe), d.note)
        for d in diffs
    ]
    if not any(row[-1] for row in rows):
        headers = headers[:-1]
        rows = [row[:-1] for row in rows]
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=False)]
    numeric = {3, 4}

    def line(cells: Sequence[str]) -> str:
        parts = [
            cell.rjust(width) if i in numeric else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    out.extend(line(row) for row in rows)
    noun = "difference" if len(diffs) == 1 else "differences"
    out.append(f"{len(diffs)} {noun} between the ledger and Stripe.")
    return "\n".join(out)
