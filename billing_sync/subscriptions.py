"""What a Stripe webhook delivery does (PRODUCT.md §8), apart from HTTP: the gateway's
`gateway/proxy/stripe_webhook.py` reads the request, calls `StripeEventProcessor.receive` and answers.

    events = StripeEventProcessor(secret=settings.billing.stripe_webhook_secrets, sessions=sessions,
                                  plans_by_lookup_key=..., known_plans=plans)
    received = await events.receive(body, request.headers.getall("Stripe-Signature", ()))
    # received.answer: the JSON answer; received.tenant: the tenant whose row changed, to announce

The `Stripe-Signature` header is checked over the raw body with stripe's own verifier, against each configured
secret (two while Stripe rolls the endpoint's secret: either one verifies); the 5-minute
tolerance is measured with the injected clock. Each event id is recorded in `stripe_events` in the same
transaction as the tenant change, so a redelivery changes nothing, and an event older than the newest one
applied to the tenant is recorded and skipped. The caller announces the changed tenant after the commit:
the limiter answers 402 `subscription-inactive` at once for a canceled subscription.

Order and binding are a compare-and-set, real on SQLite too (metering.tenant_rows): the tenant row is
read, the change decided, and written only while the row is unchanged; when another delivery or an
operator changed the row meanwhile, nothing is written and the delivery is decided again from the new
row. A tenant already bound to a Stripe customer is never moved to another one by an event (PRODUCT.md
§8): the event is acknowledged, logged and counted
(`billing_sync_webhook_refused_total{reason="bound_to_other_customer"}`). A past-due subscription's
grace counts from `past_due_since`, the event that made it past due, kept across later events.

`v1.billing.meter.error_report_triggered` (a v2 event: Stripe's asynchronous rejections of meter events
sent on the v2 stream) parks the rejected buckets with Stripe's reason: billing_sync.meter_errors.

Answers: every signed, well-formed event is received (2xx), including those we cannot use (Stripe retries
anything else for days); WebhookRefused (400) for unsigned or malformed bodies and for a Stripe-Signature
header that is not one (any bytes: non-ASCII, Unicode digits, numbers of any size); WebhookRefused (503)
when no secret is configured. A SQL store that is down raises its driver's error (the caller reads it
with metering.sql_errors.store_unavailable); SQLite's "database is locked" is retried a few times first.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import stripe
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from billing_sync import meter_errors
from billing_sync.metrics import SyncMetrics
from billing_sync.stripe_events import (
    SUBSCRIPTION_EVENTS,
    Event,
    Subscription,
    WebhookRefused,
    invalid,
    not_configured,
    parse_event,
    parse_subscription,
    verify_signature,
)
from metering.clock import Clock, system_clock, utc, utcnow
from metering.errors import ConfigError, kind_of
from metering.keys import TENANT_ID
from metering.models import StripeEvent, Tenant
from metering.sql_errors import retry_transaction
from metering.tenant_rows import RowChanged, write_tenant

log = logging.getLogger("cosmos_gateway.webhooks")
_T = TypeVar("_T")

ACTOR = "stripe"
NEW_TENANT_PLAN = "starter"
# What an audit entry of a Stripe event shows of the tenant.
AUDITED = ("plan", "status", "subscription_status", "stripe_customer_id", "stripe_subscription_id")
# A subscription in one of these states never becomes active again (Stripe creates a new one instead).
_TERMINAL = frozenset({"canceled", "incomplete_expired"})
_MAX_CONFLICTS = 8  # compare-and-set rounds lost to concurrent writers before giving up with a 503
_REFUSED_REASONS = {"tenant bound to another customer": "bound_to_other_customer", "no tenant": "no_tenant",
                    "invalid tenant id": "invalid_tenant_id",
                    "several tenants share the customer": "customer_shared_by_tenants"}


@dataclass(frozen=True, slots=True)
class Received:
    """A delivery taken: the JSON answer, and the tenant whose row it changed (to announce), if any."""

    answer: dict[str, Any]
    tenant: str | None = None


class StripeEventProcessor:
    """Stripe's subscription events and meter error reports, verified, applied once each, in order.

    `event_fetcher` (a meter_errors.StripeEventFetcher, needs the Stripe API key) reads the data of thin
    v2 events; `meters_by_event_name` maps a Stripe meter's event_name to the ledger's meter names.
    """

    def __init__(self, *, secret: str | Sequence[str] | None, sessions: async_sessionmaker[AsyncSession],
                 plans_by_lookup_key: Mapping[str, str], known_plans: Collection[str], tolerance: int = 300,
                 clock: Clock = system_clock, event_fetcher: meter_errors.StripeEventFetcher | None = None,
                 meters_by_event_name: Mapping[str, Sequence[str]] | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        # One secret, or several while Stripe rolls the endpoint's secret; empty ones are none at all.
        self._secrets = tuple(s for s in ((secret,) if isinstance(secret, str) else secret or ()) if s)
        self._sessions = sessions
        self._plans_by_lookup_key = _check_lookup_keys(plans_by_lookup_key, known_plans)
        self._tolerance = tolerance
        self._clock = clock
        self._fetcher = event_fetcher
        self._meters_by_event_name = {k: tuple(v) for k, v in (meters_by_event_name or {}).items()}
        self._sleep = sleep

    def require_secret(self) -> tuple[str, ...]:
        """The webhook secrets; without one every delivery is refused with a 503 (Stripe retries for days)."""
        if not self._secrets:
            raise not_configured("no Stripe webhook secret is configured (STRIPE_WEBHOOK_SECRET)")
        return self._secrets

    async def receive(self, body: bytes, signatures: Collection[str]) -> Received:
        """Verify the raw `body` against its `Stripe-Signature` header values and apply its event."""
        secrets = self.require_secret()
        try:
            payload = body.decode("utf-8")  # Stripe signs the UTF-8 text
        except UnicodeDecodeError:
            raise invalid("body", "not UTF-8") from None
        if len(signatures) != 1:
            raise invalid("Stripe-Signature", "exactly one signature header is required")
        verify_signature(payload, next(iter(signatures)), secrets, now=self._clock(), tolerance=self._tolerance)
        event = parse_event(payload)
        if event.type == meter_errors.EVENT_TYPE and event.v2:
            return Received(await self._meter_error_report(event))
        subscription = parse_subscription(event) if event.type in SUBSCRIPTION_EVENTS else None
        return await self._retrying(lambda: self._record(event, subscription))

    async def _retrying(self, attempt: Callable[[], Awaitable[_T]]) -> _T:
        # A concurrent delivery of the same event, a concurrent creation of the same tenant, or a
        # concurrent change of its row: once again, the other transaction's row is now visible.
        return await retry_transaction(attempt, conflicts=(IntegrityError, RowChanged), max_rounds=_MAX_CONFLICTS,
                                       label="stripe webhook", sleep=self._sleep)

    async def _record(self, event: Event, subscription: Subscription | None) -> Received:
        """Apply the event in one transaction with its id; the answer, and the tenant to announce."""
        now = utcnow(self._clock)
        async with self._sessions() as session, session.begin():
            if await session.get(StripeEvent, event.id) is not None:
                return Received({"received": True, "duplicate": True})
            if subscription is None:
                session.add(StripeEvent(id=event.id, type=event.type, received_at=now))
                return Received({"received": True, "ignored": event.type})
            tenant_id, row, unusable = await self._find_tenant(session, subscription)
            if unusable is not None:
                # Not recorded: once the tenant is linked, a resend from the Stripe dashboard applies it.
                log.warning("stripe webhook %s (%s): %s; subscription %s, customer %s, tenant %s", event.id,
                            event.type, unusable, subscription.id, subscription.customer_id, tenant_id or "-")
                SyncMetrics.webhook_refused(_REFUSED_REASONS.get(unusable, "other"))
                return Received({"received": True, "ignored": unusable})
            session.add(StripeEvent(id=event.id, type=event.type, received_at=now))
            at = utc(event.created)
            if row is not None and _is_stale(row, subscription, at):
                log.info("stripe webhook %s: older than the state of tenant %s; skipped", event.id, tenant_id)
                return Received({"received": True, "stale": True})
            if (row is not None and row.stripe_subscription_id not in (None, subscription.id)
                    and subscription.status in _TERMINAL):
                # The end of a replaced subscription (e.g. after a switch to a new one) says nothing of the tenant.
                return Received({"received": True, "ignored": "not the tenant's current subscription"})
            plan = self._plan_for(event, subscription)
            values: dict[str, Any] = {
                "subscription_status": subscription.status, "stripe_customer_id": subscription.customer_id,
                "stripe_subscription_id": subscription.id, "stripe_event_at": at,
                "past_due_since": _past_due_since(row, subscription, at),
                "updated_at": now,  # always: other instances reload what moved since their watermark
            }
            if plan is not None:
                values["plan"] = plan
            # A compare-and-set against the row read above (RowChanged: decided again); a new tenant
            # starts active on the starter plan unless a lookup key names another.
            change = await write_tenant(session, tenant_id, values, audited=AUDITED, actor=ACTOR,
                                        action=f"stripe.{event.type}", at=now, updated_at=now,
                                        defaults={"plan": NEW_TENANT_PLAN}, expected=row)
            return Received({"received": True, "tenant": tenant_id, "plan": change.after["plan"],
                             "subscription_status": change.after["subscription_status"]}, tenant_id)

    async def _find_tenant(self, session: AsyncSession,
                           subscription: Subscription) -> tuple[str, Tenant | None, str | None]:
        """(tenant id, its locked row or None, None) or (tenant id or "", None, why the event cannot be used)."""
        if subscription.tenant_id is not None:
            tenant_id = subscription.tenant_id
            if not isinstance(tenant_id, str) or not TENANT_ID.fullmatch(tenant_id):
                return "", None, "invalid tenant id"
            row = await session.get(Tenant, tenant_id, with_for_update=True, populate_existing=True)
            if row is not None and row.stripe_customer_id not in (None, subscription.customer_id):
                # Bound to another customer (by an operator or an earlier event): metadata is writable by
                # anyone with access to the Stripe account, and another customer's unpaid subscription must
                # not cut off a paying tenant. Rebinding is an operator's PUT of stripe_customer_id.
                return tenant_id, None, "tenant bound to another customer"
            return tenant_id, row, None
        rows = list((await session.scalars(
            select(Tenant).where(Tenant.stripe_customer_id == subscription.customer_id)
            .order_by(Tenant.id).limit(2).with_for_update().execution_options(populate_existing=True))).all())
        if not rows:
            return "", None, "no tenant"
        if len(rows) > 1:
            return "", None, "several tenants share the customer"
        return rows[0].id, rows[0], None

    def _plan_for(self, event: Event, subscription: Subscription) -> str | None:
        for key in subscription.lookup_keys:
            plan = self._plans_by_lookup_key.get(key)
            if plan is not None:
                return plan
        log.warning("stripe webhook %s: no price lookup key of subscription %s is in "
                    "billing.stripe.plans_by_lookup_key (%s); the plan is kept", event.id, subscription.id,
                    ", ".join(subscription.lookup_keys) or "none")
        return None

    async def _meter_error_report(self, event: Event) -> dict[str, Any]:
        """Park the buckets of the meter events Stripe rejected after accepting them, once per event id."""
        body: dict[str, Any] = event.object
        meters: tuple[str, ...] = ()
        if not meter_errors.has_data(body) or self._fetcher is not None:
            body, meters = await self._fetch_report(event, body)
        try:
            report = meter_errors.parse_report(body)
        except meter_errors.ReportUnreadable as exc:
            raise invalid(exc.field, exc.message) from None

        async def attempt() -> dict[str, Any]:
            now = utcnow(self._clock)
            async with self._sessions() as session, session.begin():
                if await session.get(StripeEvent, event.id) is not None:
                    return {"received": True, "duplicate": True}
                session.add(StripeEvent(id=event.id, type=event.type, received_at=now))
                parked = await meter_errors.park_reported(session, report, meters=meters)
            return {"received": True, "parked": parked}

        answer = await self._retrying(attempt)
        if answer.get("parked"):
            log.warning("stripe webhook %s: stripe rejected meter events of meter %s; %d bucket(s) parked",
                        event.id, report.meter_id, answer["parked"])
        return answer

    async def _fetch_report(self, event: Event, body: dict[str, Any]) -> tuple[dict[str, Any], tuple[str, ...]]:
        """The full event (a thin one carries no data) and the ledger meters of its Stripe meter."""
        if self._fetcher is None:
            # Acknowledging would lose the report; Stripe retries for days while the key is configured.
            raise not_configured(f"{event.type} is a thin event: reading its data needs the Stripe API key")
        try:
            if not meter_errors.has_data(body):
                body = await self._fetcher.event(event.id)
            related = body.get("related_object")
            meter_id = related.get("id") if isinstance(related, dict) else None
            name = await self._fetcher.meter_event_name(meter_id) if isinstance(meter_id, str) else None
        except stripe.StripeError as exc:
            log.warning("stripe webhook %s: could not read the event or its meter from Stripe: %r", event.id, exc)
            raise WebhookRefused(503, "stripe-unavailable", "Stripe unavailable",
                                 "the event's data could not be read from Stripe; retry later") from None
        return body, self._meters_by_event_name.get(name, ()) if name is not None else ()


def _past_due_since(row: Tenant | None, subscription: Subscription, at: datetime) -> datetime | None:
    """When the subscription became past due: kept from the row while the same subscription stays past due."""
    if subscription.status != "past_due":
        return None
    if (row is not None and row.subscription_status == "past_due"
            and row.stripe_subscription_id == subscription.id):
        # A row written before past_due_since existed: past due at least since its last event.
        return row.past_due_since or row.stripe_event_at or at
    return at


def _is_stale(row: Tenant, subscription: Subscription, at: datetime) -> bool:
    applied = row.stripe_event_at
    if applied is None:
        return False
    if at < applied:
        return True
    # Same second (Stripe's resolution): later arrival wins, except that an ended subscription stays ended.
    return (at == applied and row.stripe_subscription_id == subscription.id
            and row.subscription_status in _TERMINAL)


def _check_lookup_keys(mapping: Any, known_plans: Collection[str]) -> dict[str, str]:
    key = "billing.stripe.plans_by_lookup_key"
    if not isinstance(mapping, Mapping):
        raise ConfigError(key, f"expected a mapping, got {kind_of(mapping)}")
    for lookup_key, plan in mapping.items():
        if not isinstance(plan, str) or plan not in known_plans:
            raise ConfigError(f"{key}.{lookup_key}", f"names no known plan ({kind_of(plan)}; "
                                     f"known: {', '.join(sorted(known_plans))})")
    return dict(mapping)
