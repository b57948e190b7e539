"""`make bench`: wrk against nginx (static upstream), nginx as a reverse proxy, and cosmos-gateway.

All targets run on this machine in one run, alternately (round after round), so a busy moment
hurts them alike. Reported: requests/s, p50 and p99 (median over rounds) and the ratios of the
gateway to nginx's reverse proxy. Needs nginx and wrk (Debian: apt-get install nginx-light wrk).

Before/after in one run: `--baseline-tree DIR` (`make bench BASELINE=DIR`) also runs the gateway of
another source tree, e.g. the commit a change started from (`git archive REV | tar -x -C DIR`), as (c')
and (d'), each right next to (c) and (d) in every round, and reports (c)/(c') and (d)/(d'). Its
processes run with cwd and PYTHONPATH set to DIR; which copy they import is checked before the run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from gateway.cli.devservices import RedisProcess, free_port, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
SECRET = "bench-only-hs256-secret-0123456789abcdef012345"
BODY = b'{"chains":[{"id":"chain-1","name":"demo","status":"running"}],"total":1}\n'

NGINX_CONF = """
worker_processes {workers};
daemon off;
pid {dir}/nginx-{name}.pid;
error_log {dir}/nginx-{name}-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body-{name};
  proxy_temp_path {dir}/proxy-{name};
  fastcgi_temp_path {dir}/fcgi-{name};
  uwsgi_temp_path {dir}/uwsgi-{name};
  scgi_temp_path {dir}/scgi-{name};
  keepalive_requests 100000;
  {body}
}}
"""
UPSTREAM_SERVER = """
  server {{
    listen 127.0.0.1:{port} reuseport;
    location / {{ default_type application/json; root {dir}/www; try_files /chains.json =404; }}
  }}
"""
PROXY_SERVER = """
  upstream backend {{ server 127.0.0.1:{upstream}; keepalive 256; }}
  server {{
    listen 127.0.0.1:{port} reuseport;
    location / {{
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
    }}
  }}
