"""Usage alerts: one webhook when a tenant's usage of a meter reaches a threshold of its limit.

    alerts = Alerts(parse_alert_settings(raw), sessions)
    await alerts.start()
    alerts.observe(tenant, meter, period_start, used, limit)    # request path: sync, no I/O
    await alerts.alerts_for(tenant, period_start)               # tenant view: [{meter, threshold, at}]
    await alerts.close()

`observe` only compares numbers and puts new (tenant, meter, period, threshold) keys on a bounded queue.
A background task claims each by inserting an `alert_events` row: the primary key lets exactly one
gateway instance win, the others get an IntegrityError and stay silent. The winner POSTs the webhook.
The row is the claim, so a webhook that still fails after `max_attempts` (or a crash between insert and
send) is logged and not sent again; the alert still shows in the tenant view.

Webhook request (`POST webhook_url`, `Content-Type: application/json`)::

    {"type": "quota.threshold_reached", "tenant": "acme", "meter": "chain_deployments",
     "threshold": 0.8, "used": 80, "limit": 100,
     "period_start": "2025-01-01T00:00:00Z", "at": "2025-01-17T09:30:12Z"}

    X-Cosmos-Alert-Id: alrt_<32 hex>      same for every retry and every instance: dedupe on it
    X-Cosmos-Signature: t=<unix seconds>,v1=<hex>

Signature (the Stripe scheme, sent only when `webhook_secret` is set): `v1` is the hex HMAC-SHA256,
keyed with the secret, of `"<t>." + <raw request body bytes>`. A receiver recomputes it over the body as
received, compares in constant time and rejects a `t` too far from its clock (e.g. 5 minutes) to stop
replays; `verify_signature` below does exactly that. Each attempt is signed afresh with its own `t`.

Network errors, 429 and 5xx are retried with exponential backoff and jitter; other statuses (redirects
included) are final.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import math
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from metering.clock import Clock, rfc3339, system_clock, utcnow
from metering.errors import ConfigError, expect_mapping, kind_of
from metering.models import AlertEvent
from metering.tasks import cancel_and_wait

log = logging.getLogger("cosmos_gateway.alerts")

ALERT_TYPE = "quota.threshold_reached"
SIGNATURE_HEADER = "X-Cosmos-Signature"
ALERT_ID_HEADER = "X-Cosmos-Alert-Id"
MAX_THRESHOLD = 10.0

_AlertKey = tuple[str, str, datetime, float]


@dataclass(frozen=True, slots=True)
class AlertSettings:
    """The validated `alerts:` config."""

    thresholds: tuple[float, ...] = (0.8, 1.0)  # fractions of the limit, ascending
    webhook_url: str | None = None  # None: alerts are recorded and shown, nothing is sent
    webhook_secret: str | None = None  # None: webhooks go unsigned
    max_attempts: int = 5  # webhook attempts before giving up, the first included


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def parse_alert_settings(raw: Mapping[str, Any] | None) -> AlertSettings:
    """AlertSettings from the raw `alerts:` mapping; ConfigError naming the bad key."""
    if raw is None:
        return AlertSettings()
    raw = expect_mapping(raw, "alerts", ("thresholds", "webhook_url", "webhook_secret", "max_attempts"))
    defaults = AlertSettings()

    thresholds = defaults.thresholds
    if "thresholds" in raw:
        values = raw["thresholds"]
        if not isinstance(values, list | tuple) or not values:
            raise ConfigError("alerts.thresholds", f"expected a non-empty list, got {kind_of(values)}")
        for index, value in enumerate(values):
            if not _is_number(value) or not 0 < value <= MAX_THRESHOLD:
                raise ConfigError(
                    f"alerts.thresholds[{index}]",
                    f"expected a fraction of the limit in (0, {MAX_THRESHOLD:g}], got {kind_of(value)}",
                )
        thresholds = tuple(sorted({float(value) for value in values}))

    webhook_url = raw.get("webhook_url")
    if webhook_url is not None:
        if not isinstance(webhook_url, str):
            raise ConfigError(
                "alerts.webhook_url", f"expected an http(s) URL or null, got {kind_of(webhook_url)}"
            )
        try:
            parts = urlsplit(webhook_url)
            hostname = parts.hostname
            _ = parts.port  # raises ValueError on a bad port
        except ValueError as exc:
            raise ConfigError("alerts.webhook_url", f"not a valid URL: {exc}") from None
        if parts.scheme not in ("http", "https") or not hostname or any(c.isspace() for c in webhook_url):
            raise ConfigError(
                "alerts.webhook_url", f"expected an http(s) URL with a host, got {kind_of(webhook_url)}"
            )

    webhook_secret = raw.get("webhook_secret")
    if webhook_secret is not None and (not isinstance(webhook_secret, str) or not webhook_secret):
        # The value is a secret: say what it is, never echo it.
        what = "an empty string" if webhook_secret == "" else type(webhook_secret).__name__
        raise ConfigError("alerts.webhook_secret", f"expected a non-empty string or null, got {what}")
    if webhook_url is not None and webhook_secret is None:
        # Receivers must be able to tell the gateway's alerts from forged ones: alerts are always signed.
        raise ConfigError("alerts.webhook_url",
                                 "needs a signing key: set GATEWAY__ALERTS__WEBHOOK_SECRET")

    max_attempts = raw.get("max_attempts", defaults.max_attempts)
    if isinstance(max_attempts, bool) or not isinstance(max_attempts, int) or not 1 <= max_attempts <= 50:
        raise ConfigError(
            "alerts.max_attempts", f"expected an integer 1-50, got {kind_of(max_attempts)}"
        )

    return AlertSettings(thresholds, webhook_url, webhook_secret, max_attempts)


def crossed(used: float, limit: float | None, thresholds: tuple[float, ...]) -> tuple[float, ...]:
    """The thresholds that `used` has reached as a fraction of `limit`; none when unlimited or unused.

    A limit of 0 is reached by any usage at all (possible with `on_exceed: overage`).
    """
    if limit is None or used <= 0 or limit < 0:
        return ()
    if limit == 0:
        return tuple(thresholds)
    # A division, not `threshold * limit`: 7/100 is the same float as 0.07, 0.07 * 100 is not 7.
    ratio = used / limit
    return tuple(threshold for threshold in thresholds if ratio >= threshold)


def alert_id(tenant: str, meter: str, period_start: datetime, threshold: float) -> str:
    """The deterministic id of one alert, the same on every instance and retry."""
    # Alerts are stamped to the whole second: this text is hashed, so it must never change.
    material = json.dumps([tenant, meter, rfc3339(period_start, whole_seconds=True), float(threshold)])
    return "alrt_" + hashlib.sha256(material.encode()).hexdigest()[:32]


def signature_header(secret: str, timestamp: int, body: bytes) -> str:
    """`t=<timestamp>,v1=<hex HMAC-SHA256 of "<timestamp>.<body>">`."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify_signature(header: str, body: bytes, secret: str, *, now: float, tolerance: float = 300) -> bool:
    """Whether `header` signs `body` with `secret` at a time within `tolerance` seconds of `now`."""
    fields: dict[str, list[str]] = {}
    for item in header.split(","):
        name, _, value = item.strip().partition("=")
        fields.setdefault(name, []).append(value)
    try:
        timestamp = int(fields["t"][0])
    except (KeyError, ValueError):
        return False
    if abs(now - timestamp) > tolerance:
        return False
    expected = signature_header(secret, timestamp, body).rpartition("v1=")[2]
    return any(hmac.compare_digest(expected, candidate) for candidate in fields.get("v1", []))


