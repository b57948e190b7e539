"""billing_sync's side of the Stripe webhooks, without HTTP: reading signatures and events, the processor's
answers and refusals. The tenant writer it shares with the admin API: tests/metering/test_tenant_rows.py.

The deliveries end to end (aiohttp, TenantDirectory, concurrency, meter error reports) are tested in
tests/gateway/proxy/test_stripe_webhook.py.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import hypothesis
import hypothesis.strategies as st
import pytest
import stripe
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from billing_sync.stripe_events import WebhookRefused, parse_event, parse_subscription, verify_signature
from billing_sync.subscriptions import Received, StripeEventProcessor
from metering.db import create_engine, session_factory
from metering.errors import ConfigError
from metering.migrate import upgrade_async
from metering.models import AuditEntry
from tests.metering.conftest import db_url, postgres_database  # noqa: F401  (fixtures: SQLite and PostgreSQL)

SECRET = "whsec_test_0123456789abcdef"
NOW = 1_800_000_000.0
LOOKUP_KEYS = {"starter_monthly": "starter", "professional_monthly": "professional"}
PLANS = ("starter", "professional", "enterprise")


def subscription_event(*, event_id: str = "evt_1", kind: str = "created", tenant: str = "acme",
                       status: str = "active", customer: Any = "cus_1") -> dict[str, Any]:
    return {"id": event_id, "object": "event", "type": f"customer.subscription.{kind}", "created": int(NOW) - 10,
            "data": {"object": {"id": "sub_1", "object": "subscription", "status": status, "customer": customer,
                                "metadata": {"tenant_id": tenant}, "items": {"data": [
                                    {"price": {"lookup_key": "professional_monthly"}}]}}}}


def signed(payload: dict[str, Any], *, at: float = NOW) -> tuple[bytes, list[str]]:
    text = json.dumps(payload)
    return text.encode(), [stripe.WebhookSignature.generate_signature_header(text, SECRET, timestamp=int(at))]


@pytest.fixture
async def sessions(db_url: str) -> AsyncIterator[async_sessionmaker[AsyncSession]]:  # noqa: F811
    engine = create_engine(db_url)
    await upgrade_async(engine)
    yield session_factory(engine)
    await engine.dispose()


def processor(sessions: async_sessionmaker[AsyncSession] | None, *,
              secret: str | None = SECRET) -> StripeEventProcessor:
    return StripeEventProcessor(secret=secret, sessions=sessions,  # type: ignore[arg-type]
                                plans_by_lookup_key=LOOKUP_KEYS, known_plans=PLANS, clock=lambda: NOW)


# --------------------------------------------------------------------------- configuration


def test_lookup_key_naming_an_unknown_plan_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError) as caught:
        StripeEventProcessor(secret=SECRET, sessions=None,  # type: ignore[arg-type]
                             plans_by_lookup_key={"gold_monthly": "gold"}, known_plans=PLANS)
    assert caught.value.key == "billing.stripe.plans_by_lookup_key.gold_monthly"


async def test_without_a_secret_every_delivery_is_refused_503() -> None:
    events = processor(None, secret="")
    with pytest.raises(WebhookRefused) as caught:
        events.require_secret()
    assert (caught.value.status, caught.value.suffix, caught.value.title) == (
        503, "webhooks-not-configured", "Webhooks not configured")
    with pytest.raises(WebhookRefused):
        await events.receive(*signed(subscription_event()))


# --------------------------------------------------------------------------- the processor's answers


async def test_receive_answers_and_names_the_tenant_to_announce(sessions: async_sessionmaker[AsyncSession]) -> None:
    events = processor(sessions)
    body, signatures = signed(subscription_event())
    assert await events.receive(body, signatures) == Received(
        {"received": True, "tenant": "acme", "plan": "professional", "subscription_status": "active"}, "acme")
    # A redelivery changes nothing, so there is nothing to announce.
    assert await events.receive(body, signatures) == Received({"received": True, "duplicate": True})
    async with sessions() as session:
        entries = (await session.scalars(select(AuditEntry))).all()
    assert [(e.actor, e.action, e.before) for e in entries] == [("stripe", "stripe.customer.subscription.created",
                                                                 None)]
    assert entries[0].after == {"plan": "professional", "status": "active", "subscription_status": "active",
                                "stripe_customer_id": "cus_1", "stripe_subscription_id": "sub_1"}


@pytest.mark.parametrize(("body", "signatures", "field"), [
    (b'{"id": "\xff"}', ["t=1,v1=" + "0" * 64], "body"),
    (b"{}", [], "Stripe-Signature"),
    (b"{}", ["t=1,v1=" + "0" * 64] * 2, "Stripe-Signature"),
])
async def test_refused_deliveries_name_the_field(body: bytes, signatures: list[str], field: str) -> None:
    with pytest.raises(WebhookRefused) as caught:
        await processor(None).receive(body, signatures)
    assert caught.value.status == 400 and caught.value.extra["errors"][0]["field"] == field


# --------------------------------------------------------------------------- reading events


def test_a_deleted_subscription_is_canceled_and_an_expanded_customer_names_the_tenant() -> None:
    payload = subscription_event(kind="deleted", tenant="", customer={"id": "cus_9", "metadata": {"tenant_id": "init"}})
    subscription = parse_subscription(parse_event(json.dumps(payload)))
    assert (subscription.status, subscription.customer_id, subscription.tenant_id, subscription.lookup_keys) == (
        "canceled", "cus_9", "init", ("professional_monthly",))


# --------------------------------------------------------------------------- hostile signature headers


@pytest.mark.parametrize("signature", [
    f"t={int(NOW)},v1=é" + "0" * 63,
    f"t={int(NOW)},v1=\udcff\udcfe" + "0" * 62,  # bytes that are not UTF-8, as aiohttp hands them over
    "t=١٨٠٠٠٠٠٠٠٠,v1=" + "0" * 64,  # Unicode digits, which int() would take
    "t=" + "9" * 5000 + ",v1=" + "0" * 64,
    f"t={int(NOW)},v1=" + "0" * 64 + "\t",
    f"t={int(NOW)}," + ",".join(["v1=" + "0" * 64] * 80),  # over 4 KiB
])
def test_signature_header_that_is_not_one_is_a_400_problem(signature: str) -> None:
    with pytest.raises(WebhookRefused) as caught:
        verify_signature("{}", signature, (SECRET,), now=NOW, tolerance=300)
    assert caught.value.status == 400
    assert caught.value.extra["errors"][0]["field"] == "Stripe-Signature"


OLD_SECRET, NEW_SECRET = "whsec_old_0123456789", "whsec_new_9876543210"


def _signed(payload: str, *secrets: str) -> str:
    """Stripe's header during a roll of the endpoint's secret: a `v1` per secret, one timestamp."""
    parts = [stripe.WebhookSignature.generate_signature_header(payload, secret, timestamp=int(NOW)).split(",")[1]
             for secret in secrets]
    return ",".join([f"t={int(NOW)}", *parts])


@pytest.mark.parametrize("signed_with", [(OLD_SECRET,), (NEW_SECRET,), (NEW_SECRET, OLD_SECRET),
                                         (OLD_SECRET, NEW_SECRET), ("whsec_other", NEW_SECRET)])
def test_either_of_two_configured_secrets_verifies(signed_with: tuple[str, ...]) -> None:
    verify_signature("{}", _signed("{}", *signed_with), (NEW_SECRET, OLD_SECRET), now=NOW, tolerance=300)


@pytest.mark.parametrize("configured", [(NEW_SECRET,), (NEW_SECRET, OLD_SECRET), ()])
def test_a_signature_of_no_configured_secret_is_a_400_problem(configured: tuple[str, ...]) -> None:
    with pytest.raises(WebhookRefused) as caught:
        verify_signature("{}", _signed("{}", "whsec_other", "whsec_another"), configured, now=NOW, tolerance=300)
    assert caught.value.status == 400


def test_processor_without_any_secret_refuses_every_delivery() -> None:
    for secret in (None, "", ()):
        with pytest.raises(WebhookRefused) as caught:
            processor(None, secret=secret).require_secret()  # type: ignore[arg-type]
        assert caught.value.status == 503


def _as_aiohttp_decodes(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


@hypothesis.settings(max_examples=500, deadline=None)
@hypothesis.given(header=st.one_of(
    st.binary(max_size=300).map(_as_aiohttp_decodes),
    st.text(max_size=300),
    st.builds(lambda t, sig: f"t={t},v1={sig}", st.text(max_size=30), st.text(max_size=80)),
    st.builds(lambda t, sig: f"t={t},v1={sig}", st.integers(), st.binary(max_size=64).map(bytes.hex)),
))
def test_any_signature_header_is_verified_or_a_400(header: str) -> None:
    payload = '{"id": "evt_1"}'
    try:
        verify_signature(payload, header, (SECRET,), now=NOW, tolerance=300)
    except WebhookRefused as problem:
        assert problem.status == 400
    else:  # only a real signature passes
        timestamp, _ = header.split(",", 1)
        assert stripe.WebhookSignature.generate_signature_header(payload, SECRET, int(timestamp[2:])) in header


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(payload=st.text(max_size=200), age=st.integers(min_value=0, max_value=300))
def test_a_real_signature_of_any_payload_verifies(payload: str, age: int) -> None:
    header = stripe.WebhookSignature.generate_signature_header(payload, SECRET, timestamp=int(NOW) - age)
    verify_signature(payload, header, (SECRET,), now=NOW, tolerance=300)
