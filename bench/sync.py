"""`make bench-sync`: the billing sync worker's throughput and memory (issue 12, item 4).

Passes (`--passes`, comma-separated `kind:db`, db `sqlite` or `postgres`):

    moves:DB     N tenants x 3 meters of closed buckets moved from Redis into the ledger: buckets/s
    v2:DB        the same buckets moved, then sent through the v2 meter event stream, uncapped: events/s
    v1:DB        the same over v1 (one request per event), uncapped
    capped:DB    v1 at the default cap of `billing.stripe.max_events_per_second` (500/s), which must hold
    rss:DB       --rss-tenants (100,000) x 3 meters, a whole v2 pass, the worker's RSS sampled throughout

Every pass runs in a process of its own (so its RSS is the worker's), on an emptied Redis, a new database
(a SQLite file, or a throwaway PostgreSQL database on --postgres-url, dropped afterwards) and a new Stripe
emulator (the tests', in its own process, no faults injected) with a customer per tenant. A pass checks
what it measured: every bucket moved, every event accepted, nothing left pending; otherwise the run fails.
Reported per pass: buckets/s of the move and events/s of the sends (wall time), the CPU time they took per
bucket or event (the worker process, all its threads; and the emulator's), and the worker's RSS: at the
start, its peak, and at 0/25/50/75/100 % of the pass. The defaults take about 2.5 minutes.

Before/after in one run: `--baseline-tree DIR` also runs each pass with the `billing_sync`, `metering` and
emulator of another source tree (e.g. `git archive REV | tar -x -C DIR`), alternating with this tree's
round by round, and reports after/before ratios. Only ratios of one run count on a shared machine.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
METERS = ("api_calls", "chain_deployments", "bandwidth_bytes")
BUCKET_SECONDS = 300
KINDS = ("moves", "v2", "v1", "capped", "rss")
DEFAULT_PASSES = "moves:sqlite,moves:postgres,v2:sqlite,v2:postgres,v1:sqlite,capped:sqlite,rss:sqlite"
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"

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
    await asyncio.Event().wait()
asyncio.run(main())
"""


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU time of a process (this one by default), every thread included."""
    if pid is None:
        return time.process_time()
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class RssSampler:
    """The process's RSS every `interval` seconds, from a thread (a busy event loop cannot delay it)."""

    def __init__(self, interval: float = 0.1) -> None:
        self.samples: list[tuple[float, float]] = []
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            self.samples.append((time.monotonic(), rss_mib()))
            if self._stop.wait(self._interval):
                self.samples.append((time.monotonic(), rss_mib()))
                return

    def quartiles(self) -> list[float]:
        """RSS at 0, 25, 50, 75 and 100 % of the sampled time."""
        return [self.samples[round(q * (len(self.samples) - 1))][1] for q in (0, 0.25, 0.5, 0.75, 1)]


# --------------------------------------------------------------------------- one pass, in its own process


@dataclass(frozen=True)
class Pass:
    kind: str
    db: str

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.db}"


async def _postgres(url: str, statement: str) -> None:
    import asyncpg

    connection = await asyncpg.connect(url, timeout=10)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


async def fill_redis(redis_url: str, tenants: int, bucket: int) -> None:
    """One closed bucket per tenant, every meter in it (values 1-7)."""
    import redis.asyncio as aioredis

    from metering import keys

    client = aioredis.Redis.from_url(redis_url)
    try:
        await client.flushdb()
        pipe = client.pipeline(transaction=False)
        for i in range(tenants):
            pipe.hset(keys.bucket_key(f"tenant-{i}", bucket), mapping={m: 1 + i % 7 for m in METERS})
            if len(pipe) >= 1000:
                await pipe.execute()
        await pipe.execute()
    finally:
        await client.aclose()


async def fill_tenants(sessions: Any, tenants: int) -> None:
    from sqlalchemy import insert

    from metering.clock import utcnow
    from metering.models import Tenant

    now = utcnow()
    async with sessions() as session, session.begin():
        for first in range(0, tenants, 1000):
            await session.execute(insert(Tenant), [
                {"id": f"tenant-{i}", "plan": "starter", "status": "active", "stripe_customer_id": f"cus_{i}",
                 "created_at": now, "updated_at": now} for i in range(first, min(first + 1000, tenants))])


