"""Stripe subscription webhooks, `POST /_gateway/webhooks/stripe` on the proxy listener (PRODUCT.md §8).

    webhooks = StripeWebhooks(secret=settings.billing.stripe_webhook_secret, sessions=sessions,
                              directory=directory, plans_by_lookup_key=..., known_plans=plans)
    OwnEndpoints(..., stripe_webhook=webhooks.handle)

The `Stripe-Signature` header is checked over the raw body with stripe's own verifier; the 5-minute
tolerance is measured with the injected clock. Each event id is recorded in `stripe_events` in the same
transaction as the tenant change, so a redelivery changes nothing, and an event older than the newest one
applied to the tenant is recorded and skipped. After the commit the tenant is announced through the
TenantDirectory: the limiter answers 402 `subscription-inactive` at once for a canceled subscription.

Order and binding are a compare-and-set, real on SQLite too (where `FOR UPDATE` is a no-op): the tenant
row is read, the change decided, and written by `UPDATE ... WHERE <the columns read are unchanged>`; when
another delivery or an operator changed the row meanwhile, nothing is written and the delivery is
decided again from the new row. A tenant already bound to a Stripe customer is never moved to another
one by an event (PRODUCT.md §8): the event is acknowledged, logged and counted
(`billing_sync_webhook_refused_total{reason="bound_to_other_customer"}`). A past-due subscription's
grace counts from `past_due_since`, the event that made it past due, kept across later events.

`v1.billing.meter.error_report_triggered` (a v2 event: Stripe's asynchronous rejections of meter events
sent on the v2 stream) parks the rejected buckets with Stripe's reason: billing_sync.meter_errors.

Answers: 2xx for every signed, well-formed event, including those we cannot use (Stripe retries anything
else for days); 400 for unsigned or malformed bodies and for a Stripe-Signature header that is not one
(any bytes: non-ASCII, Unicode digits, numbers of any size); 413 above 1 MiB; 503 when no secret is
configured or the SQL store is down or restarting (Stripe retries later): SQLite's "database is locked"
is retried a few times first.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sqlite3
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import stripe
from aiohttp import web
from sqlalchemy import ColumnElement, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from billing_sync import meter_errors
from billing_sync.metrics import SyncMetrics
from metering.errors import ConfigurationError, kind_of
from metering.models import AuditEntry, StripeEvent, Tenant
from quota.tenants import TenantDirectory

log = logging.getLogger("cosmos_gateway.webhooks")

MAX_BODY_BYTES = 1 << 20
SUBSCRIPTION_EVENTS = frozenset({
    "customer.subscription.created", "customer.subscription.updated", "customer.subscription.deleted"})
ACTOR = "stripe"
NEW_TENANT_PLAN = "starter"
DEFAULT_TYPE_BASE = "https://docs.cosmosbuilder.io/gateway/problems/"
PROBLEM_JSON = "application/problem+json"
_TENANT_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
# A subscription in one of these states never becomes active again (Stripe creates a new one instead).
_TERMINAL = frozenset({"canceled", "incomplete_expired"})
# SQLSTATE classes of a server that is away, not of a query that is wrong: 08 connection exception,
# 53 insufficient resources, 57 operator intervention (57P01 admin shutdown, 57P03 cannot connect now),
# 58 system error; and 40001/40P01, a serialization failure or deadlock that a retry resolves.
_UNAVAILABLE_SQLSTATE_CLASSES = ("08", "53", "57", "58")
_TRANSIENT_SQLSTATES = ("40001", "40P01")
# Delays before trying again after SQLite's "database is locked" (its busy_timeout already waited).
LOCKED_RETRY_DELAYS = (0.05, 0.2, 0.5)
_MAX_CONFLICTS = 8  # compare-and-set rounds lost to concurrent writers before giving up with a 503
_MAX_ID = 255  # the width of the Stripe id columns
_MAX_TIMESTAMP = 253_402_300_799  # 9999-12-31T23:59:59Z, the last second a datetime can hold
_MAX_SIGNATURE_HEADER = 4096
_SIGNATURE_TIME = re.compile(r"[0-9]{1,12}")
_SIGNATURE_V1 = re.compile(r"[0-9a-f]{64}")  # a hex HMAC-SHA256, as Stripe writes it


def store_unavailable(exc: BaseException) -> bool:
    """Whether `exc` means the SQL store is unreachable or restarting (answer 503, try later), not a bug.

    The one place that reads the drivers' errors: OSError and TimeoutError (connecting), SQLAlchemy's
    OperationalError and InterfaceError (SQLite, a closed connection), and PostgreSQL's errors during a
    restart, which SQLAlchemy wraps as a plain DBAPIError (asyncpg's AdminShutdownError, 57P01) or which
    asyncpg raises unwrapped while connecting (CannotConnectNowError, 57P03; ConnectionDoesNotExistError).
    """
    if isinstance(exc, OSError | TimeoutError | OperationalError | InterfaceError):
        return True
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return True
        exc = exc.orig if exc.orig is not None else exc
    sqlstate = getattr(exc, "sqlstate", None)
    if isinstance(sqlstate, str):
        return sqlstate.startswith(_UNAVAILABLE_SQLSTATE_CLASSES) or sqlstate in _TRANSIENT_SQLSTATES
    # asyncpg's client-side errors (a connection closed under a query) carry no SQLSTATE.
    module = type(exc).__module__
    return module.startswith("asyncpg") and type(exc).__name__ in (
        "ConnectionDoesNotExistError", "InterfaceError", "InternalClientError", "ConnectionFailureError")


def _database_locked(exc: BaseException) -> bool:
    """SQLite's "database is locked": another writer held the file past busy_timeout; worth another try."""
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    return isinstance(orig, sqlite3.OperationalError) and "locked" in str(orig)


class _Conflict(Exception):
    """The tenant row changed between our read and our write: decide again from the new row."""


class _Problem(Exception):
    """An answer other than 2xx, as problem+json. Kept here: billing_sync does not import the gateway."""

    def __init__(self, status: int, suffix: str, title: str, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status, self.suffix, self.title, self.detail, self.extra = status, suffix, title, detail, extra

    def response(self, type_base: str) -> web.Response:
        body = {"type": type_base + self.suffix, "title": self.title, "status": self.status,
                "detail": self.detail, **self.extra}
        return web.Response(status=self.status, body=json.dumps(body, separators=(",", ":")).encode(),
                            content_type=PROBLEM_JSON)


def _invalid(field: str, message: str) -> _Problem:
    return _Problem(400, "invalid-request", "Invalid request", f"{field}: {message}",
                    errors=[{"field": field, "message": message}])


@dataclass(frozen=True, slots=True)
class Event:
    """The envelope of a Stripe event: what every type has.

    `object` is `data.object` of a v1 (snapshot) event; of a v2 event (`"object": "v2.core.event"`,
    whose `created` is an RFC 3339 string) it is the whole event: its `data` and `related_object`.
    """

    id: str
    type: str
    created: int
    object: Any
    v2: bool = False


@dataclass(frozen=True, slots=True)
class Subscription:
    """What a `customer.subscription.*` event says about the subscription."""

    id: str
    customer_id: str
    status: str
    lookup_keys: tuple[str, ...]
    tenant_id: Any  # metadata.tenant_id of the subscription, else of an expanded customer; unchecked


def parse_event(payload: str) -> Event:
    """The event envelope of a webhook body; raises a 400 problem naming the bad field."""
    try:
        data = json.loads(payload)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        raise _invalid("body", "not valid JSON") from None
    if not isinstance(data, dict):
        raise _invalid("body", "not a JSON object")
    event_id, event_type, created = data.get("id"), data.get("type"), data.get("created")
    if not isinstance(event_id, str) or not 0 < len(event_id) <= _MAX_ID:
        raise _invalid("id", "must be a non-empty string")
    if not isinstance(event_type, str) or not 0 < len(event_type) <= 128:
        raise _invalid("type", "must be a non-empty string")
    if data.get("object") == "v2.core.event":
        return Event(event_id, event_type, _v2_created(created), data, v2=True)
    if not isinstance(created, int) or isinstance(created, bool) or not 0 <= created <= _MAX_TIMESTAMP:
        raise _invalid("created", "must be a Unix timestamp")
    inner = data.get("data")
    return Event(event_id, event_type, created, inner.get("object") if isinstance(inner, dict) else None)


def _v2_created(created: Any) -> int:
    """A v2 event's `created` ("2024-09-26T17:46:22.134Z") as a Unix timestamp."""
    parsed = None
    if isinstance(created, str) and len(created) <= 40:
        try:
            parsed = datetime.fromisoformat(created.replace("Z", "+00:00"))
        except ValueError:
            parsed = None
    if parsed is None or parsed.tzinfo is None:
        raise _invalid("created", "must be an RFC 3339 time with a zone")
    return int(parsed.timestamp())


def parse_subscription(event: Event) -> Subscription:
    """The subscription carried by a `customer.subscription.*` event; raises a 400 problem if it is unusable."""
    obj = event.object
    if not isinstance(obj, dict):
        raise _invalid("data.object", "must be a subscription object")
    sub_id, status, customer = obj.get("id"), obj.get("status"), obj.get("customer")
    if not isinstance(sub_id, str) or not 0 < len(sub_id) <= _MAX_ID:
        raise _invalid("data.object.id", "must be a subscription id")
    # The customer is an id, or the customer object when the sender expanded it.
    customer_metadata = customer.get("metadata") if isinstance(customer, dict) else None
    customer_id = customer.get("id") if isinstance(customer, dict) else customer
    if not isinstance(customer_id, str) or not 0 < len(customer_id) <= _MAX_ID:
        raise _invalid("data.object.customer", "must be a customer id")
    if event.type == "customer.subscription.deleted":
        status = "canceled"
    if not isinstance(status, str) or not 0 < len(status) <= 32:
        raise _invalid("data.object.status", "must be a subscription status")
    tenant_id = _metadata(obj.get("metadata"))
    if tenant_id is None:
        tenant_id = _metadata(customer_metadata)
    return Subscription(sub_id, customer_id, status, _lookup_keys(obj.get("items")), tenant_id)


def _metadata(metadata: Any) -> Any:
    # Stripe cannot store an empty metadata value; treat one like an absent key.
    value = metadata.get("tenant_id") if isinstance(metadata, dict) else None
    return None if value in (None, "") else value


def _lookup_keys(items: Any) -> tuple[str, ...]:
    rows = items.get("data") if isinstance(items, dict) else None
    keys = []
    for item in rows if isinstance(rows, list) else ():
        price = item.get("price") if isinstance(item, dict) else None
        key = price.get("lookup_key") if isinstance(price, dict) else None
        if isinstance(key, str):
            keys.append(key)
    return tuple(keys)


def _state(tenant: Tenant) -> dict[str, Any]:
    return {"plan": tenant.plan, "status": tenant.status, "subscription_status": tenant.subscription_status,
            "stripe_customer_id": tenant.stripe_customer_id,
            "stripe_subscription_id": tenant.stripe_subscription_id}


def verify_signature(payload: str, header: str, secret: str, *, now: float, tolerance: int) -> None:
    """Raise a 400 problem unless the Stripe-Signature `header` signs `payload` with `secret`, at most
    `tolerance` seconds before `now`.

    The header is client input: it is parsed here first (visible ASCII, `t=<digits>`, `v1=<64 hex>`),
    and only its well-formed parts, rebuilt, reach stripe's verifier, whose own parser would take
    Unicode digits or a 5,000-digit `t`, and whose comparison raises TypeError for non-ASCII text.
    """
    timestamp, signatures = _parse_signature(header)
    canonical = ",".join([f"t={timestamp}", *(f"v1={signature}" for signature in signatures)])
    try:
        # Tolerance None: stripe would measure the age with time.time(); ours uses the injected clock.
        stripe.WebhookSignature.verify_header(payload, canonical, secret, tolerance=None)
    except (stripe.SignatureVerificationError, ValueError, TypeError):
        raise _invalid("Stripe-Signature", "does not match the body and the webhook secret") from None
    if timestamp < now - tolerance:
        raise _invalid("Stripe-Signature", f"signed more than {tolerance} seconds ago")


def _parse_signature(header: str) -> tuple[int, list[str]]:
    """The timestamp and the v1 signatures of a Stripe-Signature header; a 400 problem if it has none."""
    if len(header) > _MAX_SIGNATURE_HEADER or not header.isascii() or not header.isprintable():
        raise _invalid("Stripe-Signature", "is not a Stripe signature header (visible ASCII, at most 4 KiB)")
    timestamp: int | None = None
    signatures: list[str] = []
    for part in header.split(","):
        name, _, value = part.partition("=")
        if name == "t" and timestamp is None and _SIGNATURE_TIME.fullmatch(value):
            timestamp = int(value)
        elif name == "v1" and _SIGNATURE_V1.fullmatch(value):
            signatures.append(value)
    if timestamp is None or not signatures:
        raise _invalid("Stripe-Signature", "is not a Stripe signature header (t=<unix time>,v1=<hex signature>)")
    return timestamp, signatures


class StripeWebhooks:
    """The aiohttp handler of Stripe's subscription events; `handle` is what OwnEndpoints calls.

    `event_fetcher` (a meter_errors.StripeEventFetcher, needs the Stripe API key) reads the data of thin
    v2 events; `meters_by_event_name` maps a Stripe meter's event_name to the ledger's meter names.
    """

    def __init__(self, *, secret: str | None, sessions: async_sessionmaker[AsyncSession],
                 directory: TenantDirectory, plans_by_lookup_key: Mapping[str, str], known_plans: Collection[str],
                 tolerance: int = 300, clock: Callable[[], float] = time.time,
                 problem_type_base: str = DEFAULT_TYPE_BASE,
                 event_fetcher: meter_errors.StripeEventFetcher | None = None,
                 meters_by_event_name: Mapping[str, Sequence[str]] | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self._secret = secret or None
        self._sessions = sessions
        self._directory = directory
        self._plans_by_lookup_key = _check_lookup_keys(plans_by_lookup_key, known_plans)
        self._tolerance = tolerance
        self._clock = clock
        self._type_base = problem_type_base
        self._fetcher = event_fetcher
        self._meters_by_event_name = {k: tuple(v) for k, v in (meters_by_event_name or {}).items()}
        self._sleep = sleep

    async def handle(self, request: web.BaseRequest) -> web.Response:
        try:
            if self._secret is None:
                raise _Problem(503, "webhooks-not-configured", "Webhooks not configured",
                               "no Stripe webhook secret is configured (STRIPE_WEBHOOK_SECRET)")
            payload = await _read_body(request)
            self._verify(payload, request.headers.getall("Stripe-Signature", ()))
            event = parse_event(payload)
            if event.type == meter_errors.EVENT_TYPE and event.v2:
                return web.json_response(await self._meter_error_report(event))
            subscription = parse_subscription(event) if event.type in SUBSCRIPTION_EVENTS else None
            answer, tenant = await self._retrying(lambda: self._record(event, subscription))
        except _Problem as problem:
            return problem.response(self._type_base)
        except Exception as exc:
            if not store_unavailable(exc):
                raise
            log.exception("stripe webhook: the SQL store failed; Stripe will retry")
            return _Problem(503, "database-unavailable", "Database unavailable",
                            "the SQL store is unavailable").response(self._type_base)
        if tenant is not None:
            try:
                await self._directory.announce(tenant)
            except Exception:  # committed: the directory's periodic reload applies it within seconds
                log.exception("stripe webhook: could not announce the change of tenant %s", tenant)
        return web.json_response(answer)

    async def _retrying(self, attempt: Callable[[], Awaitable[_T]]) -> _T:
        """Run the transaction `attempt` again when it lost a race or met a locked SQLite file (bounded)."""
        locked_delays = iter(LOCKED_RETRY_DELAYS)
        rounds = 0
        while True:
            rounds += 1
            try:
                return await attempt()
            except (IntegrityError, _Conflict):
                # A concurrent delivery of the same event, a concurrent creation of the same tenant, or a
                # concurrent change of its row: once again, the other transaction's row is now visible.
                if rounds >= _MAX_CONFLICTS:
                    raise OperationalError("stripe webhook", None, Exception("lost the race too often")) from None
            except OperationalError as exc:
                delay = next(locked_delays, None) if _database_locked(exc) else None
                if delay is None:
                    raise
                log.info("stripe webhook: the SQLite file is locked; trying again in %.2f s", delay)
                await self._sleep(delay)

    def _verify(self, payload: str, headers: Collection[str]) -> None:
        if len(headers) != 1:
            raise _invalid("Stripe-Signature", "exactly one signature header is required")
        assert self._secret is not None
        verify_signature(payload, next(iter(headers)), self._secret, now=self._clock(), tolerance=self._tolerance)

    async def _record(self, event: Event, subscription: Subscription | None) -> tuple[dict[str, Any], str | None]:
        """Apply the event in one transaction with its id; the answer, and the tenant to announce."""
        now = datetime.fromtimestamp(self._clock(), UTC)
        async with self._sessions() as session, session.begin():
            if await session.get(StripeEvent, event.id) is not None:
                return {"received": True, "duplicate": True}, None
            if subscription is None:
                session.add(StripeEvent(id=event.id, type=event.type, received_at=now))
                return {"received": True, "ignored": event.type}, None
            tenant_id, row, unusable = await self._find_tenant(session, subscription)
            if unusable is not None:
                # Not recorded: once the tenant is linked, a resend from the Stripe dashboard applies it.
                log.warning("stripe webhook %s (%s): %s; subscription %s, customer %s, tenant %s", event.id,
                            event.type, unusable, subscription.id, subscription.customer_id, tenant_id or "-")
                SyncMetrics.webhook_refused(_REFUSED_REASONS.get(unusable, "other"))
                return {"received": True, "ignored": unusable}, None
            session.add(StripeEvent(id=event.id, type=event.type, received_at=now))
            at = datetime.fromtimestamp(event.created, UTC)
            if row is not None and _is_stale(row, subscription, at):
                log.info("stripe webhook %s: older than the state of tenant %s; skipped", event.id, tenant_id)
                return {"received": True, "stale": True}, None
            if (row is not None and row.stripe_subscription_id not in (None, subscription.id)
                    and subscription.status in _TERMINAL):
                # The end of a replaced subscription (e.g. after a switch to a new one) says nothing of the tenant.
                return {"received": True, "ignored": "not the tenant's current subscription"}, None
            plan = self._plan_for(event, subscription)
            values: dict[str, Any] = {
                "subscription_status": subscription.status, "stripe_customer_id": subscription.customer_id,
                "stripe_subscription_id": subscription.id, "stripe_event_at": at,
                "past_due_since": _past_due_since(row, subscription, at),
                "updated_at": now,  # always: other instances reload what moved since their watermark
            }
            if row is None:
                before = None
                after_row = Tenant(id=tenant_id, plan=plan or NEW_TENANT_PLAN, status="active", created_at=now,
                                   **values)
                session.add(after_row)
                await session.flush()  # a concurrent creation of the tenant: IntegrityError, and once again
                after = _state(after_row)
            else:
                before = _state(row)
                if plan is not None:
                    values["plan"] = plan
                # The compare-and-set: written only if the row is still what the decision above was made
                # from. On PostgreSQL the row lock already serializes; on SQLite nothing else would.
                result = await session.execute(
                    update(Tenant).where(Tenant.id == tenant_id, *_unchanged(row)).values(**values)
                    .execution_options(synchronize_session=False))
                if result.rowcount != 1:  # type: ignore[attr-defined]
                    raise _Conflict(tenant_id)
                after = before | {k: v for k, v in values.items() if k in before}
            if after != before:
                session.add(AuditEntry(at=now, actor=ACTOR, tenant_id=tenant_id, action=f"stripe.{event.type}",
                                       before=before, after=after))
            return {"received": True, "tenant": tenant_id, "plan": after["plan"],
                    "subscription_status": after["subscription_status"]}, tenant_id

    async def _find_tenant(self, session: AsyncSession,
                           subscription: Subscription) -> tuple[str, Tenant | None, str | None]:
        """(tenant id, its locked row or None, None) or (tenant id or "", None, why the event cannot be used)."""
        if subscription.tenant_id is not None:
            tenant_id = subscription.tenant_id
            if not isinstance(tenant_id, str) or not _TENANT_ID.fullmatch(tenant_id):
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
            raise _invalid(exc.field, exc.message) from None

        async def attempt() -> dict[str, Any]:
            now = datetime.fromtimestamp(self._clock(), UTC)
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
            raise _Problem(503, "webhooks-not-configured", "Webhooks not configured",
                           f"{event.type} is a thin event: reading its data needs the Stripe API key")
        try:
            if not meter_errors.has_data(body):
                body = await self._fetcher.event(event.id)
            related = body.get("related_object")
            meter_id = related.get("id") if isinstance(related, dict) else None
            name = await self._fetcher.meter_event_name(meter_id) if isinstance(meter_id, str) else None
        except stripe.StripeError as exc:
            log.warning("stripe webhook %s: could not read the event or its meter from Stripe: %r", event.id, exc)
            raise _Problem(503, "stripe-unavailable", "Stripe unavailable",
                           "the event's data could not be read from Stripe; retry later") from None
        return body, self._meters_by_event_name.get(name, ()) if name is not None else ()


_T = TypeVar("_T")
_REFUSED_REASONS = {"tenant bound to another customer": "bound_to_other_customer", "no tenant": "no_tenant",
                    "invalid tenant id": "invalid_tenant_id",
                    "several tenants share the customer": "customer_shared_by_tenants"}


def _unchanged(row: Tenant) -> list[ColumnElement[bool]]:
    """Conditions that hold while the row is what was read (NULL-safe: IS NOT DISTINCT FROM, SQLite IS)."""
    return [column.is_not_distinct_from(getattr(row, column.key)) for column in (
        Tenant.plan, Tenant.status, Tenant.subscription_status, Tenant.stripe_customer_id,
        Tenant.stripe_subscription_id, Tenant.stripe_event_at, Tenant.past_due_since)]


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
        raise ConfigurationError(key, f"expected a mapping, got {kind_of(mapping)}")
    for lookup_key, plan in mapping.items():
        if not isinstance(plan, str) or plan not in known_plans:
            raise ConfigurationError(f"{key}.{lookup_key}", f"names no known plan ({kind_of(plan)}; "
                                     f"known: {', '.join(sorted(known_plans))})")
    return dict(mapping)


async def _read_body(request: web.BaseRequest) -> str:
    """The raw body, at most MAX_BODY_BYTES, as text (Stripe signs the UTF-8 text)."""
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise _body_too_large()
    chunks: list[bytes] = []
    size = 0
    while chunk := await request.content.read(64 * 1024):
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _body_too_large()
        chunks.append(chunk)
    try:
        return b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError:
        raise _invalid("body", "not UTF-8") from None


def _body_too_large() -> _Problem:
    return _Problem(413, "payload-too-large", "Payload too large", f"the body is over {MAX_BODY_BYTES} bytes")
