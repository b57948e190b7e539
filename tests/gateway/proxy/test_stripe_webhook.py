"""`POST /_gateway/webhooks/stripe` end to end: the gateway's handler on a real aiohttp server, billing_sync's
StripeEventProcessor, a real SQL store (SQLite and PostgreSQL) and a real TenantDirectory.

Payloads are signed with stripe's own test helper, the way Stripe signs them. The processor's pure parts
(signature headers, lookup keys) are tested in tests/billing_sync/test_subscriptions.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
import stripe
from aiohttp import web
from aiohttp.test_utils import TestClient
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from billing_sync.stripe_events import WebhookRefused, invalid, not_configured
from billing_sync.subscriptions import StripeEventProcessor
from gateway.errors import InvalidRequest
from gateway.proxy.stripe_webhook import MAX_BODY_BYTES, StripeWebhook, as_gateway_error
from metering.db import create_engine, session_factory
from metering.migrate import upgrade_async
from metering.models import AuditEntry, StripeEvent, Tenant
from quota.tenants import TenantDirectory
from tests.metering.conftest import db_url, postgres_database  # noqa: F401  (fixtures: SQLite and PostgreSQL)

SECRET = "whsec_test_0123456789abcdef"
PATH = "/_gateway/webhooks/stripe"
NOW = 1_800_000_000.0
PROBLEM = "application/problem+json"
LOOKUP_KEYS = {"starter_monthly": "starter", "professional_monthly": "professional",
               "enterprise_yearly": "enterprise"}
PLANS = ("starter", "professional", "enterprise", "sovereign")


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Hooks:
    client: TestClient
    directory: TenantDirectory
    sessions: async_sessionmaker[AsyncSession]
    clock: Clock

    async def post(self, body: str | bytes, *, signed_at: float | None = None, secret: str = SECRET,
                   signature: str | None = None) -> tuple[int, Any, str]:
        text = body if isinstance(body, str) else body.decode("utf-8", "replace")
        if signature is None:
            timestamp = int(self.clock.now if signed_at is None else signed_at)
            signature = stripe.WebhookSignature.generate_signature_header(text, secret, timestamp=timestamp)
        headers = {"Stripe-Signature": signature, "Content-Type": "application/json"}
        response = await self.client.post(PATH, data=body, headers=headers)
        raw = await response.text()
        return response.status, (json.loads(raw) if raw else None), response.content_type

    async def send(self, event: dict[str, Any], **kwargs: Any) -> tuple[int, Any]:
        status, answer, _ = await self.post(json.dumps(event), **kwargs)
        return status, answer

    async def tenant(self, tenant_id: str) -> Tenant | None:
        async with self.sessions() as session:
            return await session.get(Tenant, tenant_id)

    async def audit(self, tenant_id: str) -> list[AuditEntry]:
        async with self.sessions() as session:
            query = select(AuditEntry).where(AuditEntry.tenant_id == tenant_id).order_by(AuditEntry.id)
            return list((await session.scalars(query)).all())

    async def count_events(self) -> int:
        async with self.sessions() as session:
            return int(await session.scalar(select(func.count()).select_from(StripeEvent)) or 0)


def stripe_webhook(sessions: async_sessionmaker[AsyncSession], directory: TenantDirectory, *,
                   secret: str | None = SECRET, **options: Any) -> StripeWebhook:
    """The gateway's handler over billing_sync's processor, as gateway.app wires them."""
    events = StripeEventProcessor(secret=secret, sessions=sessions, plans_by_lookup_key=LOOKUP_KEYS,
                                  known_plans=PLANS, **options)
    return StripeWebhook(events, directory=directory)


async def _serve(handler: Any, aiohttp_client: Any) -> TestClient:
    app = web.Application()
    app.router.add_post(PATH, handler)
    return await aiohttp_client(app)


@pytest.fixture
async def hooks(db_url: str, aiohttp_client: Any) -> AsyncIterator[Hooks]:  # noqa: F811
    engine = create_engine(db_url)
    await upgrade_async(engine)
    sessions = session_factory(engine)
    directory = TenantDirectory(sessions, None)
    await directory.reload_changed()
    clock = Clock(NOW)
    client = await _serve(stripe_webhook(sessions, directory, clock=clock).handle, aiohttp_client)
    yield Hooks(client, directory, sessions, clock)
    await directory.close()
    await engine.dispose()


_counter = 0


def event(kind: str = "updated", *, tenant: str | None = "acme", customer: str = "cus_1", sub: str = "sub_1",
          status: str = "active", lookup_key: str | None = "professional_monthly", created: int = int(NOW) - 10,
          event_id: str | None = None, customer_metadata: dict[str, str] | None = None) -> dict[str, Any]:
    """A `customer.subscription.<kind>` event as Stripe sends it (the fields we read, and a few we do not)."""
    global _counter
    _counter += 1
    metadata = {} if tenant is None else {"tenant_id": tenant}
    items = [] if lookup_key is None else [
        {"id": "si_1", "object": "subscription_item", "quantity": 1,
         "price": {"id": "price_1", "object": "price", "lookup_key": lookup_key, "unit_amount": 4900}}]
    subscription = {"id": sub, "object": "subscription", "status": status, "metadata": metadata,
                    "customer": customer if customer_metadata is None else
                    {"id": customer, "object": "customer", "metadata": customer_metadata},
                    "items": {"object": "list", "data": items, "has_more": False}}
    return {"id": event_id or f"evt_{_counter}", "object": "event", "api_version": "2025-03-31.basil",
            "created": created, "livemode": False, "type": f"customer.subscription.{kind}",
            "data": {"object": subscription}}


async def seed(hooks: Hooks, tenant_id: str, **fields: Any) -> None:
    async with hooks.sessions() as session, session.begin():
        now = datetime.fromtimestamp(NOW - 3600, UTC)
        session.add(Tenant(id=tenant_id, plan=fields.pop("plan", "starter"), status=fields.pop("status", "active"),
                           created_at=now, updated_at=now, **fields))
    await hooks.directory.reload(tenant_id)


# --------------------------------------------------------------------------- applying subscriptions


async def test_created_event_creates_the_tenant_and_the_directory_has_it_at_once(hooks: Hooks) -> None:
    assert hooks.directory.get("acme") is None
    status, answer = await hooks.send(event("created"))
    assert status == 200
    assert answer == {"received": True, "tenant": "acme", "plan": "professional", "subscription_status": "active"}
    row = await hooks.tenant("acme")
    assert row is not None
    assert (row.plan, row.status, row.subscription_status) == ("professional", "active", "active")
    assert (row.stripe_customer_id, row.stripe_subscription_id) == ("cus_1", "sub_1")
    assert row.stripe_event_at == datetime.fromtimestamp(NOW - 10, UTC)
    assert row.updated_at == datetime.fromtimestamp(NOW, UTC)
    record = hooks.directory.get("acme")
    assert record is not None
    assert (record.plan, record.subscription_status, record.stripe_customer_id, record.stripe_subscription_id) == (
        "professional", "active", "cus_1", "sub_1")


async def test_updated_event_changes_plan_and_status_of_an_existing_tenant(hooks: Hooks) -> None:
    await seed(hooks, "acme", plan="starter", status="suspended")
    status, _ = await hooks.send(event("updated", status="past_due", lookup_key="enterprise_yearly"))
    assert status == 200
    record = hooks.directory.get("acme")
    assert record is not None
    # An operator's suspension is the operator's: Stripe sets plan and subscription status only.
    assert (record.plan, record.status, record.subscription_status) == ("enterprise", "suspended", "past_due")


async def test_deleted_event_marks_the_subscription_canceled(hooks: Hooks) -> None:
    await hooks.send(event("created", created=int(NOW) - 100))
    status, answer = await hooks.send(event("deleted", status="active", created=int(NOW) - 5))
    assert status == 200
    assert answer["subscription_status"] == "canceled"
    record = hooks.directory.get("acme")
    assert record is not None
    assert record.subscription_status == "canceled"
    assert record.plan == "professional"


async def test_audit_entries_record_before_and_after(hooks: Hooks) -> None:
    await hooks.send(event("created", created=int(NOW) - 100, lookup_key="starter_monthly"))
    await hooks.send(event("updated", created=int(NOW) - 50, lookup_key="professional_monthly"))
    await hooks.send(event("updated", created=int(NOW) - 40, lookup_key="professional_monthly"))  # no change
    entries = await hooks.audit("acme")
    assert [(e.actor, e.action) for e in entries] == [
        ("stripe", "stripe.customer.subscription.created"), ("stripe", "stripe.customer.subscription.updated")]
    assert entries[0].before is None
    assert entries[0].after == {"plan": "starter", "status": "active", "subscription_status": "active",
                                "stripe_customer_id": "cus_1", "stripe_subscription_id": "sub_1"}
    assert entries[1].before is not None and entries[1].before["plan"] == "starter"
    assert entries[1].after is not None and entries[1].after["plan"] == "professional"


async def test_unknown_lookup_key_keeps_the_plan(hooks: Hooks) -> None:
    await seed(hooks, "acme", plan="enterprise")
    status, answer = await hooks.send(event(lookup_key="legacy_gold_2019", status="unpaid"))
    assert status == 200
    assert answer["plan"] == "enterprise"
    record = hooks.directory.get("acme")
    assert record is not None
    assert (record.plan, record.subscription_status) == ("enterprise", "unpaid")


async def test_new_tenant_without_a_mapped_lookup_key_starts_on_starter(hooks: Hooks) -> None:
    status, answer = await hooks.send(event("created", lookup_key=None))
    assert status == 200
    assert answer["plan"] == "starter"


async def test_first_mapped_item_decides_the_plan(hooks: Hooks) -> None:
    payload = event("created", lookup_key="unknown_addon")
    payload["data"]["object"]["items"]["data"].append(
        {"id": "si_2", "price": {"id": "price_2", "lookup_key": "enterprise_yearly"}})
    _, answer = await hooks.send(payload)
    assert answer["plan"] == "enterprise"


# --------------------------------------------------------------------------- finding the tenant


async def test_tenant_found_by_stripe_customer_id_when_metadata_is_missing(hooks: Hooks) -> None:
    await seed(hooks, "globex", plan="starter", stripe_customer_id="cus_globex")
    status, answer = await hooks.send(event(tenant=None, customer="cus_globex", sub="sub_9"))
    assert status == 200
    assert answer["tenant"] == "globex"
    record = hooks.directory.get("globex")
    assert record is not None
    assert (record.plan, record.stripe_subscription_id) == ("professional", "sub_9")


async def test_tenant_found_by_metadata_of_an_expanded_customer(hooks: Hooks) -> None:
    status, answer = await hooks.send(event(tenant=None, customer="cus_2", customer_metadata={"tenant_id": "init"}))
    assert status == 200
    assert answer["tenant"] == "init"
    assert hooks.directory.get("init") is not None


async def test_no_tenant_is_acknowledged_and_ignored(hooks: Hooks, caplog: pytest.LogCaptureFixture) -> None:
    status, answer = await hooks.send(event(tenant=None, customer="cus_nobody"))
    assert status == 200
    assert answer == {"received": True, "ignored": "no tenant"}
    assert "no tenant" in caplog.text
    async with hooks.sessions() as session:
        assert await session.scalar(select(func.count()).select_from(Tenant)) == 0


@pytest.mark.parametrize("tenant_id", ["x" * 65, "acme/../root", "bad tenant", "a\r\nX-Evil: 1"])
async def test_invalid_tenant_id_in_metadata_is_ignored(hooks: Hooks, tenant_id: str) -> None:
    status, answer = await hooks.send(event(tenant=tenant_id))
    assert status == 200
    assert answer == {"received": True, "ignored": "invalid tenant id"}
    assert hooks.directory.all() == {}


# --------------------------------------------------------------------------- once, and in order


async def test_replayed_event_id_changes_nothing_the_second_time(hooks: Hooks) -> None:
    payload = event("created", event_id="evt_replay", lookup_key="starter_monthly")
    assert (await hooks.send(payload))[0] == 200
    # An operator changes the plan meanwhile; a redelivery of the old event must not undo it.
    async with hooks.sessions() as session, session.begin():
        row = await session.get(Tenant, "acme")
        assert row is not None
        row.plan = "sovereign"
    status, answer = await hooks.send(payload)
    assert (status, answer) == (200, {"received": True, "duplicate": True})
    row = await hooks.tenant("acme")
    assert row is not None and row.plan == "sovereign"
    assert len(await hooks.audit("acme")) == 1
    assert await hooks.count_events() == 1


async def test_older_event_after_a_newer_one_is_recorded_but_not_applied(hooks: Hooks) -> None:
    newer = event("updated", status="canceled", lookup_key="enterprise_yearly", created=int(NOW) - 10)
    older = event("updated", status="active", lookup_key="starter_monthly", created=int(NOW) - 60)
    await hooks.send(newer)
    status, answer = await hooks.send(older)
    assert (status, answer) == (200, {"received": True, "stale": True})
    record = hooks.directory.get("acme")
    assert record is not None
    assert (record.plan, record.subscription_status) == ("enterprise", "canceled")
    assert await hooks.count_events() == 2
    assert (await hooks.send(older))[1] == {"received": True, "duplicate": True}


async def test_same_second_update_does_not_revive_a_deleted_subscription(hooks: Hooks) -> None:
    await hooks.send(event("deleted", created=int(NOW) - 10))
    _, answer = await hooks.send(event("updated", status="active", created=int(NOW) - 10))
    assert answer == {"received": True, "stale": True}
    row = await hooks.tenant("acme")
    assert row is not None and row.subscription_status == "canceled"


async def test_end_of_a_replaced_subscription_does_not_cancel_the_new_one(hooks: Hooks) -> None:
    await hooks.send(event("created", sub="sub_old", created=int(NOW) - 300))
    await hooks.send(event("created", sub="sub_new", lookup_key="enterprise_yearly", created=int(NOW) - 200))
    status, answer = await hooks.send(event("deleted", sub="sub_old", created=int(NOW) - 100))
    assert (status, answer) == (200, {"received": True, "ignored": "not the tenant's current subscription"})
    record = hooks.directory.get("acme")
    assert record is not None
    assert (record.stripe_subscription_id, record.subscription_status, record.plan) == (
        "sub_new", "active", "enterprise")


async def test_other_event_types_are_acknowledged_and_recorded(hooks: Hooks) -> None:
    payload = {"id": "evt_inv", "object": "event", "type": "invoice.paid", "created": int(NOW),
               "data": {"object": {"id": "in_1", "object": "invoice"}}}
    status, answer = await hooks.send(payload)
    assert (status, answer) == (200, {"received": True, "ignored": "invoice.paid"})
    assert await hooks.count_events() == 1
    assert (await hooks.send(payload))[1] == {"received": True, "duplicate": True}


# --------------------------------------------------------------------------- refused deliveries


async def _assert_problem(hooks: Hooks, result: tuple[int, Any, str], status: int, suffix: str) -> Any:
    code, body, content_type = result
    assert code == status
    assert content_type == PROBLEM
    assert body["status"] == status and body["type"].endswith("/" + suffix)
    assert await hooks.count_events() == 0
    assert hooks.directory.all() == {}
    return body


async def test_wrong_secret_is_400(hooks: Hooks) -> None:
    result = await hooks.post(json.dumps(event()), secret="whsec_someone_else")
    body = await _assert_problem(hooks, result, 400, "invalid-request")
    assert body["errors"][0]["field"] == "Stripe-Signature"


async def test_tampered_body_is_400(hooks: Hooks) -> None:
    text = json.dumps(event(lookup_key="starter_monthly"))
    signature = stripe.WebhookSignature.generate_signature_header(text, SECRET, timestamp=int(NOW))
    tampered = text.replace("starter_monthly", "enterprise_yearly")
    await _assert_problem(hooks, await hooks.post(tampered, signature=signature), 400, "invalid-request")


@pytest.mark.parametrize("signature", ["", "garbage", "t=abc,v1=00", f"t={int(NOW)}", "v1=" + "0" * 64])
async def test_malformed_signature_header_is_400(hooks: Hooks, signature: str) -> None:
    await _assert_problem(hooks, await hooks.post(json.dumps(event()), signature=signature), 400, "invalid-request")


async def test_missing_signature_header_is_400(hooks: Hooks) -> None:
    response = await hooks.client.post(PATH, data=json.dumps(event()))
    assert response.status == 400
    assert response.content_type == PROBLEM


async def test_signature_older_than_five_minutes_is_400(hooks: Hooks) -> None:
    result = await hooks.post(json.dumps(event()), signed_at=NOW - 301)
    body = await _assert_problem(hooks, result, 400, "invalid-request")
    assert "300 seconds" in body["detail"]


async def test_signature_within_five_minutes_is_accepted(hooks: Hooks) -> None:
    status, _, _ = await hooks.post(json.dumps(event()), signed_at=NOW - 299)
    assert status == 200


@pytest.mark.parametrize("body", ["{not json", "[1, 2]", '"text"', '{"id": "evt_1", "type": "x"}',
                                  '{"id": 5, "type": "x", "created": 1}',
                                  '{"id": "evt_1", "type": "customer.subscription.updated", "created": 1}',
                                  '{"id": "evt_1", "type": "customer.subscription.updated", "created": 1,'
                                  ' "data": {"object": {"id": "sub_1", "status": "active"}}}'])
async def test_malformed_event_is_400(hooks: Hooks, body: str) -> None:
    await _assert_problem(hooks, await hooks.post(body), 400, "invalid-request")


async def test_body_that_is_not_utf8_is_400(hooks: Hooks) -> None:
    await _assert_problem(hooks, await hooks.post(b'{"id": "\xff"}', signature="t=1,v1=00"), 400, "invalid-request")


async def test_body_over_one_mebibyte_is_413(hooks: Hooks) -> None:
    payload = event()
    payload["padding"] = "x" * MAX_BODY_BYTES
    await _assert_problem(hooks, await hooks.post(json.dumps(payload)), 413, "payload-too-large")


async def test_no_secret_configured_is_503(hooks: Hooks, aiohttp_client: Any) -> None:
    client = await _serve(stripe_webhook(hooks.sessions, hooks.directory, secret=None).handle, aiohttp_client)
    text = json.dumps(event())
    response = await client.post(PATH, data=text, headers={
        "Stripe-Signature": stripe.WebhookSignature.generate_signature_header(text, SECRET)})
    assert response.status == 503
    assert response.content_type == PROBLEM
    assert (await response.json())["type"].endswith("/webhooks-not-configured")


# --------------------------------------------------------------------------- hostile bodies


async def test_signed_body_nested_too_deeply_is_400(hooks: Hooks) -> None:
    body = '{"id": "evt_deep", "type": "invoice.paid", "created": 1, "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    await _assert_problem(hooks, await hooks.post(body), 400, "invalid-request")


@pytest.mark.parametrize("created", ["1" + "0" * 400, "253402300800", "1e308"])
async def test_signed_event_created_out_of_range_is_400(hooks: Hooks, created: str) -> None:
    text = json.dumps(event())
    body = text.replace(f'"created": {int(NOW) - 10}', f'"created": {created}', 1)
    assert body != text
    result = await hooks.post(body)
    problem = await _assert_problem(hooks, result, 400, "invalid-request")
    assert problem["errors"][0]["field"] == "created"


# --------------------------------------------------------------------------- past-due grace (PRODUCT.md §8)

DAY = 86_400


async def test_past_due_since_is_the_first_past_due_event_and_kept_across_later_ones(hooks: Hooks) -> None:
    became = int(NOW) - 6 * DAY
    await hooks.send(event("created", status="active", created=became - DAY))
    await hooks.send(event(status="past_due", created=became))
    # Stripe keeps sending events while it retries the payment: none of them restarts the grace.
    await hooks.send(event(status="past_due", lookup_key="enterprise_yearly", created=became + 3 * DAY))
    await hooks.send(event(status="past_due", created=became + 5 * DAY))
    row = await hooks.tenant("acme")
    assert row is not None and row.past_due_since == datetime.fromtimestamp(became, UTC)
    record = hooks.directory.get("acme")
    assert record is not None and record.past_due_since == datetime.fromtimestamp(became, UTC)
    # Paid: the spell ends; a later one starts its own grace.
    await hooks.send(event(status="active", created=became + 6 * DAY))
    assert (await hooks.tenant("acme")).past_due_since is None  # type: ignore[union-attr]
    await hooks.send(event(status="past_due", created=became + 6 * DAY + 60))
    assert (await hooks.tenant("acme")).past_due_since == datetime.fromtimestamp(  # type: ignore[union-attr]
        became + 6 * DAY + 60, UTC)


async def test_past_due_grace_runs_out_from_when_it_became_past_due(hooks: Hooks, redis_server: Any,
                                                                     tmp_path: Any) -> None:
    from redis.asyncio import Redis

    from gateway.config import parse_settings
    from metering.redis_store import RedisUsageStore
    from metering.spool import Spool
    from quota.limiter import Limiter, LimiterSettings, Refusal
    from quota.metrics import QuotaMetrics

    became = int(NOW) - 8 * DAY  # the grace is 7 days
    await hooks.send(event("created", status="active", created=became - DAY))
    await hooks.send(event(status="past_due", created=became))
    await hooks.send(event(status="past_due", created=int(NOW) - DAY))  # a failed retry, yesterday
    policy = parse_settings({"auth": {"algorithms": ["HS256"], "hs256_secret": "x" * 40}}).policy
    client = Redis.from_url(redis_server.url)
    store = RedisUsageStore(client, timeout=0.5)
    spool = Spool(tmp_path / "spool.jsonl")
    limiter = Limiter(store, policy.matcher, policy.plans, hooks.directory, spool,
                      QuotaMetrics(policy.plans, [m.name for m in policy.meters]),
                      LimiterSettings(default_plan="starter", bucket_seconds=300, fail_open=True, grace_seconds=10,
                                      past_due_grace_seconds=7 * DAY),
                      clock=lambda: NOW)
    try:
        with pytest.raises(Refusal) as refused:
            await limiter.admit("acme", None, "GET", "/api/chains")
        assert refused.value.kind == "subscription_inactive"
    finally:
        await limiter.drain()
        await store.aclose()
        await spool.aclose()
        await client.aclose()


# --------------------------------------------------------------------------- tenant binding (PRODUCT.md §8)


def _refused(reason: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("billing_sync_webhook_refused_total", {"reason": reason}) or 0.0


async def test_a_tenant_bound_to_a_customer_is_never_moved_by_another_customers_subscription(
        hooks: Hooks, caplog: pytest.LogCaptureFixture) -> None:
    await seed(hooks, "acme", plan="enterprise", stripe_customer_id="cus_paying", stripe_subscription_id="sub_paid",
               subscription_status="active")
    refused = _refused("bound_to_other_customer")
    status, answer = await hooks.send(event(tenant="acme", customer="cus_other", sub="sub_x", status="unpaid",
                                            lookup_key="starter_monthly"))
    assert (status, answer) == (200, {"received": True, "ignored": "tenant bound to another customer"})
    row = await hooks.tenant("acme")
    assert row is not None
    assert (row.plan, row.subscription_status, row.stripe_customer_id, row.stripe_subscription_id) == (
        "enterprise", "active", "cus_paying", "sub_paid")
    assert _refused("bound_to_other_customer") == refused + 1
    assert "tenant bound to another customer" in caplog.text and "cus_other" in caplog.text
    assert await hooks.audit("acme") == []
    # Its own customer's events still apply, and an unbound tenant is bound by its first event.
    _, answer = await hooks.send(event(tenant="acme", customer="cus_paying", sub="sub_paid", status="past_due"))
    assert answer["subscription_status"] == "past_due"
    await seed(hooks, "fresh", plan="starter")
    _, answer = await hooks.send(event(tenant="fresh", customer="cus_fresh", sub="sub_f"))
    assert answer["tenant"] == "fresh"
    assert (await hooks.tenant("fresh")).stripe_customer_id == "cus_fresh"  # type: ignore[union-attr]


# --------------------------------------------------------------------------- concurrency: a real compare-and-set


async def test_concurrent_out_of_order_webhooks_never_let_the_older_win(hooks: Hooks, db_url: str) -> None:  # noqa: F811
    """The older event reads the tenant, the newer one is applied meanwhile, then the older one writes."""
    from sqlalchemy import event as sa_event
    from sqlalchemy import text
    from sqlalchemy.util import await_only

    await seed(hooks, "acme", plan="starter", stripe_customer_id="cus_1", stripe_subscription_id="sub_1",
               subscription_status="active", stripe_event_at=datetime.fromtimestamp(NOW - 3600, UTC))
    older = event(status="active", lookup_key="starter_monthly", created=int(NOW) - 60, event_id="evt_older")
    newer = event(status="canceled", lookup_key="enterprise_yearly", created=int(NOW) - 10, event_id="evt_newer")
    engine = hooks.sessions.kw["bind"]
    older_read, newer_done = asyncio.Event(), asyncio.Event()

    async def newer_applied_or_blocked() -> None:
        if not db_url.startswith("postgresql"):
            await newer_done.wait()
            return
        # On PostgreSQL the older delivery's row lock makes the newer one wait: that is as far as it gets.
        while not newer_done.is_set():
            async with engine.connect() as probe:
                if await probe.scalar(text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                           "AND datname = current_database()")):
                    return
            await asyncio.sleep(0.01)

    def hold_the_older(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
        # Once the older delivery has read the tenant row, the newer one runs first.
        if not older_read.is_set() and statement.lstrip().upper().startswith("SELECT") \
                and "FROM TENANTS" in statement.upper():
            older_read.set()
            await_only(newer_applied_or_blocked())

    sa_event.listen(engine.sync_engine, "after_cursor_execute", hold_the_older)
    try:
        first = asyncio.ensure_future(hooks.send(older))
        await older_read.wait()
        second = await hooks.send(newer)
        newer_done.set()
        results = [await first, second]
    finally:
        sa_event.remove(engine.sync_engine, "after_cursor_execute", hold_the_older)
    assert [status for status, _ in results] == [200, 200]
    if not db_url.startswith("postgresql"):  # PostgreSQL: the older one holds the row lock, goes first, is overwritten
        assert results[0][1] == {"received": True, "stale": True}
    row = await hooks.tenant("acme")
    assert row is not None
    assert (row.plan, row.subscription_status, row.stripe_event_at) == (
        "enterprise", "canceled", datetime.fromtimestamp(NOW - 10, UTC))
    assert await hooks.count_events() == 2


async def test_many_concurrent_webhooks_in_any_order_end_at_the_newest(hooks: Hooks) -> None:
    import random

    await seed(hooks, "acme", plan="starter", stripe_customer_id="cus_1", stripe_subscription_id="sub_1")
    statuses = ["active", "past_due", "active", "trialing", "past_due", "unpaid", "active", "past_due"] * 2
    events = [event(status=status, created=int(NOW) - 1000 + i, lookup_key="professional_monthly")
              for i, status in enumerate(statuses)]
    random.Random(7).shuffle(events)
    results = await asyncio.gather(*(hooks.send(e) for e in events))
    assert [status for status, _ in results] == [200] * len(events)
    row = await hooks.tenant("acme")
    assert row is not None
    assert (row.subscription_status, row.stripe_event_at) == ("past_due", datetime.fromtimestamp(NOW - 1000 + 15, UTC))
    assert await hooks.count_events() == len(events)


async def test_a_locked_sqlite_file_is_waited_for_not_answered_503(db_url: str, aiohttp_client: Any) -> None:  # noqa: F811
    import sqlite3

    from sqlalchemy import event as sa_event

    if not db_url.startswith("sqlite"):
        pytest.skip("SQLite's file lock")
    engine = create_engine(db_url)
    await upgrade_async(engine)

    def short_busy_timeout(dbapi_connection: Any, _record: Any) -> None:
        # Instead of waiting busy_timeout's 5 s for the lock below, meet "database is locked" at once.
        dbapi_connection.cursor().execute("PRAGMA busy_timeout=10")

    sa_event.listen(engine.sync_engine, "connect", short_busy_timeout)
    sessions = session_factory(engine)
    directory = TenantDirectory(sessions, None)
    locker = sqlite3.connect(db_url.split(":///", 1)[1], isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")  # another writer holds the file
    slept: list[float] = []

    async def sleep(delay: float) -> None:  # the injected wait: the other writer finishes meanwhile
        slept.append(delay)
        if locker.in_transaction:
            locker.execute("COMMIT")

    client = await _serve(stripe_webhook(sessions, directory, clock=Clock(NOW), sleep=sleep).handle, aiohttp_client)
    hooks = Hooks(client, directory, sessions, Clock(NOW))
    try:
        status, answer = await hooks.send(event("created"))
        assert (status, answer["tenant"]) == (200, "acme")
        assert slept  # it met the lock, and tried again
        assert (await hooks.tenant("acme")) is not None
    finally:
        locker.close()
        await directory.close()
        await engine.dispose()


# --------------------------------------------------------------------------- v2 stream: asynchronous rejections


async def ledger_rows(hooks: Hooks, *rows: tuple[str, str, int, str]) -> None:
    """Ledger rows (tenant, meter, bucket offset, identifier) as the worker leaves them after a v2 send: sent."""
    from decimal import Decimal

    from metering.models import LedgerEntry

    async with hooks.sessions() as session, session.begin():
        for tenant, meter, offset, identifier in rows:
            session.add(LedgerEntry(tenant_id=tenant, meter=meter, bucket_start=datetime.fromtimestamp(
                NOW - 3600 + offset, UTC), value=Decimal(3), kind="counter", state="sent", identifier=identifier,
                stripe_customer_id="cus_1", attempts=1, sent_at=datetime.fromtimestamp(NOW - 120, UTC)))


async def ledger_states(hooks: Hooks) -> dict[str, tuple[str, str | None]]:
    from metering.models import LedgerEntry

    async with hooks.sessions() as session:
        return {r.identifier: (r.state, r.last_error) for r in (await session.scalars(select(LedgerEntry))).all()}


def error_report(event_id: str = "evt_test_65R", *, data: bool = True, error_count: int | None = None,
                 identifiers: tuple[str, ...] = ("gw1-acme-api_calls-1",)) -> dict[str, Any]:
    """`v1.billing.meter.error_report_triggered` in the shape of Stripe's API reference (v2 Event object)."""
    body: dict[str, Any] = {
        "id": event_id, "object": "v2.core.event", "context": None, "created": "2027-01-15T08:00:02.134Z",
        "livemode": False, "reason": None, "type": "v1.billing.meter.error_report_triggered",
        "related_object": {"id": "mtr_test_61R", "type": "billing.meter", "url": "/v1/billing/meters/mtr_test_61R"}}
    if data:
        body["data"] = {
            "developer_message_summary": f"There are {len(identifiers)} invalid events",
            "reason": {"error_count": error_count or len(identifiers), "error_types": [{
                "code": "meter_event_customer_not_found", "error_count": error_count or len(identifiers),
                "sample_errors": [{"error_message": f"No customer found for {i}.", "request": {"identifier": i}}
                                  for i in identifiers]}]},
            "validation_start": "2027-01-15T07:58:00.000Z", "validation_end": "2027-01-15T07:59:00.000Z"}
    return body