async def run_pass(spec: Pass, tenants: int, args: argparse.Namespace, tree: Path,
                   emulator: subprocess.Popen[bytes] | None, port: int) -> dict[str, Any]:
    """Fill, then time the moves and the sends of `spec`; checks that the work was all done."""
    import gc

    import redis.asyncio as aioredis
    from sqlalchemy import func, select

    from billing_sync.ledger import move_closed_buckets
    from billing_sync.settings import StripeSettings
    from billing_sync.worker import build_worker
    from gateway.cli.devservices import wait_for_port
    from metering import db
    from metering.meters import DEFAULT_METERS
    from metering.migrate import upgrade_async
    from metering.models import LedgerEntry

    workdir = Path(tempfile.mkdtemp(prefix="cosmos-bench-sync-"))
    pg_database = None
    if spec.db == "postgres":
        pg_database = f"cosmos_bench_{secrets.token_hex(6)}"
        await _postgres(args.postgres_url, f'CREATE DATABASE "{pg_database}"')
        url = args.postgres_url.replace("postgresql://", "postgresql+asyncpg://", 1).rsplit("/", 1)[0]
        engine = db.create_engine(f"{url}/{pg_database}")
    else:
        engine = db.create_engine(f"sqlite+aiosqlite:///{workdir}/bench.db")
    client = aioredis.Redis.from_url(args.redis_url)
    try:
        await upgrade_async(engine)
        sessions = db.session_factory(engine)
        await fill_tenants(sessions, tenants)
        bucket = int(time.time() // BUCKET_SECONDS * BUCKET_SECONDS) - 2 * BUCKET_SECONDS
        await fill_redis(args.redis_url, tenants, bucket)
        if emulator is not None:
            wait_for_port(port, timeout=120, process=emulator)
        meters = [m for m in DEFAULT_METERS if m.name in METERS]
        gc.collect()
        out: dict[str, Any] = {"pass": spec.name, "tree": str(tree), "tenants": tenants, "rss_start": rss_mib()}
        emulator_cpu = cpu_seconds(emulator.pid) if emulator is not None else 0.0
        with RssSampler() as sampler:
            cpu = cpu_seconds()
            started = time.monotonic()
            if spec.kind == "rss":
                worker = _worker(build_worker, StripeSettings, client, sessions, meters, "v2_stream", 0.0, port, args)
                result = await worker.run_once()
                await worker.aclose()
                out["moved"], out["events"] = result.moved, result.sent + result.duplicates
                out["total_s"] = time.monotonic() - started
            else:
                moved = await move_closed_buckets(client, sessions, {m.name: m for m in meters}, now=time.time(),
                                                  bucket_seconds=BUCKET_SECONDS, grace_seconds=10)
                out["moved"], out["move_s"] = moved.moved, time.monotonic() - started
                out["move_cpu"] = cpu_seconds() - cpu
                if spec.kind != "moves":
                    transport = "v2_stream" if spec.kind == "v2" else "v1"
                    cap = 500.0 if spec.kind == "capped" else 0.0
                    worker = _worker(build_worker, StripeSettings, client, sessions, meters, transport, cap, port,
                                     args)
                    sending, cpu = time.monotonic(), cpu_seconds()
                    result = await worker.run_once()
                    await worker.aclose()
                    out["send_s"] = time.monotonic() - sending
                    out["send_cpu"] = cpu_seconds() - cpu
                    out["events"] = result.sent + result.duplicates
                out["total_s"] = time.monotonic() - started
            out["total_cpu"] = cpu_seconds() - cpu if spec.kind == "rss" else None
        if emulator is not None:
            out["emulator_cpu"] = cpu_seconds(emulator.pid) - emulator_cpu
        out["rss_quartiles"] = sampler.quartiles()
        out["rss_peak"] = max(rss for _, rss in sampler.samples)
        async with sessions() as session:
            by_state = dict((await session.execute(
                select(LedgerEntry.state, func.count()).group_by(LedgerEntry.state))).tuples().all())
        left = len([key async for key in client.scan_iter(match="gw:{t:*}:b:*", count=1000)])
        expected_rows = tenants * len(METERS)
        problems = []
        if out["moved"] != tenants or left:
            problems.append(f"moved {out['moved']} of {tenants} buckets, {left} keys left in Redis")
        if spec.kind == "moves" and by_state != {"pending": expected_rows}:
            problems.append(f"ledger {by_state}, expected {expected_rows} pending rows")
        if spec.kind != "moves" and (out.get("events") != expected_rows or by_state != {"sent": expected_rows}):
            problems.append(f"{out.get('events')} events accepted, ledger {by_state}, expected {expected_rows} sent")
        out["problems"] = problems
        return out
    finally:
        await client.aclose()
        await engine.dispose()
        if pg_database is not None:
            await _postgres(args.postgres_url, f'DROP DATABASE IF EXISTS "{pg_database}" WITH (FORCE)')
        shutil.rmtree(workdir, ignore_errors=True)


def _worker(build_worker: Any, settings: Any, client: Any, sessions: Any, meters: Any, transport: str, cap: float,
            port: int, args: argparse.Namespace) -> Any:
    stripe = settings(mode="live", api_base=f"http://127.0.0.1:{port}", max_events_per_second=cap,
                      concurrency=args.concurrency, api_key="sk_test_bench", transport=transport)
    return build_worker(redis=client, sessions=sessions, meters=meters, stripe=stripe,
                        bucket_seconds=BUCKET_SECONDS, grace_seconds=10)


def child(args: argparse.Namespace) -> None:
    """One pass with the code of `args.tree`, its result as one JSON line on stdout."""
    tree = Path(args.tree).resolve()
    sys.path.insert(0, str(tree))  # before any import of the code under test
    spec = Pass(*args.child.split(":"))
    tenants = args.rss_tenants if spec.kind == "rss" else args.capped_tenants if spec.kind == "capped" else args.tenants
    from gateway.cli.devservices import free_port

    port, emulator = free_port(), None
    if spec.kind != "moves":  # the Stripe emulator of the tree under test, in its own process
        emulator = subprocess.Popen([sys.executable, "-c", EMULATOR.format(
            root=str(tree), port=port, meters=METERS, tenants=tenants)], stdout=subprocess.DEVNULL)
    try:
        result = asyncio.run(run_pass(spec, tenants, args, tree, emulator, port))
    finally:
        if emulator is not None:
            emulator.terminate()
            emulator.wait(10)
    import billing_sync

    result["imported_from"] = str(Path(billing_sync.__file__).resolve().parent.parent)
    print(json.dumps(result), flush=True)


# --------------------------------------------------------------------------- the run: passes x trees x rounds


def spawn(spec: Pass, tree: Path, args: argparse.Namespace, redis_url: str) -> dict[str, Any]:
    command = [sys.executable, "-m", "bench.sync", "--child", spec.name, "--tree", str(tree),
               "--redis-url", redis_url, "--tenants", str(args.tenants), "--capped-tenants",
               str(args.capped_tenants), "--rss-tenants", str(args.rss_tenants), "--concurrency",
               str(args.concurrency), "--postgres-url", args.postgres_url]
    done = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"pass {spec.name} ({tree}) failed with exit status {done.returncode}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    if Path(result["imported_from"]) != tree:
        raise SystemExit(f"pass {spec.name} imported billing_sync from {result['imported_from']}, not {tree}")
    return result


def describe(result: dict[str, Any]) -> str:
    kind = result["pass"].split(":")[0]
    parts = []
    if "move_s" in result:
        parts.append(f"moves {result['moved']:,} buckets in {result['move_s']:.1f} s = "
                     f"{result['moved'] / result['move_s']:,.0f} buckets/s "
                     f"({result['move_cpu'] / result['moved'] * 1e6:.0f} µs CPU each)")
    if "send_s" in result:
        parts.append(f"sends {result['events']:,} events in {result['send_s']:.1f} s = "
                     f"{result['events'] / result['send_s']:,.0f} events/s "
                     f"({result['send_cpu'] / result['events'] * 1e6:.0f} µs CPU each, emulator "
                     f"{result['emulator_cpu'] / result['events'] * 1e6:.0f})")
    if kind != "moves":
        parts.append(f"whole pass {result['events'] / result['total_s']:,.0f} events/s")
    if result.get("total_cpu"):
        parts.append(f"{result['total_cpu'] / result['events'] * 1e6:.0f} µs CPU an event, emulator "
                     f"{result['emulator_cpu'] / result['events'] * 1e6:.0f}")
    quartiles = " ".join(f"{q:.0f}" for q in result["rss_quartiles"])
    parts.append(f"RSS {result['rss_start']:.0f} -> peak {result['rss_peak']:.0f} MiB "
                 f"(+{result['rss_peak'] - result['rss_start']:.0f}; at 0/25/50/75/100 %: {quartiles})")
    return "; ".join(parts)


def rate(result: dict[str, Any]) -> float:
    """The figure a pass is judged by: buckets/s of a move, events/s of a send (whole pass for `rss`)."""
    kind = result["pass"].split(":")[0]
    if kind == "moves":
        return float(result["moved"] / result["move_s"])
    if kind == "rss":
        return float(result["events"] / result["total_s"])
    return float(result["events"] / result["send_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passes", default=DEFAULT_PASSES, help=f"comma-separated kind:db (default {DEFAULT_PASSES})")
    parser.add_argument("--tenants", type=int, default=10_000, help="tenants of the moves, v2 and v1 passes")
    parser.add_argument("--capped-tenants", type=int, default=1_000, help="tenants of the capped pass")
    parser.add_argument("--rss-tenants", type=int, default=100_000, help="tenants of the rss pass")
    parser.add_argument("--concurrency", type=int, default=32, help="billing.stripe.concurrency")
    parser.add_argument("--rounds", type=int, default=1, help="each pass this many times (medians reported)")
    parser.add_argument("--postgres-url", default=os.environ.get("TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL),
                        help="server for the throwaway PostgreSQL databases")
    parser.add_argument("--baseline-tree", type=Path, metavar="DIR", help="also run every pass with this tree's code")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--tree", default=str(ROOT), help=argparse.SUPPRESS)
    parser.add_argument("--redis-url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    specs = []
    for name in args.passes.split(","):
        kind, _, database = name.strip().partition(":")
        if kind not in KINDS or database not in ("sqlite", "postgres"):
            parser.error(f"--passes: {name!r} is not kind:db with kind in {KINDS} and db sqlite or postgres")
        specs.append(Pass(kind, database))
    trees = [ROOT]
    if args.baseline_tree is not None:
        baseline = args.baseline_tree.resolve()
        if not (baseline / "billing_sync" / "worker.py").is_file():
            parser.error(f"--baseline-tree: {baseline} holds no billing_sync/worker.py")
        trees.append(baseline)

    from gateway.cli.devservices import RedisProcess

    print(f"{dt.date.today()} · {os.cpu_count()} cores · Python {platform.python_version()} · "
          f"{args.tenants:,} tenants x {len(METERS)} meters (capped {args.capped_tenants:,}, rss "
          f"{args.rss_tenants:,}) · concurrency {args.concurrency} · emulator in its own process", flush=True)
    redis = RedisProcess().start()
    results: dict[tuple[str, Path], list[dict[str, Any]]] = {}
    failed = False
    try:
        for round_ in range(args.rounds):
            for spec in specs:
                # Alternate which tree goes first, so neither always gets the quieter moment.
                for tree in trees if round_ % 2 == 0 else trees[::-1]:
                    result = spawn(spec, tree, args, redis.url)
                    results.setdefault((spec.name, tree), []).append(result)
                    label = "" if tree == ROOT else " (baseline)"
                    print(f"  {spec.name:16}{label} {describe(result)}", flush=True)
                    for problem in result["problems"]:
                        print(f"    FAILED: {problem}", flush=True)
                        failed = True
    finally:
        redis.close()
    if args.rounds > 1 or len(trees) > 1:
        print("\nmedians" + (" and after/before" if len(trees) > 1 else ""))
        for spec in specs:
            now = statistics.median(rate(r) for r in results[(spec.name, ROOT)])
            line = f"  {spec.name:16} {now:,.0f}/s"
            if len(trees) > 1:
                before = statistics.median(rate(r) for r in results[(spec.name, trees[1])])
                line += f"   baseline {before:,.0f}/s   after/before {now / before:.2f}x"
            print(line)
    capped = [r for (name, tree), rs in results.items() if name.startswith("capped") and tree == ROOT for r in rs]
    for result in capped:
        if rate(result) > 500 * 1.02:
            print(f"FAILED: the capped pass sent {rate(result):,.0f} events/s, above the 500/s cap")
            failed = True
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
