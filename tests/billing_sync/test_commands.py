"""`cosmos-gateway sync`, `reconcile` and `demo` as real processes, against a gateway's real traffic.

The gateway (in-process) counts usage into billing buckets of one second; `sync --once` moves the
closed ones into the ledger and sends them to the Stripe emulator; `reconcile` compares both sides.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from gateway.app import Worker
from gateway.cli.devservices import RedisProcess
from metering.db import create_engine
from metering.migrate import upgrade_async
from tests.billing_sync.stripe_emulator import StripeEmulator
from tests.metering.conftest import db_url, postgres_database  # noqa: F401  (fixtures: SQLite and PostgreSQL)
from tests.support import ROOT, SECRET, Upstream, bearer, config_dict, settings_for

ADMIN = {"Authorization": "Bearer ops-token-0123456789"}
EVENTS = ("api_calls", "chain_deployments", "bandwidth_bytes", "storage_gb")


def billing_overrides(emulator_url: str, tmp_path: Path) -> dict[str, Any]:
    return {
        "admin": {"tokens": "ops:ops-token-0123456789"},
        "plans": {"starter": {"rate": {"per_second": 1000, "burst": 1000}}},
        "billing": {"bucket_seconds": 1, "grace_seconds": 0, "stripe_api_key": "sk_test_commands",
                    "stripe": {"mode": "live", "api_base": emulator_url, "max_events_per_second": 0}},
        "redis": {"spool_dir": str(tmp_path / "spool")},
    }


class Env:
    def __init__(self, emulator: StripeEmulator, worker: Worker, config_path: Path) -> None:
        self.emulator = emulator
        self.worker = worker
        self.config_path = config_path

    async def run(self, *args: str, kill_after_events: int | None = None,
                  extra_env: dict[str, str] | None = None, live: bool = True) -> tuple[int, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY", "STRIPE", "REDIS", "DATABASE"))}
        env.update({"GATEWAY_JWT_HS256_SECRET": SECRET, **(extra_env or {})})
        if live:
            env["STRIPE_API_KEY"] = "sk_test_commands"
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway.cli", *args, "--config", str(self.config_path),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env, cwd=ROOT)
        if kill_after_events is not None:  # SIGKILL in the middle of the pass, once Stripe got some events
            deadline = time.monotonic() + 60
            while len(self.emulator.events) < kill_after_events and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
            process.send_signal(signal.SIGKILL)
        out, _ = await asyncio.wait_for(process.communicate(), 120)
        return process.returncode or 0, out.decode(errors="replace")


@pytest.fixture
async def env(upstream: Upstream, redis_server: RedisProcess, tmp_path: Path,
              db_url: str) -> AsyncIterator[Env]:  # noqa: F811
    emulator = await StripeEmulator().start()
    for event in EVENTS:
        emulator.add_meter(event, formula="last" if event == "storage_gb" else "sum")
    database = db_url
    engine = create_engine(database)  # PostgreSQL is never created on the fly: `db upgrade` first, as in production
    await upgrade_async(engine)
    await engine.dispose()
    overrides = billing_overrides(emulator.url, tmp_path)
    worker = Worker(settings_for(upstream.url, redis_server.url, database, **overrides))
    await worker.start()
    raw = config_dict(upstream.url, redis_server.url, database, **overrides)
    raw["auth"].pop("hs256_secret")  # secrets come from the environment, as in production
    raw["billing"].pop("stripe_api_key")
    config_path = tmp_path / "gateway.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    try:
        yield Env(emulator, worker, config_path)
    finally:
        await worker.stop()
        await emulator.close()


async def traffic(env: Env, tenants: dict[str, str | None], requests: int = 6) -> None:
    """Customers set through the admin API, then requests whose buckets close a second later."""
    base = f"http://127.0.0.1:{env.worker.proxy_port}"
    admin = f"http://127.0.0.1:{env.worker.admin_port}"
    async with aiohttp.ClientSession() as http:
        for tenant, customer in tenants.items():
            if customer is not None:
                env.emulator.add_customer(customer)
            async with http.put(f"{admin}/admin/tenants/{tenant}", json={"stripe_customer_id": customer},
                                headers=ADMIN) as response:
                assert response.status in (200, 201), await response.text()
            for i in range(requests):
                path = "/api/chains/c1/deployments" if i % 2 else "/api/chains?usage=storage_gb%3D3"
                async with http.post(base + path, headers=bearer(tenant), data=b"{}") as response:
                    assert response.status == 200
    await env.worker.limiter.drain()
    await asyncio.sleep(1.1)  # the one-second buckets close (grace 0)


async def counted(env: Env, tenant: str) -> dict[str, float]:
    start, _ = env.worker.limiter.period(None, time.time())
    return await env.worker.store.usage(tenant, start, list(EVENTS))


async def test_sync_once_sends_every_counted_unit_once(env: Env) -> None:
    await traffic(env, {"acme": "cus_acme", "globex": "cus_globex"})
    code, out = await env.run("sync", "--once")
    assert code == 0, out
    assert json.loads(out.strip().splitlines()[-1])["pending"] == 0
    for tenant in ("acme", "globex"):
        usage = await counted(env, tenant)
        for meter in ("api_calls", "chain_deployments", "bandwidth_bytes"):
            assert env.emulator.totals(f"cus_{tenant}", meter) == usage[meter], (tenant, meter)
        assert env.emulator.totals(f"cus_{tenant}", "storage_gb") == 3
    sent = len(env.emulator.events)
    assert (await env.run("sync", "--once"))[0] == 0
    assert len(env.emulator.events) == sent  # nothing twice

    code, out = await env.run("reconcile")
    assert code == 0, out
    assert "No differences" in out


async def test_sigkill_mid_pass_then_rerun_is_exact(env: Env) -> None:
    await traffic(env, {f"t{i}": f"cus_t{i}" for i in range(8)}, requests=4)
    env.emulator.slow(0.15)  # long enough to be killed in the middle of the pass
    code, _ = await env.run("sync", "--once", kill_after_events=5)
    assert code == -signal.SIGKILL
    partial = len(env.emulator.events)
    assert 5 <= partial < 8 * 3
    env.emulator.slow(0)
    code, out = await env.run("sync", "--once")
    assert code == 0, out
    assert len(env.emulator.events) > partial  # the rerun waited out the dead worker's lock, then finished
    for i in range(8):
        usage = await counted(env, f"t{i}")
        for meter in ("api_calls", "chain_deployments", "bandwidth_bytes"):
            assert env.emulator.totals(f"cus_t{i}", meter) == usage[meter]


async def test_missing_customer_parks_until_mapped(env: Env) -> None:
    await traffic(env, {"nocus": None}, requests=2)
    code, out = await env.run("sync", "--once")
    assert code == 0, out  # parked counts as done for --once
    admin = f"http://127.0.0.1:{env.worker.admin_port}"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{admin}/admin/sync", headers=ADMIN) as response:
            state = await response.json()
        assert {p["reason"] for p in state["parked"] if p["tenant"] == "nocus"} == {"no_customer"}
        env.emulator.add_customer("cus_late")
        async with http.put(f"{admin}/admin/tenants/nocus", json={"stripe_customer_id": "cus_late"},
                            headers=ADMIN) as response:
            assert response.status == 200
        async with http.post(f"{admin}/admin/sync/run", headers=ADMIN) as response:
            assert response.status == 200, await response.text()
            result = await response.json()
    assert result["state"]["parked"] == [], result
    usage = await counted(env, "nocus")
    assert env.emulator.totals("cus_late", "api_calls") == usage["api_calls"] == 2


async def test_dry_run_once_previews_then_live_once_sends(env: Env) -> None:
    await traffic(env, {"acme": "cus_acme"}, requests=4)
    raw = yaml.safe_load(env.config_path.read_text())
    del raw["billing"]["stripe"]["mode"]  # the default: dry run without STRIPE_API_KEY
    env.config_path.write_text(yaml.safe_dump(raw))
    code, out = await env.run("sync", "--once", live=False)
    assert code == 0, out  # everything previewed: all a dry run can do
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["mode"] == "dry_run" and summary["sent"] == 0 and summary["previewed"] == summary["pending"] > 0
    assert env.emulator.events == []
    code, out = await env.run("reconcile")
    assert code == 0 and "No differences" in out, out  # previews are not sent: the ledger holds none for Stripe
    code, out = await env.run("sync", "--once")  # STRIPE_API_KEY set: live
    assert code == 0, out
    assert json.loads(out.strip().splitlines()[-1])["sent"] == summary["previewed"]
    usage = await counted(env, "acme")
    for meter in ("api_calls", "chain_deployments", "bandwidth_bytes"):
        assert env.emulator.totals("cus_acme", meter) == usage[meter], meter
    assert (await env.run("reconcile"))[0] == 0


async def test_sync_once_fails_while_redis_is_unreachable(env: Env) -> None:
    await traffic(env, {"acme": "cus_acme"}, requests=2)
    code, out = await env.run("sync", "--once", extra_env={"REDIS_URL": f"redis://127.0.0.1:{unused_port()}/0"})
    assert code == 1, out
    assert "Redis is unreachable" in out
    assert env.emulator.events == []
    code, out = await env.run("sync", "--once")  # Redis back: the buckets were waiting there
    assert code == 0, out


async def test_sync_and_reconcile_refuse_a_database_a_newer_version_migrated(env: Env) -> None:
    """One line that says what to do, no traceback, exit 2; the database is left as it is."""
    from sqlalchemy import text

    engine = create_engine(env.worker.settings.database.url)
    try:
        async with engine.begin() as connection:
            await connection.execute(text("UPDATE alembic_version SET version_num = '0099'"))
        for command in (("sync", "--once"), ("reconcile",)):
            code, out = await env.run(*command)
            assert code == 2, out
            assert "Traceback" not in out
            (line,) = [line for line in out.splitlines() if "0099" in line]
            assert line.startswith(f"cosmos-gateway {command[0]}: the database schema is at revision 0099, newer")
        async with engine.connect() as connection:
            assert (await connection.execute(text("SELECT version_num FROM alembic_version"))).scalar() == "0099"
    finally:
        await engine.dispose()


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_reconcile_reports_differences(env: Env) -> None:
    await traffic(env, {"acme": "cus_acme"}, requests=2)
    assert (await env.run("sync", "--once"))[0] == 0
    async with aiohttp.ClientSession() as http:  # Stripe receives something the gateway never counted
        async with http.post(f"{env.emulator.url}/v1/billing/meter_events",
                             headers={"Authorization": "Bearer sk_test_x"},
                             data={"event_name": "api_calls", "identifier": "stray-1",
                                   "timestamp": str(int(time.time())), "payload[stripe_customer_id]": "cus_acme",
                                   "payload[value]": "5"}) as response:
            assert response.status == 200, await response.text()
    code, out = await env.run("reconcile")
    assert code == 1
    assert "acme" in out and "cus_acme" in out and "api_calls" in out
    code, out = await env.run("reconcile", "--period", "2026-13")
    assert code == 2 and "--period" in out


async def test_metrics_show_the_sync_state(env: Env) -> None:
    await traffic(env, {"acme": "cus_acme"}, requests=2)
    assert (await env.run("sync", "--once"))[0] == 0
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{env.worker.admin_port}/metrics") as response:
            text = await response.text()
    assert "billing_sync_pending_buckets 0.0" in text
    assert "billing_sync_lag_seconds" in text


async def test_demo_runs_into_a_quota() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "demo", stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL, cwd=ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY", "STRIPE", "REDIS"))})
    out, _ = await asyncio.wait_for(process.communicate(), 120)
    text = out.decode()
    assert process.returncode == 0, text
    assert "429: " in text and "what the billing sync would send" in text
