"""`make bench-sync`: the billing sync worker on 10,000 tenants x 3 meters of closed buckets.

The Stripe emulator of the tests runs in its own process (so it does not share the worker's event
loop), with a customer per tenant. Measured: events per second with the cap lifted, then with the
default cap of 500/s (which must hold), and the worker's resident memory before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis.asyncio as aioredis

from billing_sync.settings import StripeSettings
from billing_sync.worker import build_worker
from gateway.cli.devservices import RedisProcess, free_port, wait_for_port
from metering import db, keys
from metering.clock import utcnow
from metering.meters import DEFAULT_METERS
from metering.migrate import upgrade_async
from metering.models import Tenant

ROOT = Path(__file__).resolve().parent.parent
METERS = ("api_calls", "chain_deployments", "bandwidth_bytes")
BUCKET_SECONDS = 300

EMULATOR = """
import asyncio, sys
sys.path.insert(0, {root!r})
from tests.billing_sync.stripe_emulator import StripeEmulator
async def main():
    emulator = StripeEmulator(port={port})
    for meter in {meters!r}:
        emulator.add_meter(meter)
    for i in range({tenants}):
        emulator.add_customer(f"cus_{{i}}")
    await emulator.start()
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


def rss_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


async def fill(redis_url: str, tenants: int, bucket: int) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        pipe = client.pipeline(transaction=False)
        for i in range(tenants):
            pipe.hset(keys.bucket_key(f"tenant-{i}", bucket), mapping={m: 1 + i % 7 for m in METERS})
            if len(pipe) >= 1000:
                await pipe.execute()
        await pipe.execute()
    finally:
        await client.aclose()


async def run(args: argparse.Namespace, redis: RedisProcess, emulator: subprocess.Popen[bytes], port: int) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="cosmos-bench-sync-"))
    engine = db.create_engine(f"sqlite+aiosqlite:///{workdir}/bench.db")
    client = aioredis.Redis.from_url(redis.url)
    try:
        wait_for_port(port, timeout=60, process=emulator)
        await upgrade_async(engine)
        sessions = db.session_factory(engine)
        async with sessions() as session:
            session.add_all([Tenant(id=f"tenant-{i}", plan="starter", status="active",
                                    stripe_customer_id=f"cus_{i}", created_at=utcnow(), updated_at=utcnow())
                             for i in range(args.tenants)])
            await session.commit()
        meters = [m for m in DEFAULT_METERS if m.name in METERS]
        now = time.time()
        first = int(now // BUCKET_SECONDS * BUCKET_SECONDS) - 2 * BUCKET_SECONDS
        print(f"{dt.date.today()} · {os.cpu_count()} cores · Python {platform.python_version()} · "
              f"{args.tenants:,} tenants x {len(METERS)} meters per pass · SQLite ledger · emulator in its own process")
        for label, cap, bucket, tenants in (("uncapped", 0.0, first, args.tenants),
                                            ("capped at 500/s", 500.0, first - BUCKET_SECONDS, args.capped_tenants)):
            await fill(redis.url, tenants, bucket)
            stripe = StripeSettings(mode="live", api_base=f"http://127.0.0.1:{port}", max_events_per_second=cap,
                                    concurrency=args.concurrency, api_key="sk_test_bench")
            worker = build_worker(redis=client, sessions=sessions, meters=meters, stripe=stripe,
                                  bucket_seconds=BUCKET_SECONDS, grace_seconds=10)
            before = rss_mib()
            started = time.monotonic()
            result = await worker.run_once()
            elapsed = time.monotonic() - started
            await worker.aclose()
            events = result.sent + result.duplicates
            print(f"  {label:16} {events:,} events in {elapsed:.1f} s = {events / elapsed:,.0f} events/s "
                  f"(pending after: {result.pending}, parked: {result.parked}); "
                  f"RSS {before:.0f} -> {rss_mib():.0f} MiB")
    finally:
        await client.aclose()
        await engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tenants", type=int, default=10_000)
    parser.add_argument("--capped-tenants", type=int, default=1_000, help="tenants in the capped pass")
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    redis = RedisProcess().start()
    port = free_port()
    emulator = subprocess.Popen([sys.executable, "-c", EMULATOR.format(
        root=str(ROOT), port=port, meters=METERS, tenants=args.tenants)], stdout=subprocess.DEVNULL)
    try:
        asyncio.run(run(args, redis, emulator, port))
    finally:
        emulator.terminate()
        emulator.wait(10)
        redis.close()


if __name__ == "__main__":
    main()
