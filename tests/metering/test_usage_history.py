"""Usage history (metering.usage_history) on real SQLite and PostgreSQL and a real redis-server: the ledger and the
buckets still in Redis merged, each unit counted once whichever step of a move the sync worker is at."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from billing_sync import ledger as ledger_module
from billing_sync.ledger import move_closed_buckets
from gateway.cli.devservices import RedisProcess, free_port
from metering import db, keys, usage_history
from metering.meters import DEFAULT_METERS
from metering.migrate import upgrade_async
from metering.models import Tenant
from metering.usage_history import (
    MAX_STEPS,
    HistoryUnavailable,
    RangeError,
    UsageHistory,
    resolve_range,
)
from tests.metering.conftest import db_url, postgres_database  # noqa: F401  (fixtures: SQLite and PostgreSQL)

METERS = {m.name: m for m in DEFAULT_METERS}
BUCKET = 300
GRACE = 10
ANCHOR = 15  # the tenant's periods run from the 15th to the 15th
PERIOD_START = datetime(2026, 3, 15, tzinfo=UTC)  # of the period [Mar 15, Apr 15)


def at(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp())


class Clock:
    def __init__(self, now: int) -> None:
        self.now = float(now)

    def __call__(self) -> float:
        return self.now


Stores = tuple[Redis, async_sessionmaker[AsyncSession], Clock, UsageHistory]


@pytest.fixture
async def stores(redis_server: RedisProcess, db_url: str) -> AsyncIterator[Stores]:  # noqa: F811
    engine = db.create_engine(db_url)
    await upgrade_async(engine)
    sessions = db.session_factory(engine)
    async with sessions() as session, session.begin():
        session.add(Tenant(id="acme", plan="starter", billing_anchor_day=ANCHOR))
    client = Redis.from_url(redis_server.url)
    clock = Clock(at("2026-03-15T10:00:00"))
    yield client, sessions, clock, UsageHistory(sessions, client, DEFAULT_METERS, bucket_seconds=BUCKET, clock=clock)
    await client.aclose()
    await engine.dispose()


async def move(client: Redis, sessions: async_sessionmaker[AsyncSession], now: float) -> None:
    await move_closed_buckets(client, sessions, METERS, now=now, bucket_seconds=BUCKET, grace_seconds=GRACE)


async def series(history: UsageHistory, step: str, start: str, end: str,
                 meters: tuple[str, ...] = ("api_calls", "storage_gb")) -> dict[str, dict[str, Decimal | None]]:
    """The history as {meter: {step start: value}}, every step of the range present."""
    result = await history.read("acme", list(meters), step, at(start), at(end))
    return {meter: {datetime.fromtimestamp(t, UTC).strftime("%m-%d %H:%M"): v for t, v in points}
            for meter, points in result.series.items()}


def nonzero(values: dict[str, Decimal | None]) -> dict[str, Decimal | None]:
    return {k: v for k, v in values.items() if v is not None and v != 0}


def test_the_staging_names_are_the_movers() -> None:
    assert usage_history.STAGING_SUFFIX == ledger_module.STAGING_SUFFIX
    assert usage_history.PLAN_FIELD == ledger_module.PLAN_FIELD


# ------------------------------------------------------------------ the range: steps, defaults, bounds


def _range(step: str, start: str | None = None, end: str | None = None, *, now: str = "2026-03-20T10:30:00",
           anchor: int | None = ANCHOR) -> tuple[str, str]:
    def parsed(text: str | None) -> datetime | None:
        return None if text is None else datetime.fromisoformat(text).replace(tzinfo=UTC)

    first, last = resolve_range(step, parsed(start), parsed(end), now=at(now), anchor_day=anchor)
    return (datetime.fromtimestamp(first, UTC).isoformat()[:16], datetime.fromtimestamp(last, UTC).isoformat()[:16])


def test_the_default_range_is_the_billing_period_so_far_from_the_anchor_day() -> None:
    assert _range("day") == ("2026-03-15T00:00", "2026-03-21T00:00")
    assert _range("day", anchor=None) == ("2026-03-01T00:00", "2026-03-21T00:00")
    # On the anchor day itself a new period starts: the day before belongs to the previous one.
    assert _range("day", now="2026-03-15T00:00:00") == ("2026-03-15T00:00", "2026-03-16T00:00")
    assert _range("day", now="2026-03-14T23:59:59") == ("2026-02-15T00:00", "2026-03-15T00:00")
    # Anchor 31 in a short month: the period starts on its last day.
    assert _range("day", now="2026-03-10T00:00:00", anchor=31) == ("2026-02-28T00:00", "2026-03-11T00:00")
    assert _range("hour") == ("2026-03-15T00:00", "2026-03-20T11:00")
    # Late in a period the hours of the period so far are more than 400: the last 400.
    assert _range("hour", now="2026-04-14T10:30:00") == ("2026-03-28T19:00", "2026-04-14T11:00")
    # Only `to`: the period holding the range's last step, up to `to`.
    assert _range("day", end="2026-03-01T00:00:00") == ("2026-02-15T00:00", "2026-03-01T00:00")


def test_from_is_rounded_down_and_to_up_to_the_step() -> None:
    assert _range("hour", "2026-03-16T10:59:59", "2026-03-16T12:00:01") == ("2026-03-16T10:00", "2026-03-16T13:00")
    assert _range("day", "2026-03-16T10:00:00", "2026-03-17T00:00:00") == ("2026-03-16T00:00", "2026-03-17T00:00")
    assert _range("day", "2026-03-16T10:00:00") == ("2026-03-16T00:00", "2026-03-21T00:00")  # to: now's step


@pytest.mark.parametrize(("step", "start", "end", "fields"), [
    ("week", None, None, ("step",)),
    ("day", "2026-03-16T00:00:00", "2026-03-16T00:00:00", ("from", "to")),
    ("day", "2026-03-17T00:00:00", "2026-03-16T00:00:00", ("from", "to")),
    ("day", "2026-03-21T00:00:00", None, ("from",)),  # after the end of today's step
    ("hour", "2026-03-01T00:00:00", "2026-03-17T17:00:00", ("from", "to")),  # 401 hours
    ("day", "2025-01-01T00:00:00", None, ("from",)),  # 444 days
    ("day", "1969-12-31T00:00:00", None, ("from",)),
    ("day", None, "2200-01-02T00:00:00", ("to",)),
])
def test_bad_ranges_name_their_fields(step: str, start: str | None, end: str | None, fields: tuple[str, ...]) -> None:
    with pytest.raises(RangeError) as raised:
        _range(step, start, end)
    assert raised.value.fields == fields


def test_four_hundred_steps_is_the_most() -> None:
    assert _range("hour", "2026-03-01T00:00:00", "2026-03-17T16:00:00")[1] == "2026-03-17T16:00"
    assert MAX_STEPS == 400


# ------------------------------------------------------------------ the ledger and Redis, merged

# A day and a half of a tenant: buckets old enough to be summed by the database, buckets of the day before the
# period boundary (anchor day 15) and after it, two closed buckets the worker moves, one in its grace, the open one.
TRAFFIC: list[tuple[str, dict[str, str]]] = [
    ("2026-03-13T12:00:00", {"api_calls": "9", "storage_gb": "10.25"}),
    ("2026-03-13T12:05:00", {"api_calls": "1"}),
    ("2026-03-14T23:55:00", {"api_calls": "4", "storage_gb": "11"}),
    ("2026-03-15T00:00:00", {"api_calls": "6", "chains": "3"}),  # chains: not billed, no history
    ("2026-03-15T09:00:00", {"api_calls": "7", "storage_gb": "12.5", "bandwidth_bytes": "1000"}),
    ("2026-03-15T09:05:00", {"api_calls": "3", "storage_gb": "12.75"}),
    ("2026-03-15T09:55:00", {"api_calls": "2"}),  # closed at 10:00:00, moved 10 s later
    ("2026-03-15T10:00:00", {"api_calls": "1", "storage_gb": "13"}),  # open
]
HOURS = {"api_calls": {"03-13 12:00": Decimal(10), "03-14 23:00": Decimal(4), "03-15 00:00": Decimal(6),
                       "03-15 09:00": Decimal(12), "03-15 10:00": Decimal(1)},
         "storage_gb": {"03-13 12:00": Decimal("10.25"), "03-14 23:00": Decimal(11),
                        "03-15 09:00": Decimal("12.75"), "03-15 10:00": Decimal(13)}}
DAYS = {"api_calls": {"03-13 00:00": Decimal(10), "03-14 00:00": Decimal(4), "03-15 00:00": Decimal(19)},
        "storage_gb": {"03-13 00:00": Decimal("10.25"), "03-14 00:00": Decimal(11), "03-15 00:00": Decimal(13)}}


async def count(client: Redis, traffic: list[tuple[str, dict[str, str]]]) -> None:
    """Bucket fields as the gateway's scripts write them: counters added, a gauge's last value set."""
    for when, fields in traffic:
        key = keys.bucket_key("acme", at(when))
        for name, value in fields.items():
            if METERS[name].kind == "gauge":
                await client.hset(key, name, value)
            else:
                await client.hincrby(key, name, int(value))


async def assert_history(history: UsageHistory) -> None:
    hours = await series(history, "hour", "2026-03-13T12:00:00", "2026-03-15T11:00:00")
    assert {meter: nonzero(values) for meter, values in hours.items()} == HOURS
    assert len(hours["api_calls"]) == 47  # every step, zeros included
    assert hours["storage_gb"]["03-15 08:00"] is None  # no report in that hour: no value, not 0
    assert hours["api_calls"]["03-15 08:00"] == 0
    days = await series(history, "day", "2026-03-13T00:00:00", "2026-03-16T00:00:00")
    assert {meter: nonzero(values) for meter, values in days.items()} == DAYS


async def test_history_is_the_same_before_during_and_after_every_move(stores: Stores) -> None:
    client, sessions, clock, history = stores
    await count(client, TRAFFIC[:2])
    await move(client, sessions, at("2026-03-14T00:00:00"))  # a day and more ago: from the ledger only
    await count(client, TRAFFIC[2:])
    await assert_history(history)  # four buckets from Redis, two summed by the database
    await move(client, sessions, at("2026-03-15T00:05:30"))  # the 14th's last and the 15th's first bucket
    await assert_history(history)
    clock.now = at("2026-03-15T10:00:30")
    await move(client, sessions, clock.now)
    await assert_history(history)
    assert await client.exists(keys.bucket_key("acme", at("2026-03-15T10:00:00"))) == 1  # the open bucket


@pytest.mark.parametrize("crash", ["plan_moves", "commit_rows", "_carry_and_delete"])
async def test_a_move_stopped_at_any_step_is_counted_once(stores: Stores, monkeypatch: pytest.MonkeyPatch,
                                                          crash: str) -> None:
    """plan_moves: staged, no plan; commit_rows: staged with its plan, no rows; _carry_and_delete: the rows
    committed and the staged hash still there."""
    client, sessions, clock, history = stores
    await count(client, TRAFFIC[:2])
    await move(client, sessions, at("2026-03-14T00:00:00"))
    await count(client, TRAFFIC[2:])
    clock.now = at("2026-03-15T10:00:30")

    async def crashed(*_: Any, **__: Any) -> Any:
        raise ConnectionError(f"the worker died in {crash}")

    with monkeypatch.context() as patch:
        patch.setattr(ledger_module, crash, crashed)
        with pytest.raises(ConnectionError):
            await move(client, sessions, clock.now)
    staged = [key async for key in client.scan_iter(match="gw:*:moving")]
    assert len(staged) == 5
    await assert_history(history)
    await move(client, sessions, clock.now)  # the next pass finishes them
    assert [key async for key in client.scan_iter(match="gw:*:moving")] == []
    await assert_history(history)


async def test_late_units_refunds_and_late_gauges_at_a_period_end(stores: Stores,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The 14th 23:55 is the period's last bucket (anchor day 15). Billed, then a refund and a late gauge report
    reach it: the refund is a row of its own (parked, negative), the gauge keeps its billed value."""
    client, sessions, clock, history = stores
    last = keys.bucket_key("acme", at("2026-03-14T23:55:00"))
    await client.hset(last, mapping={"api_calls": 5, "storage_gb": "11"})
    clock.now = at("2026-03-15T00:00:30")
    await move(client, sessions, clock.now)
    await client.hset(last, mapping={"api_calls": -2, "storage_gb": "20"})  # late: stays in its own bucket
    expected = {"api_calls": {"03-14 23:00": Decimal(3)}, "storage_gb": {"03-14 23:00": Decimal(11)}}

    async def hours() -> dict[str, dict[str, Decimal | None]]:
        found = await series(history, "hour", "2026-03-14T22:00:00", "2026-03-15T01:00:00")
        return {meter: nonzero(values) for meter, values in found.items()}

    assert await hours() == expected
    with monkeypatch.context() as patch:
        async def crashed(*_: Any, **__: Any) -> Any:
            raise ConnectionError("died after the commit")

        patch.setattr(ledger_module, "_carry_and_delete", crashed)
        with pytest.raises(ConnectionError):
            await move(client, sessions, clock.now + 60)
    assert await client.exists(last + ":moving") == 1  # the leftover row is committed, the staged hash is there
    assert await hours() == expected
    await move(client, sessions, clock.now + 60)
    assert await hours() == expected
    # The period after the anchor day starts at 0: the default range of a day step is that period.
    start, end = resolve_range("day", None, None, now=clock.now, anchor_day=ANCHOR)
    assert (start, end) == (at("2026-03-15T00:00:00"), at("2026-03-16T00:00:00"))
    result = await history.read("acme", ["api_calls"], "day", start, end)
    assert result.series == {"api_calls": [(start, Decimal(0))]}


