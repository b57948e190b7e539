"""The real parts of a chaos run, and the faults that can be done to them.

Redis: a private redis-server with an append-only file fsynced on every write, so a restart is a restart
and not an amnesia (the suite's `redis_server` keeps nothing on disk: a restart there wipes the counts of
every open bucket, which no product could bill afterwards). Every client of Redis (gateways, workers)
goes through a `FaultProxy`. Two gateway processes, the `sync` daemon, the Stripe emulator and the chaos
upstream; one SQLite file for all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis
import yaml

from gateway.cli.devservices import RedisProcess
from tests.billing_sync.stripe_emulator import StripeEmulator
from tests.chaos.schedule import Fault
from tests.chaos.upstream import ChaosUpstream
from tests.faultproxy import FaultProxy
from tests.support import BUSY_SCRIPT, ROOT, GatewayProcess, Upstream, config_dict

ADMIN_TOKEN = "chaos-admin-token-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
STRIPE_KEY = "sk_test_chaos"
BUCKET_SECONDS = 2
GRACE_SECONDS = 1
EVENTS = ("api_calls", "chain_deployments", "bandwidth_bytes", "storage_gb")
HIGH_RATE = {"per_second": 100000, "burst": 100000}  # rate limits are not what this harness measures
PLANS = {
    "starter": {"rate": HIGH_RATE, "quotas": {"chain_deployments": {"limit": 6}, "storage_gb": {"limit": 10}}},
    "professional": {"rate": HIGH_RATE, "quotas": {"chain_deployments": {"limit": 15}}},
    "enterprise": {"rate": HIGH_RATE, "quotas": {}},
}


@dataclass
class Kill:
    """A gateway instance ended by SIGKILL: what was in flight there may be counted and never settled."""

    gateway: int
    generation: int
    at: float  # just before the signal
    done: float = 0.0  # once the process is gone: a connect accepted in between was in flight too


class SyncProcess:
    """`cosmos-gateway sync` (the daemon, or `--once`) as a child process in its own process group."""

    def __init__(self, config_path: Path, log_path: Path, *, once: bool = False) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY", "STRIPE", "REDIS", "DATABASE"))}
        self._log = log_path.open("ab")
        args = [sys.executable, "-m", "gateway.cli", "sync", "--config", str(config_path)]
        self.process = subprocess.Popen([*args, "--once"] if once else args, stdout=self._log,
                                        stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)

    def send(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signum)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 15) -> int:
        self.send(signum)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.send(signal.SIGKILL)
            return self.process.wait(5)
        finally:
            self._log.close()


@dataclass
class Cluster:
    workdir: Path
    redis: RedisProcess
    proxy: FaultProxy
    emulator: StripeEmulator
    upstream: ChaosUpstream
    upstream_server: Upstream
    config: dict[str, Any]
    config_path: Path
    gateways: list[GatewayProcess] = field(default_factory=list)
    generations: list[int] = field(default_factory=lambda: [0, 0])
    kills: list[Kill] = field(default_factory=list)
    worker: SyncProcess | None = None
    extra_worker: SyncProcess | None = None
    notes: list[str] = field(default_factory=list)
    hold_abandons: bool = False  # no abandoned uploads while a Redis fault leaves checks unresolved
    redis_fault_until: float = 0.0  # monotonic
    _starting: dict[asyncio.Future[Any], GatewayProcess] = field(default_factory=dict)  # replacements starting
    _retired: list[GatewayProcess] = field(default_factory=list)  # replaced gateways (stopped, or not yet)

    def abandons_held(self) -> bool:
        return self.hold_abandons and time.monotonic() < self.redis_fault_until

    @property
    def database_url(self) -> str:
        return f"sqlite+aiosqlite:///{self.workdir / 'chaos.db'}"

    # -- lifecycle -------------------------------------------------------------------------------------

    @classmethod
    async def start(cls, workdir: Path) -> Cluster:
        redis = RedisProcess(extra_args=("--appendonly", "yes", "--appendfsync", "always")).start()
        proxy = await FaultProxy(redis.port).start()
        emulator = await StripeEmulator().start()
        for event in EVENTS:
            emulator.add_meter(event, formula="last" if event == "storage_gb" else "sum")
        upstream = ChaosUpstream()
        server = await Upstream(upstream.app()).start()
        database = f"sqlite+aiosqlite:///{workdir / 'chaos.db'}"
        config = config_dict(
            server.url, proxy.url, database,
            upstream={"url": server.url, "connect_timeout": 2, "read_timeout": 8},
            redis={"on_error": "fail_open"},
            admin={"tokens": f"ops:{ADMIN_TOKEN}"},
            plans=PLANS,
            billing={"bucket_seconds": BUCKET_SECONDS, "grace_seconds": GRACE_SECONDS, "stripe_api_key": STRIPE_KEY,
                     "stripe": {"mode": "live", "api_base": emulator.url, "max_events_per_second": 0}},
        )
        config_path = workdir / "chaos.yaml"
        config_path.write_text(yaml.safe_dump(config))
        cluster = cls(workdir, redis, proxy, emulator, upstream, server, config, config_path)
        upgrade = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "gateway.cli", "db", "upgrade", "--config", str(config_path)],
            cwd=ROOT, capture_output=True, timeout=60)
        assert upgrade.returncode == 0, upgrade.stderr.decode(errors="replace")
        cluster.gateways = list(await asyncio.gather(*(asyncio.to_thread(cluster._new_gateway) for _ in range(2))))
        cluster.start_worker()
        return cluster

    def _new_gateway(self) -> GatewayProcess:
        return GatewayProcess(self.config, self.workdir).start()

    def start_worker(self) -> None:
        self.worker = SyncProcess(self.config_path, self.workdir / "sync.log")

    async def close(self) -> None:
        """Stop everything this run started, each by its own process id."""
        starting = dict(self._starting)  # gateways starting in their threads: stop them too, once they run
        await asyncio.gather(*starting, return_exceptions=True)
        for gateway in starting.values():
            await asyncio.to_thread(gateway.stop)
        for worker in (self.worker, self.extra_worker):
            if worker is not None and worker.process.poll() is None:
                await asyncio.to_thread(worker.stop, signal.SIGKILL)
        # A retired gateway already stopped was reaped: its process id may name another process by now.
        retired = [g for g in self._retired if g.process is not None and g.process.poll() is None]
        for gateway in [*self.gateways, *retired]:
            await asyncio.to_thread(gateway.stop)
        await self.upstream_server.close()
        await self.emulator.close()
        await self.proxy.close()
        await asyncio.to_thread(self.redis.close)

    # -- faults ----------------------------------------------------------------------------------------

    async def inject(self, fault: Fault, started: float) -> None:
        """Run one fault of the schedule at its time; every fault ends by itself (a process is restarted)."""
        await asyncio.sleep(max(0.0, started + fault.at - time.monotonic()))
        kind, duration = fault.kind, fault.duration
        if kind.startswith("redis"):  # unknown outcomes resolve up to LATE_REPLY_SECONDS (5 s) later
            self.redis_fault_until = time.monotonic() + duration + 6.0
        if kind == "redis_replies_lost":
            self.proxy.drop_replies = True
            await asyncio.sleep(duration)
            self.proxy.cut()
            self.proxy.drop_replies = False
        elif kind == "redis_partition":
            self.proxy.blackhole = True
            await asyncio.sleep(duration)
            self.proxy.cut()
            self.proxy.blackhole = False
        elif kind == "redis_stall":
            client = aioredis.Redis(port=self.redis.port, socket_timeout=10)
            try:
                await client.eval(BUSY_SCRIPT, 0, int(duration * 1_000_000))
            finally:
                await client.aclose()
        elif kind == "redis_restart":
            await asyncio.to_thread(self.redis.stop)
            await asyncio.sleep(duration)
            await asyncio.to_thread(self.redis.start)
        elif kind in ("gateway_sigkill", "gateway_sigterm"):
            await self._restart_gateway(fault.target, kind == "gateway_sigkill", duration)
        elif kind in ("worker_sigkill", "worker_sigterm"):
            assert self.worker is not None
            await asyncio.to_thread(self.worker.stop, signal.SIGKILL if kind == "worker_sigkill" else signal.SIGTERM)
            await asyncio.sleep(duration)
            self.start_worker()
        elif kind == "two_workers":
            self.extra_worker = SyncProcess(self.config_path, self.workdir / "sync-extra.log")
            await asyncio.sleep(duration)
            await asyncio.to_thread(self.extra_worker.stop, signal.SIGTERM)
            self.extra_worker = None
        elif kind == "stripe_500":
            self.emulator.fail_next(fault.count, 500, endpoint="meter_events")
        elif kind == "stripe_429":
            self.emulator.fail_next(fault.count, 429, endpoint="meter_events")
        elif kind == "stripe_lost_answers":
            self.emulator.drop_next(fault.count, after_accept=True, endpoint="meter_events")
        elif kind == "stripe_dropped":
            self.emulator.drop_next(fault.count, endpoint="meter_events")
        else:
            raise AssertionError(f"unknown fault {kind}")

    async def _restart_gateway(self, index: int, kill: bool, down: float) -> None:
        gateway = self.gateways[index]
        assert gateway.process is not None
        if kill:
            record = Kill(index, self.generations[index], time.time())
            self.kills.append(record)
            await asyncio.to_thread(gateway.stop)  # SIGKILL to its process group
            record.done = time.time()
        else:
            code = await asyncio.to_thread(gateway.terminate, 20)
            if code != 0:
                self.notes.append(f"gateway {index} exited {code} on SIGTERM")
        await asyncio.sleep(down)
        # Owned before it starts (`_starting`): a run that ends (this task cancelled) while the replacement
        # starts in its thread must still stop it in close(), which waits for the start first. It joins
        # `gateways` (where traffic and other faults find it) only once it listens.
        replacement = GatewayProcess(self.config, self.workdir)
        starting = asyncio.ensure_future(asyncio.to_thread(replacement.start))
        self._starting[starting] = replacement
        await asyncio.shield(starting)  # cancelled or failed: it stays in `_starting` for close()
        del self._starting[starting]
        self.generations[index] += 1
        # Two faults of one gateway may overlap: the one replaced here may be another fault's replacement,
        # still running. close() stops every gateway ever started, so none outlives the run.
        self._retired.append(self.gateways[index])
        self.gateways[index] = replacement

    # -- draining --------------------------------------------------------------------------------------

    def clear_faults(self) -> None:
        self.proxy.drop_replies = self.proxy.blackhole = False
        self.emulator.clear_faults()

    async def spool_pending(self) -> float:
        """Entries waiting in the gateways' fail-open spools (their /metrics, summed)."""
        total = 0.0
        async with aiohttp.ClientSession() as http:
            for gateway in self.gateways:
                async with http.get(gateway.admin_url + "/metrics") as response:
                    for line in (await response.text()).splitlines():
                        if line.startswith("gateway_spool_pending"):
                            total += float(line.rsplit(" ", 1)[1])
        return total

    async def sync_once(self) -> tuple[int, str]:
        log_path = self.workdir / "sync-once.log"
        start = log_path.stat().st_size if log_path.exists() else 0
        once = SyncProcess(self.config_path, log_path, once=True)
        try:
            code = await asyncio.to_thread(once.process.wait, 90)
        finally:
            once.stop(signal.SIGKILL, timeout=5)
        return code, log_path.read_bytes()[start:].decode(errors="replace")
