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
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import replace

from gateway.config.settings import Settings

log = logging.getLogger("cosmos_gateway.server")
RESTART_BACKOFF = 1.0


def serve(settings: Settings, workers: int) -> int:
    """Run the gateway until SIGTERM/SIGINT; returns the exit status.

    `settings` name the upstream and Redis: `cosmos-gateway serve` fills in development services first.
    """
    if workers <= 1:
        return _run_worker(settings, reuse_port=False)
    return _supervise(settings, workers)


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
    """SQLite (the development default) is migrated by the parent, so workers do not race to do it."""
    if settings.database.url.startswith("sqlite"):
        from metering.migrate import upgrade

        upgrade(settings.database.url)


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


def with_workers(settings: Settings, workers: int | None) -> Settings:
    if workers is None:
        return settings
    return replace(settings, server=replace(settings.server, workers=workers))