"""


@dataclass
class Result:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int = 0
    cpu_us: float = 0.0  # CPU time (user + system) of the server's processes per request


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its children (workers), from /proc."""
    total = 0.0
    pids = [pid]
    while pids:
        current = pids.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime
            pids += [int(c) for c in Path(f"/proc/{current}/task/{current}/children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
    return total


AUTH_TARGET = "(c) cosmos-gateway, JWT on"
METERED_TARGET = "(d) cosmos-gateway, JWT + metering and quotas"
BASELINE_AUTH = "(c') baseline, JWT on"
BASELINE_METERED = "(d') baseline, JWT + metering"
METERED_TARGETS = (METERED_TARGET, BASELINE_METERED)
PAIRS = ((AUTH_TARGET, BASELINE_AUTH), (METERED_TARGET, BASELINE_METERED))  # (now, before)
PACKAGES = ("gateway", "quota", "metering", "billing_sync")
# (c): the proxy alone, nothing metered (no meters, plans without limits: no Redis call per request).
AUTH_ONLY: dict[str, object] = {
    "meters": {}, "plans": {p: {"quotas": {}} for p in ("starter", "professional", "enterprise", "sovereign")},
}
# (d): the default meters (api_calls, chain_deployments, bandwidth_bytes, gauges), a rate limit and a
# quota checked on every request, limits high enough that wrk is never refused.
METERED: dict[str, object] = {
    "plans": {"starter": {"rate": {"per_second": 10_000_000, "burst": 10_000_000},
                          "quotas": {"api_calls": {"limit": 10**15}, "chain_deployments": {"limit": 100}}}},
}


def redis_commands(url: str) -> int:
    """Commands Redis has executed so far (the sum of INFO commandstats calls)."""
    import redis as redis_sync

    client = redis_sync.Redis.from_url(url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return sum(int(v["calls"]) for k, v in stats.items() if k.startswith("cmdstat_") and k != "cmdstat_info")


def require(binary: str) -> str:
    path = shutil.which(binary) or (f"/usr/sbin/{binary}" if Path(f"/usr/sbin/{binary}").exists() else None)
    if path is None:
        sys.exit(f"bench: {binary} is not installed (Debian: apt-get install nginx-light wrk)")
    return path


def start_nginx(nginx: str, workdir: Path, name: str, body: str, workers: int) -> subprocess.Popen[bytes]:
    conf = workdir / f"nginx-{name}.conf"
    conf.write_text(NGINX_CONF.format(workers=workers, dir=workdir, name=name, body=body))
    return subprocess.Popen([nginx, "-c", str(conf), "-p", str(workdir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def source_env(tree: Path | None) -> tuple[Path, dict[str, str]]:
    """The cwd and environment of a gateway process running from `tree` (None: this checkout)."""
    env = {**os.environ, "GATEWAY_JWT_HS256_SECRET": SECRET}
    if tree is None:
        return ROOT, env
    # The editable install's finder is appended to sys.meta_path, so sys.path (cwd, PYTHONPATH) wins;
    # check_source() confirms it rather than trusting that.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(tree), os.environ.get("PYTHONPATH"))))
    return tree, env


def check_source(tree: Path | None) -> Path:
    """Where a gateway process started with source_env(tree) imports the packages from; exit if mixed."""
    cwd, env = source_env(tree)
    expected = (tree or ROOT).resolve()
    code = f"import importlib; [print(importlib.import_module(p).__file__) for p in {PACKAGES!r}]"
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True)
    files = [Path(line).resolve() for line in out.stdout.split()]
    if out.returncode != 0 or len(files) != len(PACKAGES) or any(not f.is_relative_to(expected) for f in files):
        found = ", ".join(map(str, files)) or out.stderr.strip()
        sys.exit(f"bench: a gateway started from {expected} would import {found}")
    return expected


def start_gateway(workdir: Path, name: str, upstream_port: int, redis_url: str, workers: int,
                  extra: dict[str, object] | None = None,
                  tree: Path | None = None) -> tuple[subprocess.Popen[bytes], int]:
    port, admin = free_port(), free_port()
    config = {
        "listen": {"proxy": f"127.0.0.1:{port}", "admin": f"127.0.0.1:{admin}"},
        "upstream": {"url": f"http://127.0.0.1:{upstream_port}"},
        "redis": {"url": redis_url},
        "database": {"url": f"sqlite+aiosqlite:///{workdir}/bench-{name}.db"},
        "auth": {"algorithms": ["HS256"], "issuer": "https://bench/", "audience": "cosmosbuilder-api"},
        "server": {"access_log": False, "workers": workers},
        **(extra or {}),
    }
    path = workdir / f"gateway-{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    cwd, env = source_env(tree)
    process = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--config", str(path)],
                               env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                               stderr=open(workdir / f"gateway-{name}.log", "wb"))
    wait_for_port(port, timeout=30, process=process)
    return process, port


def bench_token() -> str:
    from gateway.auth.mint import mint_token

    return mint_token(SECRET, tenant="bench-tenant", plan=None, ttl=86_400, scope=None,
                      issuer="https://bench/", audience="cosmosbuilder-api", subject="bench")


def run_wrk(wrk: str, url: str, *, seconds: int, connections: int, threads: int,
            headers: dict[str, str]) -> Result:
    args = [wrk, f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--latency", url]
    for key, value in headers.items():
        args += ["-H", f"{key}: {value}"]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        print(f"  warning from wrk for {url}:\n{out}", file=sys.stderr)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = re.search(r"(\d+) requests in", out)
    return Result(rps, _latency(out, "50%"), _latency(out, "99%"), int(total.group(1)) if total else 0)


def _latency(out: str, pct: str) -> float:
    match = re.search(rf"{re.escape(pct)}\s+([\d.]+)(us|ms|s)\b", out)
    assert match, out
    value, unit = float(match.group(1)), match.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


def round_order(names: list[str], round_no: int) -> list[str]:
    """The targets of a round: on odd rounds each baseline runs just before its counterpart, not after."""
    order = list(names)
    if round_no % 2:
        for current, baseline in PAIRS:
            if current in order and baseline in order:
                i, j = order.index(current), order.index(baseline)
                order[i], order[j] = order[j], order[i]
    return order


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=8, help="wrk duration per target and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workers", type=int, default=1, help="processes for nginx proxy and gateway alike")
    parser.add_argument("--baseline-tree", type=Path, metavar="DIR",
                        help="also run the gateway of this source tree as (c') and (d'): before/after in one run")
    args = parser.parse_args()
    nginx, wrk = require("nginx"), require("wrk")
    check_source(None)
    baseline: Path | None = None
    if args.baseline_tree is not None:
        baseline = args.baseline_tree = check_source(args.baseline_tree)

    workdir = Path(tempfile.mkdtemp(prefix="cosmos-bench-"))
    os.chmod(workdir, 0o755)
    (workdir / "www").mkdir()
    (workdir / "www" / "chains.json").write_bytes(BODY)
    processes: list[subprocess.Popen[bytes]] = []
    redis = RedisProcess().start()
    try:
        upstream_port, proxy_port = free_port(), free_port()
        processes.append(start_nginx(nginx, workdir, "upstream",
                                     UPSTREAM_SERVER.format(port=upstream_port, dir=workdir), 1))
        processes.append(start_nginx(nginx, workdir, "proxy",
                                     PROXY_SERVER.format(port=proxy_port, upstream=upstream_port), args.workers))
        wait_for_port(upstream_port)
        wait_for_port(proxy_port)
        targets: dict[str, tuple[str, dict[str, str]]] = {
            "(a) nginx static upstream": (f"http://127.0.0.1:{upstream_port}/api/chains", {}),
            "(b) nginx reverse proxy": (f"http://127.0.0.1:{proxy_port}/api/chains", {}),
        }
        servers = {name: process.pid for name, process in zip(targets, processes, strict=True)}
        auth = {"Authorization": f"Bearer {bench_token()}"}
        gateways = [(AUTH_TARGET, "auth", AUTH_ONLY, None), (BASELINE_AUTH, "baseline-auth", AUTH_ONLY, baseline),
                    (METERED_TARGET, "metered", METERED, None),
                    (BASELINE_METERED, "baseline-metered", METERED, baseline)]
        for name, label, extra, tree in gateways:
            if tree is None and name in (BASELINE_AUTH, BASELINE_METERED):
                continue
            gateway, port = start_gateway(workdir, label, upstream_port, redis.url, args.workers, extra, tree)
            processes.append(gateway)
            targets[name] = (f"http://127.0.0.1:{port}/api/chains", auth)
            servers[name] = gateway.pid
        assert redis.process is not None
        results: dict[str, list[Result]] = {name: [] for name in targets}
        for url, headers in targets.values():  # warm-up
            run_wrk(wrk, url, seconds=1, connections=args.connections, threads=args.threads, headers=headers)
        # per metered target and round: Redis commands and Redis CPU seconds per request
        redis_per_request: dict[str, list[tuple[float, float]]] = {n: [] for n in METERED_TARGETS if n in targets}
        for round_no in range(args.rounds):
            for name in round_order(list(targets), round_no):
                url, headers = targets[name]
                metered = name in METERED_TARGETS
                before = redis_commands(redis.url) if metered else 0
                cpu_before, redis_before = cpu_seconds(servers[name]), cpu_seconds(redis.process.pid)
                result = run_wrk(wrk, url, seconds=args.seconds, connections=args.connections,
                                 threads=args.threads, headers=headers)
                if result.requests:
                    result.cpu_us = (cpu_seconds(servers[name]) - cpu_before) / result.requests * 1e6
                if metered and result.requests:
                    redis_per_request[name].append(
                        ((redis_commands(redis.url) - before) / result.requests,
                         (cpu_seconds(redis.process.pid) - redis_before) / result.requests))
                results[name].append(result)
                print(f"round {round_no + 1} {name}: {result.rps:,.0f} req/s, p50 {result.p50_ms:.2f} ms, "
                      f"p99 {result.p99_ms:.2f} ms, {result.cpu_us:.0f} µs CPU/request", file=sys.stderr)
        report(results, args)
        measured = {name: samples for name, samples in redis_per_request.items() if samples}
        if measured:
            print()
        for name, samples in measured.items():
            of = "" if name == METERED_TARGET else f" of {tag(name)}"
            print(f"Redis per metered request{of} (medians over rounds): "
                  f"{statistics.median(c for c, _ in samples):.2f} commands (INFO commandstats), "
                  f"{statistics.median(cpu for _, cpu in samples) * 1e6:.1f} µs CPU")
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
        redis.close()
        shutil.rmtree(workdir, ignore_errors=True)


def tag(name: str) -> str:
    """A target's short name: "(d')" of "(d') baseline, JWT + metering"."""
    return name.split(" ", 1)[0]


def report(results: dict[str, list[Result]], args: argparse.Namespace) -> None:
    median = {name: Result(statistics.median(r.rps for r in rs), statistics.median(r.p50_ms for r in rs),
                           statistics.median(r.p99_ms for r in rs), cpu_us=statistics.median(r.cpu_us for r in rs))
              for name, rs in results.items()}
    reference = median["(b) nginx reverse proxy"]
    auth_only = median[AUTH_TARGET]
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    print(f"\n{dt.date.today().isoformat()} · {os.cpu_count()} cores ({cpu}) · {platform.system()} "
          f"{platform.release()} · Python {platform.python_version()} · wrk -t{args.threads} "
          f"-c{args.connections} -d{args.seconds}s × {args.rounds} rounds, medians · {args.workers} worker(s)\n")
    if args.baseline_tree is not None:
        print(f"(c), (d) run from {ROOT}; (c'), (d') from {args.baseline_tree}\n")
    print("| target | requests/s | p50 ms | p99 ms | req/s vs (b) | p99 vs (b) | server CPU µs/request |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in median.items():
        print(f"| {name} | {r.rps:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {r.rps / reference.rps:.2f}× "
              f"| {r.p99_ms / reference.p99_ms:.2f}× | {r.cpu_us:.0f} |")
    metered = median.get(METERED_TARGET)
    if metered is not None:
        print(f"\n(d)/(c) requests/s: {metered.rps / auth_only.rps:.2f}× (metering costs "
              f"{(1 - metered.rps / auth_only.rps) * 100:.0f} %); gateway CPU per request (c) → (d): "
              f"{auth_only.cpu_us:.0f} → {metered.cpu_us:.0f} µs ({auth_only.cpu_us / metered.cpu_us:.2f}×)")
    if BASELINE_AUTH in median and BASELINE_METERED in median:
        before_auth, before_metered = median[BASELINE_AUTH], median[BASELINE_METERED]
        print(f"(d')/(c') requests/s: {before_metered.rps / before_auth.rps:.2f}× (the baseline's metering cost)")
    for current, baseline in PAIRS:
        if current in median and baseline in median:
            now, before = median[current], median[baseline]
            # the pair ran next to each other in every round: the spread of its per-round ratios is the noise
            per_round = [a.rps / b.rps for a, b in zip(results[current], results[baseline], strict=True)]
            print(f"{tag(current)}/{tag(baseline)} requests/s: **{now.rps / before.rps:.2f}×** (per round "
                  f"{min(per_round):.2f}–{max(per_round):.2f}×), p99 {now.p99_ms / before.p99_ms:.2f}×; "
                  f"gateway CPU per request {tag(baseline)} → {tag(current)}: {before.cpu_us:.0f} → "
                  f"{now.cpu_us:.0f} µs")


if __name__ == "__main__":
    main()