async def test_meter_error_report_parks_the_buckets_stripe_rejected(hooks: Hooks) -> None:
    from prometheus_client import REGISTRY

    await ledger_rows(hooks, ("acme", "api_calls", 0, "gw1-acme-api_calls-1"),
                      ("acme", "api_calls", 300, "gw1-acme-api_calls-2"),
                      ("beta", "api_calls", 0, "gw1-beta-api_calls-1"))
    before = REGISTRY.get_sample_value("billing_sync_meter_error_parked_total") or 0.0
    report = error_report(identifiers=("gw1-acme-api_calls-1", "gw1-beta-api_calls-1", "gw1-unknown"))
    status, answer = await hooks.send(report)
    assert (status, answer) == (200, {"received": True, "parked": 2})
    states = await ledger_states(hooks)
    assert states["gw1-acme-api_calls-2"] == ("sent", None)
    for identifier in ("gw1-acme-api_calls-1", "gw1-beta-api_calls-1"):
        state, reason = states[identifier]
        assert state == "parked"
        assert reason == (f"rejected: stripe rejected the meter event (meter_event_customer_not_found): "
                          f"No customer found for {identifier}.")
    assert (REGISTRY.get_sample_value("billing_sync_meter_error_parked_total") or 0.0) == before + 2
    # Each event id once: a redelivery changes nothing.
    assert (await hooks.send(report))[1] == {"received": True, "duplicate": True}


