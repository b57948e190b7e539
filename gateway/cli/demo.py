"""`cosmos-gateway demo`: the whole product on loopback for a first look (PRODUCT.md §1).

A private redis-server, a SQLite file in a temporary directory, the built-in demo upstream, one
gateway worker on free ports, and the billing sync in dry run. Sample traffic of two tenants runs
into the Starter plan's deployment quota; the summary shows usage, rejections and what the sync
would have billed. Nothing outside loopback is touched and everything is removed at the end.
"""

from __future__ import annotations

import asyncio
import secrets
import tempfile
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
from sqlalchemy import select

from billing_sync.settings import StripeSettings
from billing_sync.worker import build_worker
from gateway.app import Worker
from gateway.auth.mint import mint_token
from gateway.cli.devservices import DemoUpstream, RedisProcess
from gateway.config.settings import AdminSettings, AuthSettings, HostPort, Settings
from metering.models import LedgerEntry

TENANTS = {"acme": "starter", "globex": "professional"}
DEPLOY_QUOTA = 5  # an override on acme, so the demo reaches the quota in a few requests
BUCKET_SECONDS = 2
DEMO_CLOCK_SKIP = 3600.0  # the sync pass looks an hour ahead, so the demo's buckets count as closed


def run_demo(settings: Settings) -> int:
    return asyncio.run(_demo(settings))


def _demo_settings(settings: Settings, workdir: Path, redis_url: str, upstream_url: str, secret: str,
                   admin_token: str) -> Settings:
    listen = replace(settings.listen, proxy=HostPort("127.0.0.1", 0), admin=HostPort("127.0.0.1", 0))
    return replace(
        settings, listen=listen,
        upstream=replace(settings.upstream, url=upstream_url),
        redis=replace(settings.redis, url=redis_url, spool_dir=str(workdir / "spool")),
        database=replace(settings.database, url=f"sqlite+aiosqlite:///{workdir / 'demo.db'}"),
        auth=AuthSettings(issuer="https://demo.local/", audience="cosmosbuilder-api", algorithms=("HS256",),
                          hs256_secret=secret, public_paths=("/health", "/status/**")),
        admin=AdminSettings(tokens=(("demo", admin_token),)),
        server=replace(settings.server, access_log=False),
        billing=replace(settings.billing, bucket_seconds=BUCKET_SECONDS, grace_seconds=0, stripe_api_key=None),
        policy=replace(settings.policy, stripe=StripeSettings()),  # dry run, whatever the config says
        default_plan="starter",
    )


async def _demo(settings: Settings) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="cosmos-demo-"))
    redis = RedisProcess().start()
    upstream = DemoUpstream().start()
    secret, admin_token = secrets.token_urlsafe(32), secrets.token_urlsafe(24)
    demo = _demo_settings(settings, workdir, redis.url, upstream.url, secret, admin_token)
    worker = Worker(demo)
    try:
        await worker.start()
        print(f"demo: gateway on http://127.0.0.1:{worker.proxy_port}, admin on http://127.0.0.1:{worker.admin_port}, "
              f"redis {redis.url}, upstream {upstream.url}\n")
        summary = await _traffic(worker, secret, admin_token)
        billed = await _dry_run_sync(worker, demo)
        _print_summary(summary, billed)
        return 0
    finally:
        await worker.stop()
        upstream.close()
        redis.close()


async def _traffic(worker: Worker, secret: str, admin_token: str) -> dict[str, Any]:
    proxy = f"http://127.0.0.1:{worker.proxy_port}"
    admin = f"http://127.0.0.1:{worker.admin_port}"
    admin_headers = {"Authorization": f"Bearer {admin_token}"}
    statuses: dict[str, dict[int, int]] = {}
    async with aiohttp.ClientSession() as http:
        for tenant, plan in TENANTS.items():
            async with http.put(f"{admin}/admin/tenants/{tenant}", json={"plan": plan}, headers=admin_headers) as r:
                r.raise_for_status()
        async with http.put(f"{admin}/admin/tenants/acme/overrides/chain_deployments",
                            json={"limit": DEPLOY_QUOTA, "reason": "demo"}, headers=admin_headers) as r:
            r.raise_for_status()
        for tenant in TENANTS:
            token = mint_token(secret, tenant=tenant, issuer="https://demo.local/", audience="cosmosbuilder-api")
            headers = {"Authorization": f"Bearer {token}"}
            counts = statuses.setdefault(tenant, {})
            steps = [("POST", "/api/chains")] + [("POST", "/api/chains/chain-1/deployments")] * 8 + [
                ("GET", "/api/chains")] * 3 + [("POST", "/api/chains")]
            for method, path in steps:
                async with http.request(method, proxy + path, headers=headers) as response:
                    await response.read()
                    counts[response.status] = counts.get(response.status, 0) + 1
        views = {}
        for tenant in TENANTS:
            async with http.get(f"{admin}/admin/tenants/{tenant}", headers=admin_headers) as r:
                views[tenant] = await r.json()
    await worker.limiter.drain()
    return {"statuses": statuses, "views": views}


async def _dry_run_sync(worker: Worker, settings: Settings) -> list[tuple[str, str, Decimal]]:
    """One sync pass in dry run, its clock an hour ahead so that the demo's buckets are closed."""
    billing = settings.billing
    sync = build_worker(redis=worker.redis, sessions=worker.sessions, meters=worker.policy.meters,
                        stripe=StripeSettings(mode="dry_run"), bucket_seconds=billing.bucket_seconds,
                        grace_seconds=billing.grace_seconds, clock=lambda: worker.clock() + DEMO_CLOCK_SKIP)
    try:
        await sync.run_once()
    finally:
        await sync.aclose()
    async with worker.sessions() as session:
        rows = (await session.scalars(select(LedgerEntry).order_by(LedgerEntry.tenant_id, LedgerEntry.meter))).all()
    totals: dict[tuple[str, str], Decimal] = {}
    for row in rows:
        key = (row.tenant_id, row.meter)
        totals[key] = row.value if row.kind == "gauge" else totals.get(key, Decimal(0)) + row.value
    return [(tenant, meter, value) for (tenant, meter), value in sorted(totals.items())]


def _print_summary(summary: dict[str, Any], billed: list[tuple[str, str, Decimal]]) -> None:
    print("traffic (status: responses):")
    for tenant, counts in summary["statuses"].items():
        shown = ", ".join(f"{status}: {n}" for status, n in sorted(counts.items()))
        print(f"  {tenant:8} {shown}")
    print("\nusage this period (admin view):")
    for tenant, view in summary["views"].items():
        print(f"  {tenant} on {view['plan']}:")
        for meter, entry in view["meters"].items():
            limit = "unlimited" if entry["limit"] is None else entry["limit"]
            print(f"    {meter:18} used {entry['used']!s:>8}  limit {limit!s:>9}  ({entry['source']})")
    print("\nwhat the billing sync would send to Stripe (dry run):")
    for tenant, meter, value in billed:
        print(f"  {tenant:8} {meter:18} {value.normalize()}")
    if not billed:
        print("  nothing")
    print("\nacme ran into its chain_deployments quota (429 quota-exceeded) and its one-chain limit; "
          "globex on Professional did not.")
