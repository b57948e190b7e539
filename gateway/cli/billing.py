"""`cosmos-gateway sync` and `cosmos-gateway reconcile` (PRODUCT.md §1, §8): wiring only.

The work is in `billing_sync`; this module builds its parts from the settings, runs them, and turns
the outcome into an exit status and a few printed lines an operator can act on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import asdict
from datetime import datetime

import stripe
from aiohttp import web
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from billing_sync.reconcile import format_differences, parse_period, reconcile
from billing_sync.worker import PassResult, SyncWorker, build_worker
from gateway.admin.health import metrics_response
from gateway.config.settings import HostPort, Settings
from metering import db
from metering.clock import utcnow
from metering.migrate import MigrationError, prepare_schema
from metering.redis_store.client import redis_client

log = logging.getLogger("cosmos_gateway.sync")
EXIT_PENDING = 1  # --once: closed buckets neither sent nor parked (retry, Redis or SQL down, held elsewhere)
EXIT_DIFFERENCES = 1
EXIT_SETUP = 2
LOCK_WAIT_SECONDS = 15.0  # longer than the leader lock's time to live (10 s)


@contextlib.asynccontextmanager
async def _stores(settings: Settings) -> AsyncIterator[tuple[object, async_sessionmaker[AsyncSession]]]:
    if settings.redis.url is None:
        raise SystemExit("cosmos-gateway sync: redis.url is not set (REDIS_URL): the worker reads the gateway's Redis")
    redis = redis_client(settings.redis.url)
    engine = db.create_engine(settings.database.url)
    try:
        await prepare_schema(engine)
        yield redis, db.session_factory(engine)
    finally:
        await redis.aclose()
        await engine.dispose()


def run_sync(settings: Settings, *, once: bool, metrics_listen: HostPort | None) -> int:
    try:
        return asyncio.run(_sync(settings, once=once, metrics_listen=metrics_listen))
    except MigrationError as exc:  # unreachable, or a schema this version must not run on: one line says why
        print(f"cosmos-gateway sync: {exc}", file=sys.stderr)
        return EXIT_SETUP


async def _sync(settings: Settings, *, once: bool, metrics_listen: HostPort | None) -> int:
    policy = settings.policy
    billing = settings.billing
    async with _stores(settings) as (redis, sessions):
        worker = build_worker(redis=redis, sessions=sessions, meters=policy.meters, stripe=policy.stripe,
                              bucket_seconds=billing.bucket_seconds, grace_seconds=billing.grace_seconds)
        try:
            if once:
                return await _once(worker, policy.stripe.mode)
            runner = await _serve_metrics(metrics_listen) if metrics_listen else None
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, stop.set)
            log.info("billing sync running (%s, %s); stop with SIGTERM", policy.stripe.mode, policy.stripe.transport)
            try:
                await worker.run_forever(stop)
            finally:
                if runner is not None:
                    await runner.cleanup()
            return 0
        finally:
            await worker.aclose()


async def _once(worker: SyncWorker, mode: str) -> int:
    """One full pass; 0 only when every closed bucket is sent or parked (a dry run: shown), PRODUCT.md §1."""
    try:
        result = await worker.run_once()
        # A worker that died holding the leader lock blocks others until the lock expires; a
        # one-off pass waits that long rather than doing nothing.
        deadline = time.monotonic() + LOCK_WAIT_SECONDS
        while not result.leader and time.monotonic() < deadline:
            await asyncio.sleep(1.0)
            result = await worker.run_once()
    except (SQLAlchemyError, OSError) as exc:  # the ledger is unreachable: nothing is known to be done
        print(f"cosmos-gateway sync: the database is unreachable: {exc!r}", file=sys.stderr)
        return EXIT_PENDING
    print(json.dumps({"mode": mode, **asdict(result), "complete": result.complete}))
    for problem in _incomplete(result):
        print(f"cosmos-gateway sync: {problem}", file=sys.stderr)
    return 0 if result.complete else EXIT_PENDING


def _incomplete(result: PassResult) -> list[str]:
    """Why a pass left closed buckets neither sent nor parked, in words an operator can act on."""
    problems = []
    if not result.leader:
        problems.append("another sync worker holds the leader lock; nothing was done")
    if result.store_error:
        problems.append(f"Redis is unreachable, closed buckets may still be there: {result.store_error}")
    if result.held:
        problems.append(f"{result.held} closed buckets are held by another sync worker")
    waiting = result.pending - result.previewed if result.dry_run else result.pending
    if result.leader and waiting:
        problems.append(f"{waiting} buckets wait for a retry")
    return problems


async def _serve_metrics(address: HostPort) -> web.AppRunner:
    """This process's /metrics and /healthz (the billing_sync_* counters live here)."""
    async def metrics_endpoint(_: web.Request) -> web.Response:
        return metrics_response()

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get("/metrics", metrics_endpoint)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, address.host, address.port).start()
    return runner


def run_reconcile(settings: Settings, period_text: str | None) -> int:
    try:
        period = parse_period(period_text, utcnow())
    except ValueError as exc:
        print(f"cosmos-gateway reconcile: --period: {exc}", file=sys.stderr)
        return EXIT_SETUP
    policy = settings.policy
    if policy.stripe.api_key is None:
        print("cosmos-gateway reconcile: STRIPE_API_KEY is not set: nothing to compare with", file=sys.stderr)
        return EXIT_SETUP
    try:
        return asyncio.run(_reconcile(settings, period))
    except MigrationError as exc:
        print(f"cosmos-gateway reconcile: {exc}", file=sys.stderr)
        return EXIT_SETUP


async def _reconcile(settings: Settings, period: tuple[datetime, datetime]) -> int:
    policy = settings.policy
    engine = db.create_engine(settings.database.url)
    http = stripe.AIOHTTPClient()
    base = policy.stripe.api_base
    client = stripe.StripeClient(policy.stripe.api_key or "", http_client=http,
                                 **({"base_addresses": {"api": base, "meter_events": base}} if base else {}))
    started = time.monotonic()
    try:
        await prepare_schema(engine)
        differences = await reconcile(sessions=db.session_factory(engine), client=client, meters=policy.meters,
                                      period=period)
    except stripe.StripeError as exc:
        print(f"cosmos-gateway reconcile: Stripe answered an error: {exc.user_message or exc}", file=sys.stderr)
        return EXIT_SETUP
    finally:
        await http.close_async()
        await engine.dispose()
    start, end = period
    print(f"period {start:%Y-%m-%d} .. {end:%Y-%m-%d} (UTC), compared in {time.monotonic() - started:.1f} s")
    print(format_differences(differences))
    return EXIT_DIFFERENCES if differences else 0