async def test_thin_meter_error_report_without_the_api_key_is_503_so_stripe_retries(hooks: Hooks) -> None:
    await ledger_rows(hooks, ("acme", "api_calls", 0, "gw1-acme-api_calls-1"))
    code, body, content_type = await hooks.post(json.dumps(error_report(data=False)))
    assert (code, content_type) == (503, PROBLEM)
    assert body["type"].endswith("/webhooks-not-configured")
    assert await hooks.count_events() == 0  # not recorded: the retry is processed
    assert (await ledger_states(hooks))["gw1-acme-api_calls-1"] == ("sent", None)


@pytest.mark.parametrize("data", [{"reason": "x"}, {"reason": {"error_types": "x"}}, {"reason": {"error_types": [1]}}])
async def test_unreadable_meter_error_report_is_400(hooks: Hooks, data: Any) -> None:
    report = error_report()
    report["data"] = data
    await _assert_problem(hooks, await hooks.post(json.dumps(report)), 400, "invalid-request")


@pytest.mark.parametrize("created", ["yesterday", 1_800_000_000, "2027-01-15T08:00:02"])
async def test_v2_event_with_a_bad_created_is_400(hooks: Hooks, created: Any) -> None:
    report = error_report()
    report["created"] = created
    await _assert_problem(hooks, await hooks.post(json.dumps(report)), 400, "invalid-request")


