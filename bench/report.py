"""The report of `make bench`: Markdown tables of medians over the rounds, and the ratios issue 12 asks for.

A ratio is one of medians; where two targets ran in the same rounds, the spread of their per-round ratios
is shown too, since on a shared VM that spread is the noise.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from bench.scenarios import SCENARIOS, Result
from bench.targets import Server

if TYPE_CHECKING:
    from bench.run import Job

Results = dict["Job", list[Result]]


def workers(server: Server) -> str:
    if server.key == "haproxy":
        return f"nbthread {server.workers}"
    return f"{server.workers} worker{'s' if server.workers > 1 else ''}"


def tag(server: Server) -> str:
    """A target's short name: "(d')" of "(d') baseline, JWT + metering and quotas"."""
    return server.label.split(" ", 1)[0]


def redis_commands(url: str) -> int:
    """Commands Redis has executed so far (the sum of INFO commandstats calls)."""
    import redis as redis_sync

    client = redis_sync.Redis.from_url(url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return sum(int(v["calls"]) for k, v in stats.items() if k.startswith("cmdstat_") and k != "cmdstat_info")


def _median(results: Sequence[Result], field: Callable[[Result], float | None]) -> float:
    values = [v for r in results if (v := field(r)) is not None]
    return statistics.median(values) if values else float("nan")


class Table:
    """The medians of one run's jobs, and ratios between them."""

    def __init__(self, results: Results) -> None:
        self.results = results

    def find(self, section: str, scenario: str, key: str, *, connections: int | None = None,
             workers: int | None = None, baseline: bool = False) -> Job | None:
        for job in self.results:
            if (job.section == section and job.scenario.key == scenario and job.server.key == key
                    and job.server.baseline == baseline and connections in (None, job.connections)
                    and workers in (None, job.server.workers)):
                return job
        return None

    def rps(self, job: Job) -> float:
        return _median(self.results[job], lambda r: r.rps)

    def p50(self, job: Job) -> float:
        return _median(self.results[job], lambda r: r.p50_us)

    def p99(self, job: Job) -> float:
        return _median(self.results[job], lambda r: r.p99_us)

    def cpu(self, job: Job) -> float:
        return _median(self.results[job], lambda r: r.cpu_us)

    def ratio(self, a: Job, b: Job) -> str:
        """a/b in requests/s: the ratio of medians, and the range of the per-round ratios."""
        rounds = [x.rps / y.rps for x, y in zip(self.results[a], self.results[b], strict=True)]
        spread = f" (rounds {min(rounds):.2f}–{max(rounds):.2f}×)" if len(rounds) > 1 else ""
        return f"**{self.rps(a) / self.rps(b):.2f}×**{spread}"


def header(args: argparse.Namespace, versions: dict[str, str]) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    tools = " · ".join(versions.values())
    rounds = f"{args.rounds} round{'s' if args.rounds > 1 else ''}"
    return (f"{dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z} · {os.cpu_count()} cores ({cpu}) · "
            f"{platform.system()} {platform.release()} · Python {platform.python_version()} · {tools}\n\n"
            f"wrk -t{args.threads} -d{args.seconds}s, {rounds}, every run of a round right after the others "
            f"(odd rounds reversed); medians over the rounds. The server CPU is user + system time of the "
            f"target's processes (from /proc) per request; wrk and every target share the cores.")


def print_report(results: Results, args: argparse.Namespace, versions: dict[str, str]) -> None:
    table = Table(results)
    print("\n" + header(args, versions))
    if args.baseline_tree is not None:
        print(f"\n(c), (d) run from this checkout; (c'), (d') from {args.baseline_tree}.")
    for key in args.scenarios:
        _throughput(table, args, key)
    if args.latency:
        _latency(table, args)
    if len(args.workers) > 1:
        _workers(table, args)
    _targets(table, args)


def _title(key: str, args: argparse.Namespace) -> str:
    return SCENARIOS[key].title.format(tenants=args.tenants)


def _throughput(table: Table, args: argparse.Namespace, key: str) -> None:
    jobs = [job for job in table.results if job.section == "throughput" and job.scenario.key == key]
    nginx = table.find("throughput", key, "nginx")
    haproxy = table.find("throughput", key, "haproxy")
    print(f"\n### Scenario `{key}`: {_title(key, args)} (wrk -c{args.connections}, "
          f"{args.workers[0]} worker{'s' if args.workers[0] > 1 else ''} each)\n")
    print("| target | requests/s | p50 µs | p99 µs | req/s vs nginx proxy | req/s vs HAProxy | p99 vs HAProxy "
          "| server CPU µs/request |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for job in jobs:
        vs_nginx = f"{table.rps(job) / table.rps(nginx):.2f}×" if nginx else "–"
        vs_haproxy = f"{table.rps(job) / table.rps(haproxy):.2f}×" if haproxy else "–"
        p99_haproxy = f"{table.p99(job) / table.p99(haproxy):.2f}×" if haproxy else "–"
        print(f"| {job.server.label} | {table.rps(job):,.0f} | {table.p50(job):,.0f} | {table.p99(job):,.0f} "
              f"| {vs_nginx} | {vs_haproxy} | {p99_haproxy} | {table.cpu(job):.0f} |")
    lines: list[str] = []
    auth, metered = table.find("throughput", key, "auth"), table.find("throughput", key, "metered")
    logged = table.find("throughput", key, "metered-log")
    for gateway in (metered, auth):
        for peer, name in ((haproxy, "HAProxy"), (nginx, "nginx proxy")):
            if gateway and peer:
                lines.append(f"gateway {tag(gateway.server)} / {name} {tag(peer.server)}: {table.ratio(gateway, peer)}"
                             + (f", p99 {table.p99(gateway) / table.p99(peer):.2f}×" if peer is haproxy else ""))
    if auth and metered:
        lines.append(f"metering and quotas: (d)/(c) {table.ratio(metered, auth)}, they cost "
                     f"{(1 - table.rps(metered) / table.rps(auth)) * 100:.0f} % of the throughput; gateway CPU "
                     f"per request (c) → (d): {table.cpu(auth):.0f} → {table.cpu(metered):.0f} µs")
    if metered and logged:
        lines.append(f"access log on: (e)/(d) {table.ratio(logged, metered)}, it costs "
                     f"{(1 - table.rps(logged) / table.rps(metered)) * 100:.0f} %; gateway CPU per request "
                     f"{table.cpu(metered):.0f} → {table.cpu(logged):.0f} µs")
    for name in ("auth", "metered"):
        now = table.find("throughput", key, name)
        before = table.find("throughput", key, name, baseline=True)
        if now and before:
            lines.append(f"before/after: {tag(now.server)}/{tag(before.server)} {table.ratio(now, before)}, p99 "
                         f"{table.p99(now) / table.p99(before):.2f}×; gateway CPU per request {table.cpu(before):.0f} "
                         f"→ {table.cpu(now):.0f} µs")
    for job in jobs:
        if job.server.metered:
            rs = table.results[job]
            lines.append(f"Redis per request of {tag(job.server)}: "
                         f"{_median(rs, lambda r: r.redis_commands):.2f} commands (INFO commandstats, the "
                         f"scripts' inner calls included), {_median(rs, lambda r: r.redis_cpu_us):.1f} µs CPU")
    if lines:
        print("\n" + "\n".join(f"- {line}" for line in lines))


def _latency(table: Table, args: argparse.Namespace) -> None:
    key = args.headline
    print(f"\n### Latency added, scenario `{key}` ({args.workers[0]} worker{'s' if args.workers[0] > 1 else ''} "
          "each; added = p50 − p50 of the nginx proxy at the same connections)\n")
    print("| target | connections | requests/s | p50 µs | p99 µs | p50 added µs | p99 vs nginx proxy |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for connections in args.latency:
        nginx = table.find("latency", key, "nginx", connections=connections)
        for job in (j for j in table.results if j.section == "latency" and j.connections == connections):
            added = f"{table.p50(job) - table.p50(nginx):,.0f}" if nginx else "–"
            p99 = f"{table.p99(job) / table.p99(nginx):.2f}×" if nginx else "–"
            print(f"| {job.server.label} | {connections} | {table.rps(job):,.0f} | {table.p50(job):,.0f} "
                  f"| {table.p99(job):,.0f} | {added} | {p99} |")


def _workers(table: Table, args: argparse.Namespace) -> None:
    key = args.headline
    counts = args.workers
    print(f"\n### Workers, scenario `{key}` (wrk -c{args.connections}; HAProxy: threads)\n")
    print("| target | " + " | ".join(f"req/s at {n}" for n in counts) + " | "
          + " | ".join(f"{n}/{counts[0]}" for n in counts[1:]) + f" | CPU µs/request at {counts[-1]} |")
    print("|---|" + "---:|" * (2 * len(counts)))
    for name in ("nginx", "haproxy", "metered"):
        found = [table.find("throughput" if n == counts[0] else "workers", key, name, workers=n) for n in counts]
        jobs = [job for job in found if job is not None]
        if len(jobs) < len(counts):
            continue
        print(f"| {jobs[0].server.label} | " + " | ".join(f"{table.rps(j):,.0f}" for j in jobs) + " | "
              + " | ".join(table.ratio(j, jobs[0]) for j in jobs[1:]) + f" | {table.cpu(jobs[-1]):.0f} |")
    lines = []
    for n in counts[1:]:
        gateway = table.find("workers", key, "metered", workers=n)
        for name, label in (("haproxy", "HAProxy"), ("nginx", "nginx proxy")):
            peer = table.find("workers", key, name, workers=n)
            if gateway and peer:
                lines.append(f"- at {n}: gateway (d) / {label} {table.ratio(gateway, peer)}")
    if lines:
        print("\n" + "\n".join(lines))


def _targets(table: Table, args: argparse.Namespace) -> None:
    """Issue 12's targets, each from the runs that measure it (a row only when they ran)."""
    rows: list[tuple[str, str, str, bool]] = []

    def add(what: str, value: float, text: str, goal: str, met: bool) -> None:
        if value == value:  # not NaN
            rows.append((what, text, goal, met))

    for key, goal in (("tenants", 0.25), ("single", 0.35)):
        gateway, haproxy = table.find("throughput", key, "metered"), table.find("throughput", key, "haproxy")
        if gateway and haproxy:
            value = table.rps(gateway) / table.rps(haproxy)
            add(f"`{key}`: req/s (d) / HAProxy", value, f"{value:.2f}×", f"≥ {goal}×", value >= goal)
            if key == "tenants":
                value = table.p99(gateway) / table.p99(haproxy)
                add("`tenants`: p99 (d) / HAProxy", value, f"{value:.2f}×", "≤ 3×", value <= 3)
    gateway, nginx = (table.find("latency", args.headline, k, connections=1) for k in ("metered", "nginx"))
    if gateway and nginx:
        value = table.p50(gateway) - table.p50(nginx)
        add(f"`{args.headline}`, 1 connection: p50 (d) − p50 nginx proxy", value, f"{value:,.0f} µs", "≤ 250 µs",
            value <= 250)
    if 1 in args.workers and 2 in args.workers:
        one = table.find("throughput" if args.workers[0] == 1 else "workers", args.headline, "metered", workers=1)
        two = table.find("workers", args.headline, "metered", workers=2)
        if one and two:
            value = table.rps(two) / table.rps(one)
            add(f"`{args.headline}`: (d) 2 workers / 1 worker", value, f"{value:.2f}×", "≥ 1.6×", value >= 1.6)
    auth, metered = (table.find("throughput", "tenants", k) for k in ("auth", "metered"))
    if auth and metered:
        value = 1 - table.rps(metered) / table.rps(auth)
        add("`tenants`: metering and quotas, 1 − (d)/(c)", value, f"{value * 100:.0f} %", "≤ 15 %", value <= 0.15)
    metered, logged = (table.find("throughput", args.headline, k) for k in ("metered", "metered-log"))
    if metered and logged:
        value = 1 - table.rps(logged) / table.rps(metered)
        add(f"`{args.headline}`: access log on, 1 − (e)/(d)", value, f"{value * 100:.0f} %", "≤ 10 %", value <= 0.10)
    if rows:
        print("\n### Issue 12's targets\n")
        print("| measure | this run | target | met |")
        print("|---|---:|---:|---|")
        for what, text, goal, met in rows:
            print(f"| {what} | {text} | {goal} | {'yes' if met else 'no'} |")