async def test_a_step_of_refunds_only_is_negative_and_exact(stores: Stores) -> None:
    client, sessions, clock, history = stores
    await client.hset(keys.bucket_key("acme", at("2026-03-15T08:00:00")), mapping={"api_calls": 4})
    await client.hset(keys.bucket_key("acme", at("2026-03-15T09:00:00")), mapping={"api_calls": -3})
    big = 10**14 - 2  # the ledger's NUMERIC(20, 6) holds 14 integer digits
    await client.hset(keys.bucket_key("acme", at("2026-03-15T07:00:00")), mapping={"bandwidth_bytes": big})
    await client.hset(keys.bucket_key("acme", at("2026-03-15T07:05:00")), mapping={"bandwidth_bytes": 1})
    before = await series(history, "hour", "2026-03-15T07:00:00", "2026-03-15T10:00:00",
                          ("api_calls", "bandwidth_bytes"))
    assert before["api_calls"] == {"03-15 07:00": 0, "03-15 08:00": 4, "03-15 09:00": -3}
    assert before["bandwidth_bytes"]["03-15 07:00"] == big + 1
    await move(client, sessions, clock.now)  # the debit is carried into the open bucket (10:00)
    after = await series(history, "hour", "2026-03-15T07:00:00", "2026-03-15T11:00:00",
                         ("api_calls", "bandwidth_bytes"))
    assert after["api_calls"] == {"03-15 07:00": 0, "03-15 08:00": 4, "03-15 09:00": 0, "03-15 10:00": -3}
    assert after["bandwidth_bytes"]["03-15 07:00"] == big + 1
    # Two days on, the 15th is summed by the database. A debit waits for units to net it against, carried from
    # bucket to bucket within the period: it shows where it waits (the sums of the period stay the same).
    clock.now = at("2026-03-17T00:00:30")
    await move(client, sessions, clock.now)
    days = await series(history, "day", "2026-03-15T00:00:00", "2026-03-18T00:00:00", ("api_calls", "bandwidth_bytes"))
    assert {meter: nonzero(values) for meter, values in days.items()} == {
        "api_calls": {"03-15 00:00": 4, "03-17 00:00": -3}, "bandwidth_bytes": {"03-15 00:00": big + 1}}