async def test_thin_meter_error_report_is_read_from_stripe_and_parks_named_and_unnamed(
        hooks: Hooks, aiohttp_server: Any, aiohttp_client: Any) -> None:
    """A thin event, as Stripe delivers v2 events: the report is fetched (GET /v2/core/events/{id}), the meter too;
    of 3 rejected events Stripe names 1, the other 2 are the meter's buckets sent in the validation window."""
    from billing_sync.meter_errors import StripeEventFetcher

    full = error_report("evt_thin_1", error_count=3, identifiers=("gw1-acme-api_calls-1",))
    seen: list[str] = []

    async def stripe_event(request: web.Request) -> web.Response:
        seen.append(request.path)
        assert request.headers["Authorization"] == "Bearer sk_test_hooks"
        return web.json_response(full)

    async def stripe_meter(request: web.Request) -> web.Response:
        seen.append(request.path)
        return web.json_response({"id": request.match_info["id"], "object": "billing.meter",
                                  "event_name": "api_calls", "status": "active"})

    app = web.Application()
    app.router.add_get("/v2/core/events/{id}", stripe_event)
    app.router.add_get("/v1/billing/meters/{id}", stripe_meter)
    server = await aiohttp_server(app)
    await ledger_rows(hooks, ("acme", "api_calls", 0, "gw1-acme-api_calls-1"),
                      ("acme", "api_calls", 300, "gw1-acme-api_calls-2"),
                      ("beta", "api_calls", 0, "gw1-beta-api_calls-1"),
                      ("acme", "chain_deployments", 0, "gw1-acme-chain_deployments-1"))
    from sqlalchemy import update

    from metering.models import LedgerEntry

    async with hooks.sessions() as session, session.begin():  # sent long before the window: not among them
        await session.execute(update(LedgerEntry).where(LedgerEntry.identifier == "gw1-beta-api_calls-1")
                              .values(sent_at=datetime.fromtimestamp(NOW - 7200, UTC)))
    fetcher = StripeEventFetcher("sk_test_hooks", api_base=str(server.make_url("")).rstrip("/"))
    webhook = stripe_webhook(hooks.sessions, hooks.directory, clock=hooks.clock, event_fetcher=fetcher,
                             meters_by_event_name={"api_calls": ["api_calls"]})
    thin = await _serve(webhook.handle, aiohttp_client)
    text = json.dumps(error_report("evt_thin_1", data=False))
    signature = stripe.WebhookSignature.generate_signature_header(text, SECRET, timestamp=int(NOW))
    try:
        response = await thin.post(PATH, data=text, headers={"Stripe-Signature": signature})
    finally:
        await fetcher.aclose()
    assert response.status == 200
    assert await response.json() == {"received": True, "parked": 2}
    assert seen == ["/v2/core/events/evt_thin_1", "/v1/billing/meters/mtr_test_61R"]
    states = await ledger_states(hooks)
    assert states["gw1-acme-api_calls-1"][0] == "parked"
    assert states["gw1-acme-api_calls-2"][0] == "parked"
    assert "2 unnamed meter event(s)" in (states["gw1-acme-api_calls-2"][1] or "")
    assert states["gw1-beta-api_calls-1"] == ("sent", None)
    assert states["gw1-acme-chain_deployments-1"] == ("sent", None)


