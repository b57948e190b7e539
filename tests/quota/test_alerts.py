"""Usage alerts on a real SQLite store with a real webhook receiver: once per threshold, signed, retried."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gateway.cli.devservices import free_port
from metering.db import create_engine, session_factory
from metering.errors import ConfigError
from metering.migrate import upgrade_async
from metering.models import AlertEvent
from quota.alerts import (
    ALERT_TYPE,
    Alerts,
    AlertSettings,
    alert_id,
    crossed,
    parse_alert_settings,
    verify_signature,
)
from tests.metering.conftest import db_url, postgres_database  # noqa: F401  (fixtures: SQLite and PostgreSQL)
from tests.support import Upstream

NOW = datetime(2025, 1, 17, 9, 30, 12, 345678, tzinfo=UTC)
JANUARY = datetime(2025, 1, 1, tzinfo=UTC)
FEBRUARY = datetime(2025, 2, 1, tzinfo=UTC)
SECRET = "whsec_test_0123456789"

Sessions = async_sessionmaker[AsyncSession]


# --------------------------------------------------------------------------- real parts


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.body)
        return result


@dataclass
class Receiver:
    """A webhook receiver: answers with `statuses` in turn (200 once they run out), records each request."""

    statuses: list[int] = field(default_factory=list)
    requests: list[Delivery] = field(default_factory=list)
    answered: list[int] = field(default_factory=list)
    url: str = ""

    @property
    def accepted(self) -> list[Delivery]:
        return [d for d, status in zip(self.requests, self.answered, strict=True) if status == 200]

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append(Delivery(dict(request.headers), await request.read()))
        status = self.statuses.pop(0) if self.statuses else 200
        self.answered.append(status)
        headers = {"Retry-After": "0"} if status == 429 else {}
        return web.Response(status=status, text="ok", headers=headers)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/hooks/alerts", receiver.handle)
    server = await Upstream(app).start()
    receiver.url = f"{server.url}/hooks/alerts"
    yield receiver
    await server.close()


@pytest.fixture
async def migrated_url(db_url: str) -> str:  # noqa: F811  (db_url: SQLite and PostgreSQL)
    await upgrade_async(db_url)
    return db_url


@asynccontextmanager
async def open_sessions(url: str) -> AsyncIterator[Sessions]:
    engine = create_engine(url)
    try:
        yield session_factory(engine)
    finally:
        await engine.dispose()


@pytest.fixture
async def sessions(migrated_url: str) -> AsyncIterator[Sessions]:
    async with open_sessions(migrated_url) as sessions:
        yield sessions


@pytest.fixture
async def running() -> AsyncIterator[list[Alerts]]:
    """Alerts instances closed at the end even when a test fails (closing twice is harmless)."""
    instances: list[Alerts] = []
    yield instances
    for alerts in instances:
        await alerts.close()


def fixed_clock() -> float:
    return NOW.timestamp()


async def make_alerts(sessions: Sessions, running: list[Alerts], settings: AlertSettings | None = None,
                      **kwargs: Any) -> Alerts:
    alerts = Alerts(settings or AlertSettings(), sessions, clock=fixed_clock,
                    backoff_base=0.01, backoff_max=0.05, **kwargs)
    await alerts.start()
    running.append(alerts)
    return alerts


async def wait_until(predicate: Callable[[], bool], within: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not predicate():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def row_count(sessions: Sessions) -> int:
    async with sessions() as session:
        return int(await session.scalar(select(func.count()).select_from(AlertEvent)) or 0)


async def wait_rows(sessions: Sessions, expected: int, within: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while (count := await row_count(sessions)) != expected:
        assert loop.time() < deadline, f"{count} alert rows, expected {expected}"
        await asyncio.sleep(0.01)


# --------------------------------------------------------------------------- pure parts


@pytest.mark.parametrize(
    ("used", "limit", "expected"),
    [
        (0, 100, ()),
        (79, 100, ()),
        (80, 100, (0.8,)),
        (99.9, 100, (0.8,)),
        (100, 100, (0.8, 1.0)),
        (250, 100, (0.8, 1.0)),
        (5, None, ()),
        (0, 0, ()),
        (1, 0, (0.8, 1.0)),
    ],
)
def test_crossed(used: float, limit: float | None, expected: tuple[float, ...]) -> None:
    assert crossed(used, limit, (0.8, 1.0)) == expected


def test_crossed_exact_fractions() -> None:
    # 0.07 * 100 is 7.000000000000001 in floats; 7 of 100 must still reach 0.07.
    assert crossed(7, 100, (0.07,)) == (0.07,)
    assert crossed(1, 3, (1 / 3,)) == (1 / 3,)


def test_parse_defaults() -> None:
    assert parse_alert_settings(None) == AlertSettings()
    assert parse_alert_settings({}) == AlertSettings(thresholds=(0.8, 1.0), webhook_url=None)


def test_parse_normalizes() -> None:
    settings = parse_alert_settings({
        "thresholds": [1, 0.5, 1.0, 0.5, 2], "webhook_url": "https://hooks.example.com/cosmos",
        "webhook_secret": SECRET, "max_attempts": 3,
    })
    assert settings == AlertSettings((0.5, 1.0, 2.0), "https://hooks.example.com/cosmos", SECRET, 3)
    assert all(type(t) is float for t in settings.thresholds)


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ("yes", "alerts"),
        ({"threshold": [0.8]}, "alerts.threshold"),
        ({"thresholds": []}, "alerts.thresholds"),
        ({"thresholds": 0.8}, "alerts.thresholds"),
        ({"thresholds": [0.8, 0]}, "alerts.thresholds[1]"),
        ({"thresholds": [0.5, 0.8, 10.5]}, "alerts.thresholds[2]"),
        ({"thresholds": [-1]}, "alerts.thresholds[0]"),
        ({"thresholds": [True]}, "alerts.thresholds[0]"),
        ({"thresholds": ["0.8"]}, "alerts.thresholds[0]"),
        ({"thresholds": [float("nan")]}, "alerts.thresholds[0]"),
        ({"webhook_url": "ftp://hooks.example.com/"}, "alerts.webhook_url"),
        ({"webhook_url": "http://"}, "alerts.webhook_url"),
        ({"webhook_url": "hooks.example.com/x"}, "alerts.webhook_url"),
        ({"webhook_url": "http://host:99999/"}, "alerts.webhook_url"),
        ({"webhook_url": 42}, "alerts.webhook_url"),
        ({"webhook_secret": ""}, "alerts.webhook_secret"),
        ({"webhook_secret": ["s3cr3t-value"]}, "alerts.webhook_secret"),
        ({"max_attempts": 0}, "alerts.max_attempts"),
        ({"max_attempts": True}, "alerts.max_attempts"),
    ],
)
def test_parse_errors_name_the_key(raw: Any, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_alert_settings(raw)
    assert caught.value.key == key
    assert str(caught.value).startswith(f"{key}: ")
    assert "s3cr3t" not in str(caught.value)


def test_alert_id_is_deterministic() -> None:
    first = alert_id("acme", "chain_deployments", JANUARY, 0.8)
    assert first == alert_id("acme", "chain_deployments", JANUARY, 0.8)
    assert first.startswith("alrt_") and len(first) == 37
    others = {
        alert_id("acme", "chain_deployments", JANUARY, 1.0),
        alert_id("acme", "chain_deployments", FEBRUARY, 0.8),
        alert_id("acme", "storage_gb", JANUARY, 0.8),
        alert_id("acme2", "chain_deployments", JANUARY, 0.8),
    }
    assert first not in others and len(others) == 4


# --------------------------------------------------------------------------- with the store and a receiver


async def test_one_alert_per_threshold_across_two_instances(
    migrated_url: str, sessions: Sessions, receiver: Receiver, running: list[Alerts]
) -> None:
    settings = AlertSettings(webhook_url=receiver.url, webhook_secret=SECRET)
    # Two engines on one file: what two gateway processes see.
    async with open_sessions(migrated_url) as other_sessions, aiohttp.ClientSession() as http:
        first = await make_alerts(sessions, running, settings)
        second = await make_alerts(other_sessions, running, settings, http=http)
        for used in (50, 81, 85, 90, 99, 100, 100, 120):
            for _ in range(20):
                first.observe("acme", "chain_deployments", JANUARY, used, 100)
                second.observe("acme", "chain_deployments", JANUARY, used, 100)
            await asyncio.sleep(0)
        await wait_until(lambda: len(receiver.requests) >= 2)
        await first.close()
        await second.close()
        assert not http.closed  # an injected session belongs to the caller

    assert await row_count(sessions) == 2
    bodies = sorted((d.json for d in receiver.requests), key=lambda body: body["threshold"])
    assert [body["threshold"] for body in bodies] == [0.8, 1.0]
    assert all(body["tenant"] == "acme" and body["meter"] == "chain_deployments" for body in bodies)
    ids = {d.headers["X-Cosmos-Alert-Id"] for d in receiver.requests}
    assert ids == {alert_id("acme", "chain_deployments", JANUARY, t) for t in (0.8, 1.0)}


async def test_webhook_body_and_signature(
    sessions: Sessions, receiver: Receiver, running: list[Alerts]
) -> None:
    settings = AlertSettings(webhook_url=receiver.url, webhook_secret=SECRET)
    alerts = await make_alerts(sessions, running, settings)
    alerts.observe("acme", "chain_deployments", JANUARY, 80, 100)
    await wait_until(lambda: len(receiver.requests) == 1)
    await alerts.close()

    [delivery] = receiver.requests
    assert delivery.headers["Content-Type"] == "application/json"
    assert delivery.headers["X-Cosmos-Alert-Id"] == alert_id("acme", "chain_deployments", JANUARY, 0.8)
    assert delivery.json == {
        "type": ALERT_TYPE, "tenant": "acme", "meter": "chain_deployments", "threshold": 0.8,
        "used": 80, "limit": 100, "period_start": "2025-01-01T00:00:00Z", "at": "2025-01-17T09:30:12Z",
    }

    # Verified by hand, the way a receiver in any language would.
    signature = delivery.headers["X-Cosmos-Signature"]
    fields = dict(item.split("=", 1) for item in signature.split(","))
    assert set(fields) == {"t", "v1"}
    assert int(fields["t"]) == int(NOW.timestamp())
    signed = f"{fields['t']}.".encode() + delivery.body
    expected = hmac.new(SECRET.encode(), signed, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(fields["v1"], expected)

    now = NOW.timestamp()
    assert verify_signature(signature, delivery.body, SECRET, now=now)
    assert not verify_signature(signature, delivery.body + b" ", SECRET, now=now)
    assert not verify_signature(signature, delivery.body, "another-secret", now=now)
    assert not verify_signature(signature, delivery.body, SECRET, now=now + 301)
    assert not verify_signature("v1=" + expected, delivery.body, SECRET, now=now)


async def test_unsigned_without_secret(sessions: Sessions, receiver: Receiver, running: list[Alerts]) -> None:
    alerts = await make_alerts(sessions, running, AlertSettings(webhook_url=receiver.url))
    alerts.observe("acme", "storage_gb", JANUARY, 10, 10)
    await wait_until(lambda: len(receiver.requests) == 2)
    await alerts.close()
    assert all("X-Cosmos-Signature" not in d.headers for d in receiver.requests)


@pytest.mark.parametrize("statuses", [[500, 500], [503, 429]])
async def test_retries_until_delivered_once(
    sessions: Sessions, receiver: Receiver, running: list[Alerts], statuses: list[int]
) -> None:
    receiver.statuses = list(statuses)
    settings = AlertSettings(thresholds=(1.0,), webhook_url=receiver.url, webhook_secret=SECRET)
    alerts = await make_alerts(sessions, running, settings)
    alerts.observe("acme", "chain_deployments", JANUARY, 100, 100)
    await wait_until(lambda: len(receiver.accepted) == 1)
    await alerts.close()

    assert receiver.answered == [*statuses, 200]
    assert len(receiver.accepted) == 1
    # Every attempt is the same alert and body; each is signed on its own.
    assert len({d.headers["X-Cosmos-Alert-Id"] for d in receiver.requests}) == 1
    assert len({d.body for d in receiver.requests}) == 1
    assert all(verify_signature(d.headers["X-Cosmos-Signature"], d.body, SECRET, now=NOW.timestamp())
               for d in receiver.requests)


async def test_gives_up_after_max_attempts(
    sessions: Sessions, receiver: Receiver, running: list[Alerts], caplog: pytest.LogCaptureFixture
) -> None:
    receiver.statuses = [500] * 10
    settings = AlertSettings(thresholds=(1.0,), webhook_url=receiver.url, max_attempts=3)
    alerts = await make_alerts(sessions, running, settings)
    with caplog.at_level(logging.ERROR, logger="cosmos_gateway.alerts"):
        alerts.observe("acme", "chain_deployments", JANUARY, 100, 100)
        await wait_until(lambda: "not delivered" in caplog.text)
        # Raised all the same: the alert is recorded and not attempted again.
        alerts.observe("acme", "chain_deployments", JANUARY, 100, 100)
        await alerts.close()
    assert receiver.answered == [500, 500, 500]
    assert "after 3 attempt(s): HTTP 500" in caplog.text
    assert await row_count(sessions) == 1


async def test_client_error_is_not_retried(
    sessions: Sessions, receiver: Receiver, running: list[Alerts]
) -> None:
    receiver.statuses = [410]
    alerts = await make_alerts(sessions, running, AlertSettings(thresholds=(1.0,), webhook_url=receiver.url))
    alerts.observe("acme", "chain_deployments", JANUARY, 100, 100)
    await wait_until(lambda: len(receiver.requests) == 1)
    await alerts.close()
    assert receiver.answered == [410]


async def test_unreachable_receiver_is_retried_then_given_up(
    sessions: Sessions, running: list[Alerts], caplog: pytest.LogCaptureFixture
) -> None:
    url = f"http://127.0.0.1:{free_port()}/hooks"  # nothing listens there
    settings = AlertSettings(thresholds=(1.0,), webhook_url=url, max_attempts=2)
    alerts = await make_alerts(sessions, running, settings)
    with caplog.at_level(logging.ERROR, logger="cosmos_gateway.alerts"):
        alerts.observe("acme", "chain_deployments", JANUARY, 100, 100)
        await wait_until(lambda: "not delivered after 2 attempt(s)" in caplog.text)
    await alerts.close()


async def test_new_period_alerts_again(sessions: Sessions, receiver: Receiver, running: list[Alerts]) -> None:
    alerts = await make_alerts(sessions, running, AlertSettings(thresholds=(0.8,), webhook_url=receiver.url))
    alerts.observe("acme", "chain_deployments", JANUARY, 90, 100)
    await wait_until(lambda: len(receiver.requests) == 1)
    alerts.observe("acme", "chain_deployments", JANUARY, 95, 100)
    alerts.observe("acme", "chain_deployments", FEBRUARY, 85, 100)
    await wait_until(lambda: len(receiver.requests) == 2)
    await alerts.close()

    periods = [d.json["period_start"] for d in receiver.requests]
    assert periods == ["2025-01-01T00:00:00Z", "2025-02-01T00:00:00Z"]
    assert await row_count(sessions) == 2


async def test_unlimited_or_unused_raises_nothing(
    sessions: Sessions, receiver: Receiver, running: list[Alerts]
) -> None:
    alerts = await make_alerts(sessions, running, AlertSettings(webhook_url=receiver.url))
    for used in (0, 10, 10**9):
        alerts.observe("acme", "chains", JANUARY, used, None)
    alerts.observe("acme", "chain_deployments", JANUARY, 0, 100)
    await alerts.close()
    assert receiver.requests == []
    assert await row_count(sessions) == 0
    assert await alerts.alerts_for("acme", JANUARY) == []


async def test_alert_raised_elsewhere_is_not_sent(
    sessions: Sessions, receiver: Receiver, running: list[Alerts]
) -> None:
    earlier = datetime(2025, 1, 10, tzinfo=UTC)
    async with sessions() as session, session.begin():
        session.add(AlertEvent(tenant_id="acme", meter="chain_deployments", period_start=JANUARY,
                               threshold=0.8, at=earlier, value=80))
    alerts = await make_alerts(sessions, running, AlertSettings(webhook_url=receiver.url))
    alerts.observe("acme", "chain_deployments", JANUARY, 85, 100)
    await alerts.close()
    assert receiver.requests == []
    assert await alerts.alerts_for("acme", JANUARY) == [
        {"meter": "chain_deployments", "threshold": 0.8, "at": "2025-01-10T00:00:00Z"}
    ]


async def test_alerts_for_the_tenant_view(sessions: Sessions, running: list[Alerts]) -> None:
    alerts = await make_alerts(sessions, running)  # no webhook: recorded and shown only
    alerts.observe("acme", "storage_gb", JANUARY, 10, 10)
    alerts.observe("acme", "chain_deployments", JANUARY, 80, 100)
    alerts.observe("acme", "chain_deployments", FEBRUARY, 80, 100)
    alerts.observe("globex", "chain_deployments", JANUARY, 100, 100)
    await wait_rows(sessions, 6)
    await alerts.close()

    assert await alerts.alerts_for("acme", JANUARY) == [
        {"meter": "chain_deployments", "threshold": 0.8, "at": "2025-01-17T09:30:12Z"},
        {"meter": "storage_gb", "threshold": 0.8, "at": "2025-01-17T09:30:12Z"},
        {"meter": "storage_gb", "threshold": 1.0, "at": "2025-01-17T09:30:12Z"},
    ]
    assert [a["meter"] for a in await alerts.alerts_for("acme", FEBRUARY)] == ["chain_deployments"]
    assert len(await alerts.alerts_for("globex", JANUARY)) == 2
    assert await alerts.alerts_for("initech", JANUARY) == []


async def test_full_queue_drops_and_the_next_observe_requeues(
    sessions: Sessions, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    alerts = Alerts(AlertSettings(webhook_url=receiver.url), sessions, clock=fixed_clock, queue_size=1)
    with caplog.at_level(logging.WARNING, logger="cosmos_gateway.alerts"):
        # Not started yet, so nothing drains: 0.8 takes the one slot, 1.0 is dropped.
        alerts.observe("acme", "chain_deployments", JANUARY, 100, 100)
    assert alerts.dropped == 1
    assert "alert queue full" in caplog.text

    await alerts.start()
    try:
        await wait_rows(sessions, 1)
        alerts.observe("acme", "chain_deployments", JANUARY, 100, 100)
        await wait_rows(sessions, 2)
        await wait_until(lambda: len(receiver.requests) == 2)
    finally:
        await alerts.close()
    assert sorted(d.json["threshold"] for d in receiver.requests) == [0.8, 1.0]


async def test_observe_after_close_is_ignored(sessions: Sessions, running: list[Alerts]) -> None:
    alerts = await make_alerts(sessions, running)
    await alerts.close()
    alerts.observe("acme", "chain_deployments", JANUARY, 100, 100)
    await asyncio.sleep(0.05)
    assert await row_count(sessions) == 0