@dataclass(frozen=True, slots=True)
class _Pending:
    key: _AlertKey
    used: float
    limit: float


class Alerts:
    """Raises each threshold alert once across all instances sharing the SQL store, and sends its webhook."""

    def __init__(
        self,
        settings: AlertSettings,
        sessions: async_sessionmaker[AsyncSession],
        *,
        clock: Clock = system_clock,
        http: aiohttp.ClientSession | None = None,
        queue_size: int = 1024,
        known_size: int = 100_000,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        request_timeout: float = 10.0,
        max_deliveries: int = 16,
        drain_seconds: float = 2.0,
    ) -> None:
        self.settings = settings
        self._sessions = sessions
        self._clock = clock
        self._http = http
        self._owns_http = False
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue(maxsize=queue_size)
        # Keys raised or on their way (insertion-ordered, oldest evicted first). A key evicted too
        # early only costs one INSERT that fails on the primary key; nothing is sent twice.
        self._known: dict[_AlertKey, None] = {}
        self._known_size = known_size
        self._backoff_base = backoff_base
        self._backoff_max = backoff_max
        self._request_timeout = request_timeout
        self._delivery_slots = asyncio.Semaphore(max_deliveries)
        self._deliveries: set[asyncio.Task[bool]] = set()
        self._drain_seconds = drain_seconds
        self._worker: asyncio.Task[None] | None = None
        self._closed = False
        self.dropped = 0
        self._drop_logged_at = -math.inf

    # ------------------------------------------------------------------ request path

    def observe(
        self, tenant: str, meter: str, period_start: datetime, used: float, limit: float | None
    ) -> None:
        """Queue the thresholds newly reached by `used` of `limit`; never blocks, never does I/O."""
        if limit is None or self._closed:
            return
        for threshold in crossed(used, limit, self.settings.thresholds):
            key = (tenant, meter, period_start, threshold)
            if key in self._known:
                continue
            try:
                self._queue.put_nowait(_Pending(key, used, limit))
            except asyncio.QueueFull:
                self._dropped()
                return  # not marked: a later observe queues it again
            self._remember(key)

    def _remember(self, key: _AlertKey) -> None:
        self._known[key] = None
        if len(self._known) > self._known_size:
            del self._known[next(iter(self._known))]

    def _dropped(self) -> None:
        self.dropped += 1
        now = time.monotonic()
        # One line per 10 s at most: a full queue comes with heavy traffic, which must not flood the log.
        if now - self._drop_logged_at >= 10:
            self._drop_logged_at = now
            log.warning("alert queue full (%d slots): %d alert(s) dropped so far, will retry on the next "
                        "request", self._queue.maxsize, self.dropped)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._worker is not None:
            return
        if self._http is None and self.settings.webhook_url is not None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._request_timeout))
            self._owns_http = True
        self._worker = asyncio.create_task(self._run(), name="alerts-worker")

    async def close(self) -> None:
        """Give queued alerts and webhooks up to `drain_seconds` to finish, then cancel the rest."""
        self._closed = True
        if self._worker is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._drain_seconds):
                    await self._queue.join()
                    if self._deliveries:
                        await asyncio.wait(self._deliveries)
            await cancel_and_wait([self._worker, *self._deliveries])
            self._worker = None
        if self._owns_http and self._http is not None:
            await self._http.close()
            self._http = None

    # ------------------------------------------------------------------ background

    async def _run(self) -> None:
        while True:
            pending = await self._queue.get()
            try:
                await self._claim(pending)
            except Exception:
                # Not raised after all: forget it so a later observe tries again.
                self._known.pop(pending.key, None)
                log.warning("could not record alert %s; will retry on the next request", pending.key,
                            exc_info=True)
            finally:
                self._queue.task_done()

    async def _claim(self, pending: _Pending) -> None:
        tenant, meter, period_start, threshold = pending.key
        at = utcnow(self._clock)
        try:
            async with self._sessions() as session, session.begin():
                session.add(AlertEvent(tenant_id=tenant, meter=meter, period_start=period_start,
                                       threshold=threshold, at=at, value=float(pending.used)))
        except IntegrityError:
            return  # another instance (or an earlier run) raised it and sent its webhook
        log.info("alert: tenant %s reached %g of its %s limit", tenant, threshold, meter)
        if self.settings.webhook_url is None or self._http is None:
            return
        await self._delivery_slots.acquire()
        task = asyncio.create_task(self._deliver(pending, at), name="alerts-webhook")
        self._deliveries.add(task)
        task.add_done_callback(self._delivered)

    def _delivered(self, task: asyncio.Task[bool]) -> None:
        self._deliveries.discard(task)
        self._delivery_slots.release()

    def _backoff(self, attempt: int) -> float:
        """Exponential with equal jitter: half the step fixed, half random, so instances spread out."""
        step = min(self._backoff_max, self._backoff_base * 2 ** (attempt - 1))
        return step / 2 + random.uniform(0, step / 2)

    async def _deliver(self, pending: _Pending, at: datetime) -> bool:
        tenant, meter, period_start, threshold = pending.key
        body = json.dumps({
            "type": ALERT_TYPE, "tenant": tenant, "meter": meter, "threshold": threshold,
            "used": pending.used, "limit": pending.limit,
            "period_start": rfc3339(period_start, whole_seconds=True), "at": rfc3339(at, whole_seconds=True),
        }, separators=(",", ":")).encode()
        identifier = alert_id(tenant, meter, period_start, threshold)
        url = self.settings.webhook_url
        assert url is not None and self._http is not None
        reason = ""
        for attempt in range(1, self.settings.max_attempts + 1):
            headers = {"Content-Type": "application/json", ALERT_ID_HEADER: identifier}
            if self.settings.webhook_secret is not None:
                headers[SIGNATURE_HEADER] = signature_header(
                    self.settings.webhook_secret, int(self._clock()), body)
            delay = self._backoff(attempt)
            try:
                post = self._http.post(url, data=body, headers=headers, allow_redirects=False)
                async with post as response:
                    status = response.status
                    retry_after = response.headers.get("Retry-After", "")
            except (aiohttp.ClientError, TimeoutError) as exc:
                reason = repr(exc)
            else:
                if 200 <= status < 300:
                    return True
                reason = f"HTTP {status}"
                if status != 429 and status < 500:
                    break
                if status == 429 and retry_after.isdigit():
                    delay = min(self._backoff_max, float(retry_after))
            if attempt < self.settings.max_attempts:
                await asyncio.sleep(delay)
        log.error("alert webhook %s for tenant %s (%s at %g) not delivered after %d attempt(s): %s",
                  identifier, tenant, meter, threshold, attempt, reason)
        return False

    # ------------------------------------------------------------------ tenant view

    async def alerts_for(self, tenant: str, period_start: datetime) -> list[dict[str, Any]]:
        """The alerts raised for `tenant` in the period starting at `period_start`, oldest first."""
        query = (
            select(AlertEvent.meter, AlertEvent.threshold, AlertEvent.at)
            .where(AlertEvent.tenant_id == tenant, AlertEvent.period_start == period_start)
            .order_by(AlertEvent.at, AlertEvent.meter, AlertEvent.threshold)
        )
        async with self._sessions() as session:
            rows = (await session.execute(query)).all()
        return [{"meter": meter, "threshold": threshold, "at": rfc3339(at, whole_seconds=True)}
                for meter, threshold, at in rows]