# --------------------------------------------------------------------------- problem+json, as before the split


async def test_problem_bodies_are_byte_for_byte_what_stripe_got_before(hooks: Hooks) -> None:
    text = json.dumps(event())
    signature = stripe.WebhookSignature.generate_signature_header(text, "whsec_someone_else", timestamp=int(NOW))
    response = await hooks.client.post(PATH, data=text, headers={"Stripe-Signature": signature})
    assert response.status == 400 and response.headers["Content-Type"] == PROBLEM
    assert "X-Request-Id" not in response.headers and "Retry-After" not in response.headers
    assert await response.read() == (
        b'{"type":"https://docs.cosmosbuilder.io/gateway/problems/invalid-request","title":"Invalid request",'
        b'"status":400,"detail":"Stripe-Signature: does not match the body and the webhook secret",'
        b'"errors":[{"field":"Stripe-Signature","message":"does not match the body and the webhook secret"}]}')
    payload = event()
    payload["padding"] = "x" * MAX_BODY_BYTES
    response = await hooks.client.post(PATH, data=json.dumps(payload), headers={"Stripe-Signature": signature})
    assert response.status == 413
    assert await response.read() == (
        b'{"type":"https://docs.cosmosbuilder.io/gateway/problems/payload-too-large","title":"Payload too large",'
        b'"status":413,"detail":"the body is over 1048576 bytes"}')


