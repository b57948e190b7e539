"""Reconciliation against the Stripe emulator and a real SQLite store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest
import stripe
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from billing_sync.reconcile import Difference, format_differences, parse_period, reconcile
from metering.db import create_engine, session_factory
from metering.meters import Meter
from metering.migrate import upgrade_async
from metering.models import LedgerEntry, Tenant
from tests.billing_sync.stripe_emulator import ManualClock, StripeEmulator
from tests.metering.conftest import db_url, postgres_database  # noqa: F401  (fixtures: SQLite and PostgreSQL)

JAN = (datetime(2027, 1, 1, tzinfo=UTC), datetime(2027, 2, 1, tzinfo=UTC))
NOW = datetime(2027, 1, 20, 12, tzinfo=UTC)  # the emulator accepts events up to 35 days old
HOUR = timedelta(hours=1)

API_CALLS = Meter("api_calls", "request", "counter", None, "/api/**", "api_calls")
STORAGE = Meter("storage_gb", "reported", "gauge", None, None, "storage_gb")
CHAINS = Meter("chains", "reported", "gauge", None, None, None)  # not billed
METERS = (API_CALLS, STORAGE, CHAINS)


@dataclass
class World:
    sessions: async_sessionmaker[AsyncSession]
    emulator: StripeEmulator
    client: stripe.StripeClient

    async def tenant(self, tenant_id: str, customer: str | None) -> None:
        async with self.sessions() as session, session.begin():
            session.add(Tenant(id=tenant_id, plan="starter", stripe_customer_id=customer))
        if customer is not None:
            self.emulator.add_customer(customer)

    async def ledger(
        self, tenant_id: str, meter: Meter, at: datetime, value: str, *, state: str = "sent", customer: str | None
    ) -> None:
        async with self.sessions() as session, session.begin():
            session.add(
                LedgerEntry(
                    tenant_id=tenant_id,
                    meter=meter.name,
                    bucket_start=at,
                    value=Decimal(value),
                    kind=meter.kind,
                    state=state,
                    identifier=f"{tenant_id}:{meter.name}:{int(at.timestamp())}",
                    stripe_customer_id=customer,
                )
            )

    async def stripe_event(self, customer: str, meter: Meter, at: datetime, value: str, identifier: str) -> None:
        assert meter.stripe_event is not None
        await self.client.v1.billing.meter_events.create_async(
            params={
                "event_name": meter.stripe_event,
                "identifier": identifier,
                "payload": {"stripe_customer_id": customer, "value": value},
                "timestamp": int(at.timestamp()),
            }
        )

    async def sent(self, tenant_id: str, customer: str, meter: Meter, at: datetime, value: str) -> None:
        """A ledger row in state "sent" and the same event accepted by Stripe, as the sync worker leaves them."""
        await self.ledger(tenant_id, meter, at, value, customer=customer)
        await self.stripe_event(customer, meter, at, value, f"{tenant_id}:{meter.name}:{int(at.timestamp())}")

    async def run(self, meters: tuple[Meter, ...] = METERS, **kw: object) -> list[Difference]:
        return await reconcile(sessions=self.sessions, client=self.client, meters=meters, period=JAN, **kw)  # type: ignore[arg-type]


@pytest.fixture
async def world(db_url: str) -> AsyncIterator[World]:  # noqa: F811
    engine = create_engine(db_url)
    await upgrade_async(engine)
    emulator = await StripeEmulator(clock=ManualClock(NOW.timestamp())).start()
    emulator.add_meter("api_calls", "sum")
    emulator.add_meter("storage_gb", "last")
    http = stripe.AIOHTTPClient()
    client = stripe.StripeClient(
        "sk_test_reconcile",
        base_addresses={"api": emulator.url, "meter_events": emulator.url},
        max_network_retries=0,
        http_client=http,
    )
    try:
        yield World(session_factory(engine), emulator, client)
    finally:
        await http.close_async()
        await emulator.close()
        await engine.dispose()


async def seed_matching(w: World) -> None:
    """acme and beta with usage that Stripe holds exactly; noise the reconciliation must ignore."""
    start = JAN[0]
    await w.tenant("acme", "cus_acme")
    await w.tenant("beta", "cus_beta")
    await w.tenant("ghost", None)  # no Stripe customer: not reconciled
    await w.sent("acme", "cus_acme", API_CALLS, start, "10")  # first bucket of the period: included
    await w.sent("acme", "cus_acme", API_CALLS, start + 5 * HOUR, "32")
    await w.sent("acme", "cus_acme", STORAGE, start + 2 * HOUR, "2.5")
    await w.sent("acme", "cus_acme", STORAGE, start + 9 * HOUR, "4.25")
    await w.sent("beta", "cus_beta", API_CALLS, start + 24 * HOUR, "7")
    # December usage, sent and held by Stripe: outside the period on both sides.
    await w.sent("acme", "cus_acme", API_CALLS, start - HOUR, "1000")
    await w.sent("acme", "cus_acme", STORAGE, start - HOUR, "99")
    # Not sent (yet / ever): Stripe does not have it and the ledger side must not count it.
    await w.ledger("acme", API_CALLS, start + 30 * HOUR, "3", state="pending", customer="cus_acme")
    await w.ledger("beta", API_CALLS, start + 31 * HOUR, "4", state="parked", customer="cus_beta")
    await w.ledger("acme", STORAGE, start + 40 * HOUR, "50", state="pending", customer="cus_acme")
    # A bucket starting at the period's end belongs to the next period.
    await w.ledger("acme", API_CALLS, JAN[1], "8", customer="cus_acme")
    await w.ledger("ghost", API_CALLS, start + HOUR, "5", customer=None)
    await w.ledger("acme", CHAINS, start + HOUR, "3", customer="cus_acme")


async def test_ledger_and_stripe_agree(world: World) -> None:
    await seed_matching(world)
    assert await world.run() == []
    # One summary request per reconciled tenant and billed meter; the ghost tenant and `chains` are skipped.
    assert world.emulator.requests["event_summaries"] == 4
    assert format_differences([]) == "No differences: the ledger and Stripe agree for every tenant and billed meter."


async def test_ledger_row_stripe_does_not_have(world: World) -> None:
    await seed_matching(world)
    await world.ledger("acme", API_CALLS, JAN[0] + 50 * HOUR, "5", customer="cus_acme")  # "sent", never arrived
    assert await world.run() == [
        Difference("acme", "cus_acme", "api_calls", "api_calls", Decimal(47), Decimal(42)),
    ]


async def test_stripe_event_the_ledger_does_not_have(world: World) -> None:
    await seed_matching(world)
    await world.stripe_event("cus_beta", API_CALLS, JAN[0] + 60 * HOUR, "3", "stray-1")
    diffs = await world.run()
    assert diffs == [Difference("beta", "cus_beta", "api_calls", "api_calls", Decimal(7), Decimal(10))]
    assert diffs[0].delta == Decimal(-3)


async def test_tenant_with_usage_only_in_stripe_is_reported(world: World) -> None:
    await seed_matching(world)
    await world.tenant("gamma", "cus_gamma")
    await world.stripe_event("cus_gamma", STORAGE, JAN[0] + HOUR, "1.5", "stray-gamma")
    assert await world.run() == [
        Difference("gamma", "cus_gamma", "storage_gb", "storage_gb", Decimal(0), Decimal("1.5"))
    ]


async def test_refund_the_period_could_not_net_is_reported(world: World) -> None:
    await seed_matching(world)
    # Parked by the sync worker at the period's end: Stripe holds 7 for beta, 2 of which were refunded.
    await world.ledger("beta", API_CALLS, JAN[1] - timedelta(minutes=5), "-2", state="parked", customer="cus_beta")
    diffs = await world.run()
    assert diffs == [Difference("beta", "cus_beta", "api_calls", "api_calls", Decimal(7), Decimal(7),
                                "2 refunded units could not be netted in the period (parked)", Decimal(-2))]
    assert "could not be netted" in format_differences(diffs)


async def test_gauge_compares_the_latest_sent_bucket(world: World) -> None:
    await world.tenant("acme", "cus_acme")
    start = JAN[0]
    await world.sent("acme", "cus_acme", STORAGE, start + 1 * HOUR, "9")
    await world.sent("acme", "cus_acme", STORAGE, start + 3 * HOUR, "6")  # latest: a gauge is not summed
    await world.sent("acme", "cus_acme", STORAGE, start + 2 * HOUR, "12")
    assert await world.run((STORAGE,)) == []

    # Stripe's "last" now sees a newer value the ledger never sent.
    await world.stripe_event("cus_acme", STORAGE, start + 4 * HOUR, "7.75", "stray-gauge")
    assert await world.run((STORAGE,)) == [
        Difference("acme", "cus_acme", "storage_gb", "storage_gb", Decimal(6), Decimal("7.75"))
    ]


async def test_gauge_latest_bucket_missing_in_stripe(world: World) -> None:
    await world.tenant("acme", "cus_acme")
    await world.sent("acme", "cus_acme", STORAGE, JAN[0] + HOUR, "3")
    await world.ledger("acme", STORAGE, JAN[0] + 2 * HOUR, "4", customer="cus_acme")
    assert await world.run((STORAGE,)) == [
        Difference("acme", "cus_acme", "storage_gb", "storage_gb", Decimal(4), Decimal(3))
    ]


async def test_meters_are_paged(world: World) -> None:
    # The emulator lists newest first: the billed meters, created first, are only on the last page.
    for i in range(7):
        world.emulator.add_meter(f"other_{i}")
    await seed_matching(world)
    await world.ledger("beta", STORAGE, JAN[0] + HOUR, "2", customer="cus_beta")
    assert await world.run(page_size=2) == [
        Difference("beta", "cus_beta", "storage_gb", "storage_gb", Decimal(2), Decimal(0))
    ]
    assert world.emulator.requests["meters"] == 5  # 9 meters, 2 a page
    paths = [entry["path"] for entry in world.emulator.request_log if entry["endpoint"] == "meters"]
    assert all("limit=2" in path for path in paths)
    assert sum("starting_after=" in path for path in paths) == 4


async def test_billed_meter_missing_in_stripe(world: World) -> None:
    await seed_matching(world)
    gpu = Meter("gpu_seconds", "request", "counter", None, "/gpu/**", "gpu_seconds")
    await world.ledger("acme", gpu, JAN[0] + HOUR, "11", customer="cus_acme")
    diffs = await world.run((*METERS, gpu))
    note = "no Stripe meter with event_name 'gpu_seconds'"
    assert diffs == [
        Difference("acme", "cus_acme", "gpu_seconds", "gpu_seconds", Decimal(11), Decimal(0), note),
        Difference("beta", "cus_beta", "gpu_seconds", "gpu_seconds", Decimal(0), Decimal(0), note),
    ]
    text = format_differences(diffs)
    assert note in text and "gpu_seconds" in text


async def test_window_is_widened_to_minutes(world: World) -> None:
    await seed_matching(world)
    period = (JAN[0] + timedelta(seconds=20), JAN[1] - timedelta(seconds=20))
    # The emulator refuses unaligned windows; floor(start)/ceil(end) is the whole of January again.
    diffs = await reconcile(sessions=world.sessions, client=world.client, meters=METERS, period=period)
    # The ledger side keeps the exact bounds: the bucket at 00:00:00 falls before the period's start.
    assert diffs == [Difference("acme", "cus_acme", "api_calls", "api_calls", Decimal(32), Decimal(42))]


async def test_no_billed_meters_or_no_tenants_make_no_requests(world: World) -> None:
    assert await world.run() == []
    await world.tenant("acme", "cus_acme")
    assert await world.run((CHAINS,)) == []
    assert world.emulator.requests["meters"] == 0


def test_format_differences_table() -> None:
    text = format_differences(
        [
            Difference("acme", "cus_acme", "api_calls", "api_calls", Decimal("47.000000"), Decimal(42)),
            Difference("beta-long-name", "cus_b", "storage_gb", "storage_gb", Decimal("2.5"), Decimal(0)),
        ]
    )
    lines = text.splitlines()
    assert lines[0].split() == ["tenant", "customer", "meter", "ledger", "stripe"]
    assert lines[2].split() == ["acme", "cus_acme", "api_calls", "47", "42"]
    assert lines[3].split() == ["beta-long-name", "cus_b", "storage_gb", "2.5", "0"]
    assert lines[-1] == "2 differences between the ledger and Stripe."
    assert len({line.index("cus_") for line in lines[2:4]}) == 1  # columns aligned


@pytest.mark.parametrize(
    ("text", "start", "end"),
    [
        ("2025-02", datetime(2025, 2, 1, tzinfo=UTC), datetime(2025, 3, 1, tzinfo=UTC)),
        ("2024-12", datetime(2024, 12, 1, tzinfo=UTC), datetime(2025, 1, 1, tzinfo=UTC)),
        (" 2024-02 ", datetime(2024, 2, 1, tzinfo=UTC), datetime(2024, 3, 1, tzinfo=UTC)),
        (None, datetime(2027, 1, 1, tzinfo=UTC), datetime(2027, 2, 1, tzinfo=UTC)),
    ],
)
def test_parse_period(text: str | None, start: datetime, end: datetime) -> None:
    assert parse_period(text, NOW) == (start, end)


def test_parse_period_none_uses_utc_month_of_now() -> None:
    # 2027-01-31 23:30 at UTC-2 is already February in UTC.
    now = datetime(2027, 1, 31, 23, 30, tzinfo=timezone(timedelta(hours=-2)))
    assert parse_period(None, now) == (datetime(2027, 2, 1, tzinfo=UTC), datetime(2027, 3, 1, tzinfo=UTC))


@pytest.mark.parametrize(
    "text", ["2025-13", "2025-00", "2025-1", "25-01", "", "2025-01-01", "2025/01", "jan", "0001-01"]
)
def test_parse_period_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="YYYY-MM"):
        parse_period(text, NOW)
