"""`make bench`: cosmos-gateway against nginx (the ceiling) and HAProxy (the closest C peer), on this machine.

Scenarios (bench/scenarios.py, wrk scripts in bench/lua/): `single`, one token and `GET /api/chains`; `tenants`,
the headline, 1,000 tenants with their own tokens, 90 % `GET /api/chains/<id>`, 5 % `POST .../deployments`,
5 % `GET /api/chains`. Targets (bench/targets.py): `nginx` reverse proxy, `haproxy` (HS256 JWT + per-tenant stick
table), the gateway with JWT only (`auth`), with every default meter and a quota (`metered`), and the latter
with its access log on (`metered-log`); `upstream` (nginx answering directly) on request.

Every run of a round goes right after the others, round after round (odd rounds in reverse order), so a busy
moment hurts all alike; the report holds medians and ratios of medians. Besides the throughput runs at
`--connections`, the headline scenario runs at each of `--latency` connections (nginx, HAProxy, metered
gateway: latency added) and at each further `--workers` count (nginx workers, HAProxy threads, gateway
workers: scaling). Any socket error or response above 399 fails the run (exit 1) naming the target.
Needs nginx, wrk and haproxy (Debian: apt-get install nginx-light wrk haproxy).

Before/after in one run: `--baseline-tree DIR` (`make bench BASELINE=DIR`) also runs the gateway of another
source tree, e.g. the commit a change started from (`git archive REV | tar -x -C DIR`), as (c') and (d'), each
right next to (c) and (d) in every round, and reports (c)/(c') and (d)/(d'). Its processes run with cwd and
PYTHONPATH set to DIR; which copy they import is checked before the run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import report
from bench.scenarios import SCENARIOS, Result, Scenario, probe, run_wrk, write_tokens
from bench.targets import (
    GATEWAYS,
    BenchFailure,
    Server,
    check_source,
    cpu_seconds,
    require,
    start_gateway,
    start_haproxy,
    start_nginx_proxy,
    start_upstream,
    stop,
    version,
)
from gateway.cli.devservices import RedisProcess

TARGETS = ("upstream", "nginx", "haproxy", "auth", "metered", "metered-log")
DEFAULT_TARGETS = "nginx,haproxy,auth,metered,metered-log"
SCALED = ("upstream", "nginx", "haproxy", "metered")  # the targets of the latency and worker runs
WARM_UP_SECONDS = 1


@dataclass(frozen=True)
class Job:
    """One wrk run per round: a scenario against a server at a number of connections."""

    section: str  # "throughput", "latency" or "workers"
    scenario: Scenario
    server: Server
    connections: int

    @property
    def what(self) -> str:
        return f"{self.server.label} ({self.scenario.key}, -c{self.connections}, {report.workers(self.server)})"


def csv(kind: type, choices: Iterable[str] | None = None) -> Callable[[str], list[Any]]:
    """An argparse type: a comma-separated list ('none' or '' for an empty one)."""
    def parse(text: str) -> list[Any]:
        items = [item.strip() for item in text.split(",") if item.strip() not in ("", "none")]
        if choices is not None and (bad := [i for i in items if i not in choices]):
            raise argparse.ArgumentTypeError(f"unknown {', '.join(bad)} (choose from {', '.join(choices)})")
        try:
            return [kind(item) for item in items]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # argparse passes string defaults through `type` too.
    parser.add_argument("--scenarios", type=csv(str, SCENARIOS), default="single,tenants",
                        help="comma-separated: single, tenants (default both)")
    parser.add_argument("--targets", type=csv(str, TARGETS), default=DEFAULT_TARGETS,
                        help=f"comma-separated, of {', '.join(TARGETS)} (default {DEFAULT_TARGETS})")
    parser.add_argument("--seconds", type=int, default=5, help="wrk duration of each run (default 5)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; the report holds medians (default 5)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections of the throughput runs")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    parser.add_argument("--latency", type=csv(int), default="1,8", metavar="C,...",
                        help="connection counts of the latency runs in the headline scenario ('none': skip)")
    parser.add_argument("--workers", type=csv(int), default="1,2", metavar="N,...",
                        help="the first: processes (HAProxy: threads) of every target; each further count runs "
                             "nginx, HAProxy and the metered gateway in the headline scenario (default 1,2)")
    parser.add_argument("--tenants", type=int, default=1000, help="tenants of the tenants scenario (default 1000)")
    parser.add_argument("--baseline-tree", type=Path, metavar="DIR",
                        help="also run the gateway of this source tree as (c') and (d'): before/after in one run")
    args = parser.parse_args(argv)
    if not args.scenarios or not args.targets or not args.workers:
        parser.error("--scenarios, --targets and --workers need at least one value")
    if min(args.workers + args.latency) < 1 or min(args.connections, args.rounds, args.tenants) < 1:
        parser.error("workers, connections, rounds and tenants must be at least 1")
    args.headline = "tenants" if "tenants" in args.scenarios else args.scenarios[0]
    return args


def start_servers(args: argparse.Namespace, workdir: Path, redis_url: str, baseline: Path | None,
                  binaries: dict[str, str], started: list[Server]) -> tuple[list[Server], dict[int, list[Server]]]:
    """(the targets at the first worker count, in report order; {further worker count: the scaled targets}).

    Every server is appended to `started` as soon as it runs, so the caller stops it whatever happens next.
    """
    upstream = start_upstream(binaries["nginx"], workdir, max(args.workers))
    started.append(upstream)

    def start(keys: Iterable[str], workers: int, with_baseline: bool) -> list[Server]:
        servers: list[Server] = []
        for key in keys:
            if key == "upstream":
                servers.append(upstream)
                continue
            if key == "nginx":
                started.append(start_nginx_proxy(binaries["nginx"], workdir, upstream.port, workers))
                servers.append(started[-1])
            elif key == "haproxy":
                started.append(start_haproxy(binaries["haproxy"], workdir, upstream.port, workers))
                servers.append(started[-1])
            for spec in GATEWAYS:
                if spec.key == key and (not spec.baseline or with_baseline):
                    started.append(start_gateway(spec, workdir, upstream.port, redis_url, workers,
                                                 baseline if spec.baseline else None))
                    servers.append(started[-1])
        return servers

    main = start([k for k in TARGETS if k in args.targets], args.workers[0], baseline is not None)
    scaled = {w: start([k for k in SCALED if k in args.targets and k != "upstream"], w, False)
              for w in args.workers[1:]}
    return main, scaled


def plan(args: argparse.Namespace, main: list[Server], scaled: dict[int, list[Server]]) -> list[Job]:
    """The runs of a round: throughput of every target in every scenario, then latency, then workers."""
    headline = SCENARIOS[args.headline]
    jobs = [Job("throughput", SCENARIOS[key], server, args.connections) for key in args.scenarios for server in main]
    jobs += [Job("latency", headline, server, connections) for connections in args.latency
             for server in main if server.key in SCALED and not server.baseline]
    jobs += [Job("workers", headline, server, args.connections) for servers in scaled.values() for server in servers]
    return jobs


def measure(job: Job, args: argparse.Namespace, wrk: str, tokens: dict[str, Path], redis: RedisProcess,
            seconds: int) -> Result:
    """One wrk run, with the server's CPU per request and, for a metered gateway, Redis's."""
    assert redis.process is not None
    commands = report.redis_commands(redis.url) if job.server.metered else 0
    cpu, redis_cpu = cpu_seconds(job.server.process.pid), cpu_seconds(redis.process.pid)
    result = run_wrk(wrk, job.server, job.scenario, tokens[job.scenario.key], seconds=seconds,
                     connections=job.connections, threads=args.threads, what=job.what)
    result.cpu_us = (cpu_seconds(job.server.process.pid) - cpu) / result.requests * 1e6
    if job.server.metered:
        result.redis_commands = (report.redis_commands(redis.url) - commands) / result.requests
        result.redis_cpu_us = (cpu_seconds(redis.process.pid) - redis_cpu) / result.requests * 1e6
    return result


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    binaries = {"nginx": require("nginx", "nginx-light"), "wrk": require("wrk", "wrk")}
    if "haproxy" in args.targets:
        binaries["haproxy"] = require("haproxy", "haproxy")
    check_source(None)
    baseline: Path | None = None
    if args.baseline_tree is not None:
        baseline = args.baseline_tree = check_source(args.baseline_tree)

    workdir = Path(tempfile.mkdtemp(prefix="cosmos-bench-"))
    os.chmod(workdir, 0o755)  # nginx workers run as nobody
    started: list[Server] = []
    redis = RedisProcess().start()
    try:
        main_servers, scaled = start_servers(args, workdir, redis.url, baseline, binaries, started)
        tokens = {key: write_tokens(workdir, SCENARIOS[key], args.tenants) for key in args.scenarios}
        jobs = plan(args, main_servers, scaled)
        results: dict[Job, list[Result]] = {job: [] for job in jobs}
        firsts = {(job.server, job.scenario.key): job for job in jobs}.values()
        for job in firsts:  # each answers 2xx, and refuses bad tokens if it checks them
            probe(job.server, job.scenario, args.tenants, job.what)
        for job in firsts:  # warm-up: caches, pools, and the tenants' first requests
            measure(job, args, binaries["wrk"], tokens, redis, min(WARM_UP_SECONDS, args.seconds))
        for round_no in range(args.rounds):
            order = jobs if round_no % 2 == 0 else jobs[::-1]  # so (c') runs before (c) every other round
            for i, job in enumerate(order, 1):
                result = measure(job, args, binaries["wrk"], tokens, redis, args.seconds)
                results[job].append(result)
                print(f"round {round_no + 1}/{args.rounds} [{i}/{len(jobs)}] {job.what}: {result.rps:,.0f} req/s, "
                      f"p50 {result.p50_us:,.0f} µs, p99 {result.p99_us:,.0f} µs, "
                      f"{result.cpu_us:.0f} µs CPU/request", file=sys.stderr)
        versions = {name: version(name, path) for name, path in binaries.items()}
        report.print_report(results, args, versions)
    except BenchFailure as exc:
        sys.exit(f"bench: FAILED: {exc}")
    finally:
        stop([server.process for server in started])
        redis.close()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
