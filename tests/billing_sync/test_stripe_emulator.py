"""The Stripe emulator, driven by the real ``stripe`` library (sync through a thread, async on aiohttp)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import aiohttp
import pytest
import stripe

from tests.billing_sync.stripe_emulator import (
    DAY,
    DUPLICATE_IDENTIFIER_CODE,
    ManualClock,
    StripeEmulator,
)

NOW = 1_800_000_000  # a minute boundary
CUSTOMER = "cus_test_1"


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(NOW)


@pytest.fixture
async def emulator(clock: ManualClock) -> AsyncIterator[StripeEmulator]:
    em = await StripeEmulator(clock=clock).start()
    em.add_customer(CUSTOMER)
    yield em
    await em.close()


def make_client(em: StripeEmulator, key: str = "sk_test_123", retries: int = 0, **kw: Any) -> stripe.StripeClient:
    return stripe.StripeClient(
        key, base_addresses={"api": em.url, "meter_events": em.url}, max_network_retries=retries, **kw
    )


@pytest.fixture
async def http_client() -> AsyncIterator[stripe.AIOHTTPClient]:
    client = stripe.AIOHTTPClient()
    yield client
    await client.close_async()


@pytest.fixture
def client(emulator: StripeEmulator, http_client: stripe.AIOHTTPClient) -> stripe.StripeClient:
    return make_client(emulator, http_client=http_client)


def event(
    identifier: str, value: str = "5", *, name: str = "api_calls", customer: str = CUSTOMER, timestamp: int | None = NOW
) -> dict[str, Any]:
    params: dict[str, Any] = {
        "event_name": name,
        "identifier": identifier,
        "payload": {"stripe_customer_id": customer, "value": value},
    }
    if timestamp is not None:
        params["timestamp"] = timestamp
    return params


async def test_accepted_event_sync_client_and_totals(emulator: StripeEmulator) -> None:
    emulator.add_meter("api_calls")
    sync_client = make_client(emulator)
    result = await asyncio.to_thread(sync_client.v1.billing.meter_events.create, params=event("e1", "7"))
    assert isinstance(result, stripe.billing.MeterEvent)
    assert result.object == "billing.meter_event"
    assert result.identifier == "e1"
    assert result.timestamp == NOW
    assert result.payload["value"] == "7"
    assert result.livemode is False
    await asyncio.to_thread(sync_client.v1.billing.meter_events.create, params=event("e2", "3"))
    assert emulator.totals(CUSTOMER, "api_calls") == Decimal(10)
    assert [e.identifier for e in emulator.events] == ["e1", "e2"]
    assert emulator.requests["meter_events"] == 2


async def test_decimal_values_and_default_timestamp(emulator: StripeEmulator, client: stripe.StripeClient) -> None:
    emulator.add_meter("api_calls")
    await client.v1.billing.meter_events.create_async(params=event("d1", "1.25", timestamp=None))
    await client.v1.billing.meter_events.create_async(params=event("d2", "0.75"))
    assert emulator.totals(CUSTOMER, "api_calls") == Decimal("2.00")
    assert emulator.events[0].timestamp == NOW


async def test_duplicate_identifier(emulator: StripeEmulator, client: stripe.StripeClient, clock: ManualClock) -> None:
    emulator.add_meter("api_calls")
    await client.v1.billing.meter_events.create_async(params=event("dup-1"))
    with pytest.raises(stripe.InvalidRequestError) as info:
        await client.v1.billing.meter_events.create_async(params=event("dup-1", "9"))
    err = info.value
    assert err.http_status == 400
    assert err.code == DUPLICATE_IDENTIFIER_CODE == "duplicate_meter_event"
    assert err.user_message == "An event already exists with identifier dup-1."
    assert err.param == "identifier"
    assert err.headers is not None and err.headers.get("Stripe-Should-Retry") == "false"
    assert emulator.totals(CUSTOMER, "api_calls") == Decimal(5)
    clock.advance(DAY - 1)
    with pytest.raises(stripe.InvalidRequestError):
        await client.v1.billing.meter_events.create_async(params=event("dup-1", timestamp=int(clock())))
    clock.advance(2)  # the 24 h uniqueness window has passed
    await client.v1.billing.meter_events.create_async(params=event("dup-1", timestamp=int(clock())))
    assert len(emulator.events) == 2


@pytest.mark.parametrize(
    ("offset", "ok", "code"),
    [
        (-35 * DAY, True, None),
        (-35 * DAY - 1, False, "timestamp_too_far_in_past"),
        (300, True, None),
        (301, False, "timestamp_in_future"),
    ],
)
async def test_timestamp_window(
    emulator: StripeEmulator, client: stripe.StripeClient, offset: int, ok: bool, code: str | None
) -> None:
    emulator.add_meter("api_calls")
    params = event("ts", timestamp=NOW + offset)
    if ok:
        await client.v1.billing.meter_events.create_async(params=params)
        assert len(emulator.events) == 1
    else:
        with pytest.raises(stripe.InvalidRequestError) as info:
            await client.v1.billing.meter_events.create_async(params=params)
        assert info.value.code == code
        assert info.value.param == "timestamp"
        assert emulator.events == []


@pytest.mark.parametrize(
    ("params", "code"),
    [
        (event("x", customer="cus_unknown"), "meter_event_customer_not_found"),
        (event("x", name="no_such_meter"), "no_meter"),
        (event("x", value="12abc"), "meter_event_invalid_value"),
        (event("x", value=""), "meter_event_invalid_value"),
        (event("x", value="1234567890123456"), "meter_event_value_too_many_digits"),
        ({"event_name": "api_calls", "payload": {"value": "1"}}, "meter_event_no_customer_defined"),
        ({"event_name": "api_calls", "payload": {"stripe_customer_id": CUSTOMER}}, "meter_event_value_not_found"),
        (event("x" * 101), "invalid_string_length"),
    ],
)
async def test_invalid_events_rejected(
    emulator: StripeEmulator, client: stripe.StripeClient, params: dict[str, Any], code: str
) -> None:
    emulator.add_meter("api_calls")
    with pytest.raises(stripe.InvalidRequestError) as info:
        await client.v1.billing.meter_events.create_async(params=params)
    assert info.value.code == code
    assert info.value.http_status == 400
    assert emulator.events == []


async def test_api_key_required(emulator: StripeEmulator, http_client: stripe.AIOHTTPClient) -> None:
    emulator.add_meter("api_calls")
    for key in ("pk_test_123", "nonsense"):
        bad = make_client(emulator, key=key, http_client=http_client)
        with pytest.raises(stripe.AuthenticationError) as info:
            await bad.v1.billing.meter_events.create_async(params=event("a"))
        assert info.value.http_status == 401
    assert emulator.events == []


async def test_idempotency_replay_and_mismatch(emulator: StripeEmulator, client: stripe.StripeClient) -> None:
    emulator.add_meter("api_calls")
    first = await client.v1.billing.meter_events.create_async(params=event("i1"), options={"idempotency_key": "k1"})
    again = await client.v1.billing.meter_events.create_async(params=event("i1"), options={"idempotency_key": "k1"})
    assert again.to_dict() == first.to_dict()
    assert first.last_response.headers.get("Idempotent-Replayed") is None
    assert again.last_response.headers.get("Idempotent-Replayed") == "true"
    assert len(emulator.events) == 1
    with pytest.raises(stripe.IdempotencyError):
        await client.v1.billing.meter_events.create_async(params=event("i2"), options={"idempotency_key": "k1"})
    assert len(emulator.events) == 1


async def test_rejected_request_is_not_saved_for_idempotency(
    emulator: StripeEmulator, client: stripe.StripeClient
) -> None:
    with pytest.raises(stripe.InvalidRequestError):  # no meter yet
        await client.v1.billing.meter_events.create_async(params=event("r1"), options={"idempotency_key": "k"})
    emulator.add_meter("api_calls")
    await client.v1.billing.meter_events.create_async(params=event("r1"), options={"idempotency_key": "k"})
    assert len(emulator.events) == 1


@pytest.mark.parametrize(
    ("status", "exc"),
    [
        (500, stripe.APIError),
        (503, stripe.APIError),
        (429, stripe.RateLimitError),
        (409, stripe.APIError),
        (400, stripe.InvalidRequestError),
    ],
)
async def test_fail_next(
    emulator: StripeEmulator, client: stripe.StripeClient, status: int, exc: type[Exception]
) -> None:
    emulator.add_meter("api_calls")
    emulator.fail_next(1, status=status)
    with pytest.raises(exc) as info:
        await client.v1.billing.meter_events.create_async(params=event("f1"))
    assert info.value.http_status == status  # type: ignore[attr-defined]
    assert emulator.events == []
    await client.v1.billing.meter_events.create_async(params=event("f1"))  # the fault is used up
    assert len(emulator.events) == 1
    assert emulator.requests["meter_events"] == 2


async def test_fail_next_endpoint_filter(emulator: StripeEmulator, client: stripe.StripeClient) -> None:
    emulator.add_meter("api_calls")
    emulator.fail_next(1, status=500, endpoint="meter_events")
    await client.v1.billing.meters.list_async()
    with pytest.raises(stripe.APIError):
        await client.v1.billing.meter_events.create_async(params=event("f2"))


async def test_library_retries_reuse_idempotency_key(
    emulator: StripeEmulator, http_client: stripe.AIOHTTPClient
) -> None:
    emulator.add_meter("api_calls")
    retrying = make_client(emulator, retries=2, http_client=http_client)
    emulator.fail_next(1, status=500)
    await retrying.v1.billing.meter_events.create_async(params=event("rt"))
    assert emulator.requests["meter_events"] == 2
    keys = {r["idempotency_key"] for r in emulator.request_log}
    assert len(keys) == 1
    assert len(emulator.events) == 1


async def test_drop_before_accept(emulator: StripeEmulator, client: stripe.StripeClient) -> None:
    emulator.add_meter("api_calls")
    emulator.drop_next(1)
    with pytest.raises(stripe.APIConnectionError):
        await client.v1.billing.meter_events.create_async(params=event("dr1"))
    assert emulator.events == []
    await client.v1.billing.meter_events.create_async(params=event("dr1"))
    assert len(emulator.events) == 1


async def test_drop_after_accept(emulator: StripeEmulator, client: stripe.StripeClient) -> None:
    emulator.add_meter("api_calls")
    emulator.drop_next(1, after_accept=True)
    with pytest.raises(stripe.APIConnectionError):
        await client.v1.billing.meter_events.create_async(params=event("dr2"), options={"idempotency_key": "kd"})
    assert len(emulator.events) == 1  # Stripe holds it although the client never heard
    replay = await client.v1.billing.meter_events.create_async(params=event("dr2"), options={"idempotency_key": "kd"})
    assert replay.last_response.headers.get("Idempotent-Replayed") == "true"
    with pytest.raises(stripe.InvalidRequestError) as info:  # a fresh key: the identifier is taken
        await client.v1.billing.meter_events.create_async(params=event("dr2"))
    assert info.value.code == DUPLICATE_IDENTIFIER_CODE
    assert emulator.totals(CUSTOMER, "api_calls") == Decimal(5)


async def test_drop_sync_client(emulator: StripeEmulator) -> None:
    emulator.add_meter("api_calls")
    emulator.drop_next(1, after_accept=True)
    sync_client = make_client(emulator)
    with pytest.raises(stripe.APIConnectionError):
        await asyncio.to_thread(sync_client.v1.billing.meter_events.create, params=event("ds"))
    assert len(emulator.events) == 1


async def test_slow(emulator: StripeEmulator, client: stripe.StripeClient) -> None:
    emulator.add_meter("api_calls")
    emulator.slow(0.3)
    started = time.monotonic()
    await client.v1.billing.meter_events.create_async(params=event("s1"))
    assert time.monotonic() - started >= 0.3
    emulator.slow(0)
    started = time.monotonic()
    await client.v1.billing.meter_events.create_async(params=event("s2"))
    assert time.monotonic() - started < 0.3


async def test_slow_after_accept_with_client_timeout(emulator: StripeEmulator) -> None:
    emulator.add_meter("api_calls")
    emulator.slow(2, after_accept=True)
    http = stripe.AIOHTTPClient(timeout=0.3)
    try:
        impatient = make_client(emulator, http_client=http)
        with pytest.raises(stripe.APIConnectionError):
            await impatient.v1.billing.meter_events.create_async(params=event("st"))
    finally:
        await http.close_async()
    assert len(emulator.events) == 1


async def stream_client(
    emulator: StripeEmulator, client: stripe.StripeClient, http_client: stripe.AIOHTTPClient
) -> stripe.StripeClient:
    session = await client.v2.billing.meter_event_session.create_async()
    return make_client(emulator, key=session.authentication_token, http_client=http_client)


def v2_event(identifier: str, value: str = "1", ts: str = "2027-01-15T08:00:00.000Z", **kw: Any) -> dict[str, Any]:
    return {
        "event_name": kw.get("name", "api_calls"),
        "identifier": identifier,
        "payload": {"stripe_customer_id": kw.get("customer", CUSTOMER), "value": value},
        "timestamp": ts,
    }


async def test_v2_session_and_stream(
    emulator: StripeEmulator, client: stripe.StripeClient, http_client: stripe.AIOHTTPClient
) -> None:
    emulator.add_meter("api_calls")
    session = await client.v2.billing.meter_event_session.create_async()
    assert session.object == "v2.billing.meter_event_session"
    assert session.authentication_token
    assert session.expires_at == "2027-01-15T08:15:00.000Z"  # NOW + 15 minutes
    streamer = make_client(emulator, key=session.authentication_token, http_client=http_client)
    result = await streamer.v2.billing.meter_event_stream.create_async(
        params={"events": [v2_event(f"v2-{i}", "2") for i in range(100)]}
    )
    assert result is None
    assert emulator.totals(CUSTOMER, "api_calls") == Decimal(200)
    assert {e.via for e in emulator.events} == {"v2"}
    assert emulator.events[0].timestamp == NOW


async def test_v2_stream_rules(
    emulator: StripeEmulator, client: stripe.StripeClient, http_client: stripe.AIOHTTPClient
) -> None:
    emulator.add_meter("api_calls")
    streamer = await stream_client(emulator, client, http_client)
    with pytest.raises(stripe.InvalidRequestError):
        await streamer.v2.billing.meter_event_stream.create_async(
            params={"events": [v2_event(f"many-{i}") for i in range(101)]}
        )
    await streamer.v2.billing.meter_event_stream.create_async(params={"events": [v2_event("a")]})
    with pytest.raises(stripe.InvalidRequestError) as info:  # one duplicate: the batch is refused whole
        await streamer.v2.billing.meter_event_stream.create_async(params={"events": [v2_event("b"), v2_event("a")]})
    assert info.value.code == DUPLICATE_IDENTIFIER_CODE
    with pytest.raises(stripe.InvalidRequestError) as info:
        await streamer.v2.billing.meter_event_stream.create_async(
            params={"events": [v2_event("old", ts="2026-12-01T00:00:00Z")]}
        )
    assert info.value.code == "timestamp_too_far_in_past"
    assert [e.identifier for e in emulator.events] == ["a"]
    with pytest.raises(stripe.AuthenticationError):  # a secret key is not a session token
        await client.v2.billing.meter_event_stream.create_async(params={"events": [v2_event("c")]})


async def test_v2_session_expires(
    emulator: StripeEmulator, client: stripe.StripeClient, http_client: stripe.AIOHTTPClient, clock: ManualClock
) -> None:
    emulator.add_meter("api_calls")
    streamer = await stream_client(emulator, client, http_client)
    clock.advance(15 * 60)
    with pytest.raises(stripe.TemporarySessionExpiredError) as info:
        await streamer.v2.billing.meter_event_stream.create_async(params={"events": [v2_event("late")]})
    assert info.value.http_status == 401
    assert emulator.events == []


async def test_v2_async_validation_mode(clock: ManualClock, http_client: stripe.AIOHTTPClient) -> None:
    async with StripeEmulator(clock=clock, stream_validation="async") as em:
        em.add_customer(CUSTOMER)
        em.add_meter("api_calls")
        c = make_client(em, http_client=http_client)
        streamer = await stream_client(em, c, http_client)
        await streamer.v2.billing.meter_event_stream.create_async(
            params={"events": [v2_event("a", "3"), v2_event("a", "3"), v2_event("b", customer="cus_nope")]}
        )
        assert [e.identifier for e in em.events] == ["a"]
        codes = [r["error"]["code"] for r in em.rejected]
        assert codes == [DUPLICATE_IDENTIFIER_CODE, "meter_event_customer_not_found"]


async def test_v2_stream_drop_after_accept_and_idempotent_replay(
    emulator: StripeEmulator, client: stripe.StripeClient, http_client: stripe.AIOHTTPClient
) -> None:
    emulator.add_meter("api_calls")
    streamer = await stream_client(emulator, client, http_client)
    emulator.drop_next(1, after_accept=True, endpoint="meter_event_stream")
    params = {"events": [v2_event("z1"), v2_event("z2")]}
    with pytest.raises(stripe.APIConnectionError):
        await streamer.v2.billing.meter_event_stream.create_async(params=params, options={"idempotency_key": "ks"})
    await streamer.v2.billing.meter_event_stream.create_async(params=params, options={"idempotency_key": "ks"})
    assert len(emulator.events) == 2
    assert emulator.requests["meter_event_stream"] == 2


async def test_meters_list_paging(emulator: StripeEmulator, client: stripe.StripeClient) -> None:
    ids = [emulator.add_meter(f"meter_{i}", "last" if i % 2 else "sum") for i in range(5)]
    seen: list[str] = []
    starting_after = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 2}
        if starting_after:
            params["starting_after"] = starting_after
        page = await client.v1.billing.meters.list_async(params=params)
        pages += 1
        seen += [m.id for m in page.data]
        for m in page.data:
            assert m.object == "billing.meter"
            assert m.status == "active"
            assert m.default_aggregation.formula in ("sum", "last")
            assert m.customer_mapping.event_payload_key == "stripe_customer_id"
            assert m.value_settings.event_payload_key == "value"
        if not page.has_more:
            break
        starting_after = page.data[-1].id
    assert pages == 3
    assert sorted(seen) == sorted(ids)
    sync_client = make_client(emulator)
    listed = await asyncio.to_thread(
        lambda: [m.id for m in sync_client.v1.billing.meters.list(params={"limit": 2}).auto_paging_iter()]
    )
    assert sorted(listed) == sorted(ids)
    one = await client.v1.billing.meters.retrieve_async(ids[0])
    assert one.event_name == "meter_0"


async def test_event_summaries_sum_and_last(emulator: StripeEmulator, client: stripe.StripeClient) -> None:
    sum_id = emulator.add_meter("api_calls", "sum")
    last_id = emulator.add_meter("storage_gb", "last")
    emulator.add_customer("cus_other")
    for i, (ts, value) in enumerate([(NOW - 600, "4"), (NOW - 60, "6"), (NOW - 3600, "100")]):
        await client.v1.billing.meter_events.create_async(params=event(f"s{i}", value, timestamp=ts))
        await client.v1.billing.meter_events.create_async(params=event(f"g{i}", value, name="storage_gb", timestamp=ts))
    await client.v1.billing.meter_events.create_async(params=event("o", "1000", customer="cus_other"))
    window = {"customer": CUSTOMER, "start_time": NOW - 1200, "end_time": NOW}
    sums = await client.v1.billing.meters.event_summaries.list_async(sum_id, params=window)
    assert len(sums.data) == 1
    summary = sums.data[0]
    assert summary.object == "billing.meter_event_summary"
    assert summary.aggregated_value == 10
    assert (summary.start_time, summary.end_time, summary.meter) == (NOW - 1200, NOW, sum_id)
    lasts = await client.v1.billing.meters.event_summaries.list_async(last_id, params=window)
    assert lasts.data[0].aggregated_value == 6  # the latest timestamp in the window, not the latest sent
    assert emulator.totals(CUSTOMER, "storage_gb") == Decimal(6)
    assert emulator.totals(CUSTOMER, "api_calls") == Decimal(110)
    assert emulator.totals(CUSTOMER, "api_calls", start=NOW - 1200, end=NOW) == Decimal(10)


async def test_event_summaries_validation(emulator: StripeEmulator, client: stripe.StripeClient) -> None:
    meter_id = emulator.add_meter("api_calls")
    with pytest.raises(stripe.InvalidRequestError) as info:
        await client.v1.billing.meters.event_summaries.list_async(
            meter_id, params={"customer": CUSTOMER, "start_time": NOW - 1190, "end_time": NOW}
        )
    assert info.value.param == "start_time"
    with pytest.raises(stripe.InvalidRequestError):
        await client.v1.billing.meters.event_summaries.list_async(
            meter_id, params={"customer": CUSTOMER, "start_time": NOW, "end_time": NOW}
        )
    with pytest.raises(stripe.InvalidRequestError):
        await client.v1.billing.meters.event_summaries.list_async(
            meter_id,
            params={"customer": CUSTOMER, "start_time": NOW - 60, "end_time": NOW, "value_grouping_window": "hour"},
        )
    with pytest.raises(stripe.InvalidRequestError) as info:
        await client.v1.billing.meters.event_summaries.list_async(
            "mtr_missing", params={"customer": CUSTOMER, "start_time": NOW - 60, "end_time": NOW}
        )
    assert info.value.http_status == 404
    empty = await client.v1.billing.meters.event_summaries.list_async(
        meter_id, params={"customer": CUSTOMER, "start_time": NOW - 60, "end_time": NOW}
    )
    assert empty.data[0].aggregated_value == 0


async def test_concurrent_same_idempotency_key(emulator: StripeEmulator, client: stripe.StripeClient) -> None:
    emulator.add_meter("api_calls")
    emulator.slow(0.3, endpoint="meter_events")
    results = await asyncio.gather(
        client.v1.billing.meter_events.create_async(params=event("c1"), options={"idempotency_key": "same"}),
        client.v1.billing.meter_events.create_async(params=event("c1"), options={"idempotency_key": "same"}),
        return_exceptions=True,
    )
    assert len(emulator.events) == 1
    conflicts = [r for r in results if isinstance(r, stripe.APIError)]
    assert len(conflicts) == 1 and conflicts[0].http_status == 409
    emulator.slow(0)
    replay = await client.v1.billing.meter_events.create_async(params=event("c1"), options={"idempotency_key": "same"})
    assert replay.last_response.headers.get("Idempotent-Replayed") == "true"


# --------------------------------------------------------------------------- the customer portal


async def test_portal_session_through_the_library(emulator: StripeEmulator, client: stripe.StripeClient,
                                                  http_client: stripe.AIOHTTPClient) -> None:
    session = await client.v1.billing_portal.sessions.create_async(
        params={"customer": CUSTOMER, "return_url": "https://app.example.com/billing", "locale": "fr"})
    assert isinstance(session, stripe.billing_portal.Session)
    assert session.object == "billing_portal.session" and session.id.startswith("bps_")
    assert session.customer == CUSTOMER and session.return_url == "https://app.example.com/billing"
    assert session.livemode is False and session.created == NOW and session.locale == "fr"
    assert session.configuration in emulator.portal_configurations
    assert session.url.startswith(f"{emulator.url}/p/session/test_")
    # The URL stands in for Stripe's portal: whose it is, and the way back.
    async with aiohttp.ClientSession() as http, http.get(session.url) as page:
        text = await page.text()
    assert page.status == 200 and CUSTOMER in text and 'href="https://app.example.com/billing"' in text
    assert emulator.requests["billing_portal_sessions"] == 1
    live = make_client(emulator, key="sk_live_123", http_client=http_client)
    assert (await live.v1.billing_portal.sessions.create_async(
        params={"customer": CUSTOMER, "return_url": "https://app.example.com/"})).livemode is True


@pytest.mark.parametrize(
    ("params", "param", "code"),
    [
        ({"return_url": "https://a.example/"}, "customer", "parameter_missing"),
        ({"customer": "cus_nobody", "return_url": "https://a.example/"}, "customer", "resource_missing"),
        ({"customer": CUSTOMER, "customer_account": "acct_1", "return_url": "https://a.example/"}, "customer",
         "parameter_invalid"),
        ({"customer": CUSTOMER, "return_url": "not a url"}, "return_url", "url_invalid"),
        ({"customer": CUSTOMER, "return_url": "/relative"}, "return_url", "url_invalid"),
        ({"customer": CUSTOMER}, "return_url", None),  # the default configuration has no default_return_url
        ({"customer": CUSTOMER, "return_url": "https://a.example/", "configuration": "bpc_nope"}, "configuration",
         "resource_missing"),
        ({"customer": CUSTOMER, "return_url": "https://a.example/", "locale": "xx"}, "locale", "parameter_invalid"),
        ({"customer": CUSTOMER, "return_url": "https://a.example/", "colour": "blue"}, "colour", "parameter_unknown"),
    ],
)
async def test_portal_session_rules(emulator: StripeEmulator, client: stripe.StripeClient, params: dict[str, Any],
                                    param: str, code: str | None) -> None:
    with pytest.raises(stripe.InvalidRequestError) as info:
        await client.v1.billing_portal.sessions.create_async(params=params)  # type: ignore[arg-type]
    assert (info.value.http_status, info.value.param, info.value.code) == (400, param, code)
    assert emulator.portal_sessions == {}


async def test_portal_configurations(emulator: StripeEmulator, client: stripe.StripeClient) -> None:
    chosen = emulator.add_portal_configuration(default_return_url="https://app.example.com/back")
    session = await client.v1.billing_portal.sessions.create_async(
        params={"customer": CUSTOMER, "configuration": chosen})
    assert session.configuration == chosen and session.return_url == "https://app.example.com/back"
    default = emulator.add_portal_configuration(default_return_url="https://app.example.com/home", is_default=True)
    session = await client.v1.billing_portal.sessions.create_async(params={"customer": CUSTOMER})
    assert session.configuration == default and session.return_url == "https://app.example.com/home"


async def test_portal_needs_saved_settings_and_a_secret_key(http_client: stripe.AIOHTTPClient) -> None:
    async with StripeEmulator(portal_configured=False) as em:
        em.add_customer(CUSTOMER)
        client = make_client(em, http_client=http_client)
        with pytest.raises(stripe.InvalidRequestError) as info:
            await client.v1.billing_portal.sessions.create_async(
                params={"customer": CUSTOMER, "return_url": "https://a.example/"})
        assert "default configuration has not been created" in str(info.value.user_message)
        anonymous = make_client(em, key="pk_test_123", http_client=http_client)
        with pytest.raises(stripe.AuthenticationError):
            await anonymous.v1.billing_portal.sessions.create_async(
                params={"customer": CUSTOMER, "return_url": "https://a.example/"})
