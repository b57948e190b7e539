"""Wires one worker together: the parts a worker owns, its two listeners, start and drain.

`Worker` is what `serve` runs in each process and what tests start in-process on free ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import redis.asyncio as aioredis
from aiohttp import web

from billing_sync.meter_errors import StripeEventFetcher
from billing_sync.subscriptions import StripeEventProcessor
from billing_sync.worker import SyncWorker, build_worker
from gateway.admin.api import add_admin_api
from gateway.admin.health import admin_app
from gateway.admin.sync import SyncAdmin
from gateway.auth.tokens import Authenticator
from gateway.config.settings import Settings
from gateway.console import add_console
from gateway.metrics import RequestMetrics
from gateway.portal.endpoints import TenantPortal
from gateway.portal.stripe_portal import StripePortal
from gateway.portal.tokens import PortalTokens, portal_key
from gateway.proxy.accesslog import AccessLog
from gateway.proxy.handler import ProxyHandler
from gateway.proxy.listener import LimitedSockSite, ProblemServer, bind
from gateway.proxy.own_endpoints import OwnEndpoints
from gateway.proxy.stripe_webhook import StripeWebhook
from gateway.proxy.upstream import UpstreamPool
from gateway.proxy.websocket import WebSocketRelay
from metering import db
from metering.migrate import prepare_schema
from metering.redis_store import RedisUsageStore
from metering.redis_store.client import is_cluster_url, redis_client
from metering.spool import Spool
from metering.store import StoreUnavailable
from metering.tasks import cancel_and_wait
from metering.usage_history import UsageHistory
from quota.alerts import Alerts
from quota.limiter import Limiter, LimiterSettings
from quota.metrics import QuotaMetrics
from quota.tenants import TenantDirectory

log = logging.getLogger("cosmos_gateway.worker")
TENANT_RELOAD_SECONDS = 2.0  # operator changes reach every instance well within the promised 5 s
SPOOL_REPLAY_SECONDS = 1.0
TENANT_INDEX_TRIM_SECONDS = 3600.0  # idle tenants leave the Redis tenant index this often (every worker)
SYNC_METRICS_SECONDS = 5.0  # a scrape refreshes the billing_sync gauges from the ledger at most this often

class Worker:
    """One gateway process: proxy listener, admin listener and the clients they share."""

    def __init__(self, settings: Settings, *, reuse_port: bool = False, index: int = 0,
                 clock: Callable[[], float] = time.time) -> None:
        if settings.upstream.url is None:
            raise ValueError("upstream.url must be resolved before starting a worker")
        self.settings = settings
        self.clock = clock  # injected by tests to cross period boundaries without waiting
        self.policy = settings.policy
        self._reuse_port = reuse_port
        self.authenticator = Authenticator(settings.auth)
        self.pool = UpstreamPool(
            settings.upstream.url, connect_timeout=settings.upstream.connect_timeout,
            read_timeout=settings.upstream.read_timeout, max_connections=settings.upstream.max_connections,
            pool_timeout=settings.upstream.pool_timeout,
        )
        self.websockets = WebSocketRelay(settings.upstream.url,
                                         connect_timeout=settings.upstream.connect_timeout,
                                         max_connections=settings.websocket.max_connections,
                                         idle_timeout=settings.websocket.idle_timeout)
        redis_url = settings.redis.url or "redis://127.0.0.1:6379/0"
        self.redis = redis_client(redis_url)
        self.store = RedisUsageStore(self.redis)
        self.engine = db.create_engine(settings.database.url)
        self.sessions = db.session_factory(self.engine)
        # Pub/sub needs a connection without a read timeout; a cluster is covered by the periodic reload.
        self._pubsub = None if is_cluster_url(redis_url) else aioredis.Redis.from_url(redis_url)
        self.directory = TenantDirectory(self.sessions, self._pubsub, reload_interval=TENANT_RELOAD_SECONDS)
        self.spool = Spool(Path(settings.redis.spool_dir) / f"worker-{index}.jsonl",
                           max_bytes=settings.redis.spool_max_bytes)
        self.alerts = Alerts(self.policy.alerts, self.sessions, clock=clock)
        self.quota_metrics = QuotaMetrics(self.policy.plans, [m.name for m in self.policy.meters],
                                          tenant_usage=self.policy.metrics.tenant_usage,
                                          max_tenants=self.policy.metrics.max_tenants)
        self.limiter = Limiter(
            self.store, self.policy.matcher, self.policy.plans, self.directory, self.spool, self.quota_metrics,
            LimiterSettings(default_plan=settings.default_plan, bucket_seconds=settings.billing.bucket_seconds,
                            fail_open=settings.redis.on_error == "fail_open",
                            grace_seconds=settings.billing.grace_seconds,
                            past_due_grace_seconds=self.policy.stripe.past_due_grace_days * 86_400,
                            alert_from=min(self.policy.alerts.thresholds, default=1.0)),
            on_counted=self._observe_usage, clock=clock,
        )
        self.sync_admin = SyncAdmin(redis=self.redis, sessions=self.sessions, worker_factory=self._sync_worker,
                                    clock=clock)
        self.usage_history = UsageHistory(self.sessions, self.redis, self.policy.meters,
                                          bucket_seconds=settings.billing.bucket_seconds, clock=clock)
        self._sync_metrics_at = float("-inf")
        self._period_starts: dict[int, datetime] = {}
        self.access_log = AccessLog(enabled=settings.server.access_log)
        self.metrics = RequestMetrics(self.policy.plans)
        self._proxy_runner: web.ServerRunner | None = None
        self._admin_runner: web.AppRunner | None = None
        self._replayer: asyncio.Task[None] | None = None
        self._event_fetcher: StripeEventFetcher | None = None
        self.portal: TenantPortal | None = None
        self.proxy_port = 0
        self.admin_port = 0

    def _observe_usage(self, tenant: str, meter: str, period_start: int, used: float, limit: float) -> None:
        start = self._period_starts.get(period_start)
        if start is None:
            if len(self._period_starts) > 1000:
                self._period_starts.clear()
            start = self._period_starts[period_start] = datetime.fromtimestamp(period_start, UTC)
        self.alerts.observe(tenant, meter, start, used, limit)

    async def start(self) -> None:
        settings = self.settings
        await prepare_schema(self.engine)
        await self.authenticator.start()
        await self.directory.start()
        await self._warm_up_redis()
        await self.alerts.start()
        self._replayer = asyncio.create_task(self._replay_spool())
        stripe = self.policy.stripe
        # Thin v2 events (the v2 meter event stream's error reports) carry no data: it is read from Stripe.
        self._event_fetcher = (StripeEventFetcher(stripe.api_key, api_base=stripe.api_base)
                               if stripe.api_key else None)
        meters_by_event: dict[str, list[str]] = {}
        for meter in self.policy.meters:
            if meter.stripe_event is not None:
                meters_by_event.setdefault(meter.stripe_event, []).append(meter.name)
        events = StripeEventProcessor(
            secret=settings.billing.stripe_webhook_secrets, sessions=self.sessions,
            plans_by_lookup_key=stripe.plans_by_lookup_key, known_plans=self.policy.plans, clock=self.clock,
            event_fetcher=self._event_fetcher, meters_by_event_name=meters_by_event)
        webhook = StripeWebhook(events, directory=self.directory,
                                problem_type_base=settings.server.problem_type_base)
        self.portal = self._tenant_portal()
        own = OwnEndpoints(limiter=self.limiter, directory=self.directory, plans=self.policy.plans,
                           meters=self.policy.meters, default_plan=settings.default_plan, alerts=self.alerts,
                           stripe_webhook=webhook.handle, history=self.usage_history, portal=self.portal,
                           clock=self.clock)
        handler = ProxyHandler(settings, self.authenticator, self.pool, self.websockets, self.metrics,
                               self.access_log, limiter=self.limiter, own=own)
        http_limits = {
            "keepalive_timeout": settings.listen.header_timeout,
            "max_line_size": settings.listen.max_header_size,
            "max_field_size": settings.listen.max_header_size,
            "auto_decompress": False,  # bodies pass byte-exact: never inflated (a gzip bomb stays small)
        }
        grace = settings.server.shutdown_grace_seconds
        self._proxy_runner = web.ServerRunner(
            ProblemServer(handler, type_base=settings.server.problem_type_base, access_log=None,
                          handler_cancellation=True, **http_limits),
            shutdown_timeout=grace, handle_signals=False,
        )
        await self._proxy_runner.setup()
        proxy_sock = bind(settings.listen.proxy, reuse_port=self._reuse_port)
        await LimitedSockSite(self._proxy_runner, proxy_sock,
                              max_connections=settings.listen.max_connections,
                              type_base=settings.server.problem_type_base).start()
        self.proxy_port = proxy_sock.getsockname()[1]

        admin = admin_app(
            redis_check=self._ping_redis, database_check=lambda: db.ping(self.engine),
            fail_closed=settings.redis.on_error == "fail_closed", before_metrics=self._before_metrics,
            problem_type_base=settings.server.problem_type_base,
        )
        self._add_admin_api(admin)
        self._admin_runner = web.AppRunner(admin, access_log=None, shutdown_timeout=grace,
                                           handle_signals=False)
        await self._admin_runner.setup()
        admin_sock = bind(settings.listen.admin, reuse_port=self._reuse_port)
        await web.SockSite(self._admin_runner, admin_sock).start()
        self.admin_port = admin_sock.getsockname()[1]

    def _tenant_portal(self) -> TenantPortal:
        """The usage page and Stripe's portal; their signing key comes from the configured secrets, so every
        worker process of this configuration reads the links and cookies of the others."""
        settings = self.settings
        secrets = [f"admin:{name}:{token}" for name, token in settings.admin.tokens]
        secrets += [settings.auth.hs256_secret, settings.billing.stripe_api_key,
                    *settings.billing.stripe_webhook_secrets]
        return TenantPortal(
            tokens=PortalTokens(portal_key(secrets)), redis=self.redis,
            stripe=StripePortal(self.policy.stripe, settings.billing.portal_return_url), directory=self.directory,
            meters=self.policy.meters, history=self.usage_history, trusted_proxies=settings.listen.trusted_proxies,
            body_timeout=settings.listen.body_timeout, type_base=settings.server.problem_type_base, clock=self.clock)

    def _add_admin_api(self, app: web.Application) -> None:
        add_admin_api(app, settings=self.settings, sessions=self.sessions, directory=self.directory,
                      authenticator=self.authenticator, usage_reader=self.store,
                      plans=self.policy.plans, meters=self.policy.meters, clock=self.clock, sync=self.sync_admin,
                      history=self.usage_history)
        # The operator console at /admin/ui: the longer prefix, so it resolves before the API's /admin.
        add_console(app, settings=self.settings, sessions=self.sessions, directory=self.directory,
                    authenticator=self.authenticator, usage_reader=self.store,
                    plans=self.policy.plans, meters=self.policy.meters, clock=self.clock, sync=self.sync_admin,
                    history=self.usage_history)

    def _sync_worker(self) -> SyncWorker:
        billing = self.settings.billing
        return build_worker(redis=self.redis, sessions=self.sessions, meters=self.policy.meters,
                            stripe=self.policy.stripe, bucket_seconds=billing.bucket_seconds,
                            grace_seconds=billing.grace_seconds, clock=self.clock)

    async def _before_metrics(self) -> None:
        self.quota_metrics.publish()
        self.quota_metrics.spool_pending(self.spool.pending())
        self.quota_metrics.spool_bytes(self.spool.bytes())
        await self._refresh_sync_metrics()

    async def _refresh_sync_metrics(self) -> None:
        """The billing_sync gauges come from the shared ledger, so any instance's scrape shows them."""
        now = time.monotonic()
        if now - self._sync_metrics_at < SYNC_METRICS_SECONDS:
            return
        self._sync_metrics_at = now
        with contextlib.suppress(Exception):  # a scrape never fails for the ledger's sake
            await asyncio.wait_for(self.sync_admin.snapshot(), timeout=2)

    async def _warm_up_redis(self) -> None:
        """Connect and load the scripts now, so the first requests do not pay for it (or time out on it)."""
        try:
            await asyncio.wait_for(self.store.load_scripts(), timeout=5)
        except Exception as exc:  # Redis down at start: fail_open serves anyway, the store retries later
            log.warning("Redis is not reachable at start (%r); the limiter will retry", exc)

    async def _ping_redis(self) -> None:
        await self.redis.ping()

    async def _replay_spool(self) -> None:
        """Once a second: fail-open spool replay (as soon as Redis answers again), taking over the spool
        files of workers that no longer run, metrics upkeep, and now and then the tenant index trimmed."""
        dropped = 0
        trimmed_at: float | None = None
        while True:
            if trimmed_at is None or time.monotonic() - trimmed_at >= TENANT_INDEX_TRIM_SECONDS:
                trimmed_at = time.monotonic()
                with contextlib.suppress(StoreUnavailable):  # Redis down: next time
                    await self.store.trim_tenants_seen()
            # Also the per-tenant usage gauges: with several workers each publishes its own, every second.
            self.quota_metrics.publish()
            try:
                await self.spool.adopt()
            except OSError:
                log.exception("spool takeover failed; retrying")
            self.quota_metrics.spool_pending(self.spool.pending())
            self.quota_metrics.spool_bytes(self.spool.bytes())
            self.quota_metrics.spool_dropped(self.spool.dropped - dropped)
            dropped = self.spool.dropped
            if self.spool.pending():
                try:
                    await self.spool.replay(self.store, rebucket=self.limiter.rebucket)
                except StoreUnavailable:
                    pass
                except Exception:
                    log.exception("spool replay failed; retrying")
            await asyncio.sleep(SPOOL_REPLAY_SECONDS)

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish within the grace, then close clients."""
        runners = [r for r in (self._proxy_runner, self._admin_runner) if r is not None]
        await asyncio.gather(*(r.cleanup() for r in runners), return_exceptions=True)
        await self.limiter.drain()
        await cancel_and_wait([self._replayer])
        await self.spool.aclose()
        await self.alerts.close()
        await self.directory.close()
        await self.websockets.close()
        await self.pool.close()
        await self.authenticator.close()
        if self._event_fetcher is not None:
            await self._event_fetcher.aclose()
        if self.portal is not None:
            await self.portal.aclose()
        await self.store.aclose()
        await self.redis.aclose()
        if self._pubsub is not None:
            await self._pubsub.aclose()
        await self.engine.dispose()
        self.access_log.flush()


async def run_until_stopped(worker: Worker, stop: asyncio.Event,
                            on_started: Callable[[Worker], None] | None = None) -> None:
    await worker.start()
    if on_started is not None:
        on_started(worker)
    try:
        await stop.wait()
    finally:
        await worker.stop()