async def test_two_signature_headers_are_400(hooks: Hooks) -> None:
    text = json.dumps(event())
    signature = stripe.WebhookSignature.generate_signature_header(text, SECRET, timestamp=int(NOW))
    response = await hooks.client.post(PATH, data=text, headers=[("Stripe-Signature", signature)] * 2)
    assert response.status == 400
    assert (await response.json())["errors"] == [
        {"field": "Stripe-Signature", "message": "exactly one signature header is required"}]
    assert await hooks.count_events() == 0


async def test_sql_store_down_is_503_database_unavailable(aiohttp_client: Any, tmp_path: Any) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'no' / 'such' / 'dir.db'}")
    sessions = session_factory(engine)
    directory = TenantDirectory(sessions, None)
    client = await _serve(stripe_webhook(sessions, directory, clock=Clock(NOW)).handle, aiohttp_client)
    try:
        text = json.dumps(event())
        response = await client.post(PATH, data=text, headers={
            "Stripe-Signature": stripe.WebhookSignature.generate_signature_header(text, SECRET, timestamp=int(NOW))})
        assert response.status == 503 and response.content_type == PROBLEM
        assert "Retry-After" not in response.headers
        assert await response.read() == (
            b'{"type":"https://docs.cosmosbuilder.io/gateway/problems/database-unavailable",'
            b'"title":"Database unavailable","status":503,"detail":"the SQL store is unavailable"}')
    finally:
        await engine.dispose()


@pytest.mark.parametrize("refused", [
    invalid("data.object", "must be a subscription object"),
    not_configured("no Stripe webhook secret is configured (STRIPE_WEBHOOK_SECRET)"),
    WebhookRefused(503, "stripe-unavailable", "Stripe unavailable", "the event's data could not be read from Stripe"),
], ids=lambda refused: refused.suffix)
def test_every_refusal_of_billing_sync_is_the_gateway_error_of_its_type(refused: WebhookRefused) -> None:
    error = as_gateway_error(refused)
    assert (error.status, error.suffix, error.title, error.detail) == (
        refused.status, refused.suffix, refused.title, refused.detail)
    assert error.body("base/") == {"type": "base/" + refused.suffix, "title": refused.title,
                                   "status": refused.status, "detail": refused.detail, **refused.extra}
    assert isinstance(error, InvalidRequest) == (refused.status == 400)