async def test_only_billed_meters_have_a_history(stores: Stores) -> None:
    _, _, _, history = stores
    assert history.meters == ["api_calls", "bandwidth_bytes", "chain_deployments", "storage_gb"]
    with pytest.raises(ValueError, match="chains"):
        await history.read("acme", ["chains"], "day", at("2026-03-15T00:00:00"), at("2026-03-16T00:00:00"))


async def test_a_tenant_is_known_by_its_ledger_rows(stores: Stores) -> None:
    client, sessions, clock, history = stores
    assert not await history.known("acme")
    await client.hset(keys.bucket_key("acme", at("2026-03-15T09:00:00")), mapping={"api_calls": 1})
    await move(client, sessions, clock.now)
    assert await history.known("acme")


async def test_redis_down_is_history_unavailable(stores: Stores) -> None:
    _, sessions, clock, _ = stores
    gone = Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.5)
    history = UsageHistory(sessions, gone, DEFAULT_METERS, bucket_seconds=BUCKET, clock=clock)
    with pytest.raises(HistoryUnavailable) as raised:
        await history.read("acme", ["api_calls"], "day", at("2026-03-15T00:00:00"), at("2026-03-16T00:00:00"))
    assert raised.value.part == "redis"
    # A range the Redis buckets cannot reach (older than a day) needs the database only.
    result = await history.read("acme", ["api_calls"], "day", at("2026-03-01T00:00:00"), at("2026-03-10T00:00:00"))
    assert len(result.series["api_calls"]) == 9
    await gone.aclose()


async def test_reads_beyond_the_concurrency_bound_are_refused_as_busy(stores: Stores,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    client, sessions, clock, _ = stores
    monkeypatch.setattr(usage_history, "QUEUE_SECONDS", 0.2)
    history = UsageHistory(sessions, client, DEFAULT_METERS, bucket_seconds=BUCKET, clock=clock, max_concurrent=1)
    started, release = asyncio.Event(), asyncio.Event()
    read_buckets: Callable[..., Any] = history._open_buckets

    async def slow(*args: Any) -> Any:
        started.set()
        await release.wait()
        return await read_buckets(*args)

    monkeypatch.setattr(history, "_open_buckets", slow)
    window = ("acme", ["api_calls"], "hour", at("2026-03-15T09:00:00"), at("2026-03-15T11:00:00"))
    first = asyncio.create_task(history.read(*window))
    await started.wait()
    with pytest.raises(HistoryUnavailable) as raised:
        await history.read(*window)
    assert raised.value.part == "busy"
    release.set()
    assert len((await first).series["api_calls"]) == 2
