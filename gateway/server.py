"""`cosmos-gateway serve`: one worker in-process, or a supervisor forking N workers.

Workers share the listening ports with SO_REUSEPORT (the kernel spreads connections). The
supervisor restarts a worker that dies, and on SIGTERM/SIGINT forwards SIGTERM so every worker
drains its in-flight requests within `server.shutdown_grace_seconds`, then exits 0.
Metrics: before forking, PROMETHEUS_MULTIPROC_DIR is set so a scrape of any worker sums all.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Literal

from gateway.config.settings import MAX_WORKERS, Settings

log = logging.getLogger("cosmos_gateway.server")
RESTART_BACKOFF = 1.0
# Where `server.workers: auto` learns of a CPU quota: this process's cgroups, and their hierarchies.
_PROC_CGROUP = Path("/proc/self/cgroup")
_CGROUP_ROOT = Path("/sys/fs/cgroup")


def serve(settings: Settings, workers: int | Literal["auto"]) -> int:
    """Run the gateway until SIGTERM/SIGINT; returns the exit status.

    `settings` name the upstream and Redis: `cosmos-gateway serve` fills in development services first.
    `workers` is a count, or "auto" for one worker per CPU core (`worker_count`).
    """
    count = worker_count(workers)
    if workers == "auto":
        log.info("server.workers auto: %d worker%s", count, "" if count == 1 else "s")
    if count <= 1:
        return _run_worker(settings, reuse_port=False)
    return _supervise(settings, count)


def worker_count(workers: int | Literal["auto"], *, cgroup_root: Path = _CGROUP_ROOT,
                 proc_cgroup: Path = _PROC_CGROUP) -> int:
    """The number of worker processes: `workers`, or for "auto" one per CPU core this process may run on
    (its CPU affinity, which a cpuset limits), no more than its cgroups' CPU quota allows (a container's
    `--cpus`, a Kubernetes CPU limit: 1.5 CPUs make 2 workers), and at most MAX_WORKERS."""
    if workers != "auto":
        return workers
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_cpu_quota(cgroup_root, proc_cgroup)
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, min(cores, MAX_WORKERS))


def _cgroup_cpu_quota(root: Path, proc_cgroup: Path) -> float | None:
    """The smallest CPU quota (CPUs per period) on this process's cgroup or one above it, cgroup v2 or v1;
    None when there is none or it cannot be read."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    quotas: list[float] = []
    for line in lines:
        fields = line.split(":", 2)  # hierarchy-ID:controllers:path
        if len(fields) != 3:
            continue
        _, controllers, path = fields
        if not controllers:  # v2, the unified hierarchy
            quotas += _quotas_upward(root, path, _v2_quota)
        elif "cpu" in controllers.split(","):  # v1: the cpu controller's hierarchy
            quotas += _quotas_upward(root / "cpu", path, _v1_quota)
    return min(quotas, default=None)


def _quotas_upward(base: Path, path: str, read: Callable[[Path], float | None]) -> list[float]:
    """The quotas from the cgroup at `path` up to `base` (in a container, `path` may not exist below the
    hierarchy it sees: then its own cgroup is `base`)."""
    folder = base.joinpath(*(part for part in path.split("/") if part))
    found = []
    while True:
        quota = read(folder)
        if quota is not None:
            found.append(quota)
        if folder == base or base not in folder.parents:
            return found
        folder = folder.parent


def _v2_quota(folder: Path) -> float | None:
    try:
        quota, period = (folder / "cpu.max").read_text().split()  # "max 100000" or "150000 100000"
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError, ZeroDivisionError):
        return None


def _v1_quota(folder: Path) -> float | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())  # -1: none
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def _run_worker(settings: Settings, *, reuse_port: bool, index: int = 0,
                supervisor: int | None = None) -> int:
    _install_uvloop()
    return asyncio.run(_worker_main(settings, reuse_port=reuse_port, index=index, supervisor=supervisor))


async def _worker_main(settings: Settings, *, reuse_port: bool, index: int, supervisor: int | None) -> int:
    from gateway.app import Worker, run_until_stopped

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    orphan_watch = asyncio.create_task(_stop_when_orphaned(stop, supervisor)) if supervisor else None

    def started(worker: Worker) -> None:
        # Everything allocated at start-up lives for the whole process: keep it out of the cyclic GC's
        # scans, and collect young objects less often, which shortens the pauses behind the p99.
        gc.collect()
        gc.freeze()
        gc.set_threshold(10_000, 20, 20)
        log.info("worker %d: proxy on %s, admin on %s, upstream %s", os.getpid(),
                 settings.listen.proxy, settings.listen.admin, settings.upstream.url)

    try:
        await run_until_stopped(Worker(settings, reuse_port=reuse_port, index=index), stop, started)
    finally:
        if orphan_watch is not None:
            orphan_watch.cancel()
    log.info("worker %d: drained, exiting", os.getpid())
    return 0


async def _stop_when_orphaned(stop: asyncio.Event, supervisor: int) -> None:
    """A forked worker whose supervisor died (SIGKILL, OOM) drains and exits instead of serving alone."""
    while not stop.is_set():
        if os.getppid() != supervisor:  # reparented: the supervisor is gone (perhaps before we looked)
            log.warning("worker %d: the supervisor is gone; draining and exiting", os.getpid())
            stop.set()
            return
        await asyncio.sleep(1.0)


def _supervise(settings: Settings, workers: int) -> int:
    metrics_dir = tempfile.mkdtemp(prefix="cosmos-gateway-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            _kill(pid, signal.SIGTERM)

    children: dict[int, int] = {}  # pid -> worker index (a restarted worker takes over its spool file)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        _migrate_once(settings)
        for index in range(workers):
            children[_fork_worker(settings, index)] = index
        status = 0
        while children:
            try:
                pid, wait_status = os.wait()
            except ChildProcessError:
                break
            except InterruptedError:
                continue
            if pid not in children:
                continue
            index = children.pop(pid)
            code = os.waitstatus_to_exitcode(wait_status)
            _mark_dead(pid)
            if stopping:
                status = status or (code if code > 0 else 0)
                continue
            log.error("worker %d exited with %d; starting a new one", pid, code)
            time.sleep(RESTART_BACKOFF)
            if not stopping:
                children[_fork_worker(settings, index)] = index
        return status
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _migrate_once(settings: Settings) -> None:
    """The parent prepares the schema before it forks: SQLite (the development default) is migrated, so workers
    do not race to do it; PostgreSQL is checked to be at head. A schema no worker could start on then stops
    `serve` with one line (metering.migrate.MigrationError), instead of workers failing and restarting forever."""
    from metering.db import create_engine
    from metering.migrate import prepare_schema

    async def prepare() -> None:
        engine = create_engine(settings.database.url)
        try:
            await prepare_schema(engine)
        finally:
            await engine.dispose()

    asyncio.run(prepare())


def _fork_worker(settings: Settings, index: int) -> int:
    supervisor = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    code = 1
    try:
        code = _run_worker(settings, reuse_port=True, index=index, supervisor=supervisor)
    except BaseException:
        log.exception("worker %d failed", os.getpid())
    finally:
        logging.shutdown()
        sys.stdout.flush()
        os._exit(code)


def _mark_dead(pid: int) -> None:
    from gateway.metrics import mark_worker_dead

    mark_worker_dead(pid)


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # optional: the default loop works, only slower
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def with_workers(settings: Settings, workers: int | Literal["auto"] | None) -> Settings:
    if workers is None:
        return settings
    return replace(settings, server=replace(settings.server, workers=workers))
