"""The servers `make bench` measures: their configurations, processes and CPU time.

Every target listens on 127.0.0.1 and proxies to one nginx upstream that answers 200 with a small JSON
body to every method and path (a static file would answer 405 to a POST):

- nginx as a plain reverse proxy (keep-alive pool to the upstream): the ceiling;
- HAProxy (Debian's 2.6) doing the closest job to the gateway without plugins: HS256 JWT verification
  (alg, signature, exp against date(), iss, aud) and a per-tenant stick table (tenant from the `org_id`
  claim, tracked with track-sc0, a request-rate limit that is never reached);
- cosmos-gateway with JWT only, with metering and quotas, and the latter with its access log on
  (JSON lines on stdout, sent to a file).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from gateway.cli.devservices import DevServiceError, free_port, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
SECRET = "bench-only-hs256-secret-0123456789abcdef012345"
ISSUER = "https://bench/"
AUDIENCE = "cosmosbuilder-api"
PACKAGES = ("gateway", "quota", "metering", "billing_sync")

# The upstream's answers: the chain list (73 bytes, as the earlier benchmarks), one chain, a deployment.
CHAIN_LIST = '{"chains":[{"id":"chain-1","name":"demo","status":"running"}],"total":1}'
CHAIN = '{"id":"chain-1","name":"demo","status":"running","nodes":4,"version":"1.4.2"}'
DEPLOYMENT = '{"id":"dep-1","chain":"chain-1","status":"queued"}'

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
    default_type application/json;
    location = /api/chains {{ return 200 '{chain_list}'; }}
    location ~ ^/api/chains/[^/]+/deployments$ {{ return 200 '{deployment}'; }}
    location / {{ return 200 '{chain}'; }}
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
# Converters and fetches as documented for HAProxy 2.6 (configuration.txt: http_auth_bearer, jwt_header_query,
# jwt_verify, jwt_payload_query, date, sub, track-sc0, sc_http_req_rate). jwt_verify checks the signature
# only, so the claims are checked one by one; a missing claim fails its fetch and so its rule.
HAPROXY_CFG = """
global
  nbthread {threads}
  maxconn 4096

defaults
  mode http
  option http-keep-alive
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  timeout http-keep-alive 60s

backend tenants
  stick-table type string len 64 size 100k expire 10m store http_req_rate(1s)

frontend gateway
  bind 127.0.0.1:{port}
  http-request set-var(txn.bearer) http_auth_bearer
  http-request set-var(txn.alg) var(txn.bearer),jwt_header_query('$.alg')
  http-request deny deny_status 401 unless {{ var(txn.alg) -m str HS256 }}
  http-request deny deny_status 401 unless {{ var(txn.bearer),jwt_verify(txn.alg,"{secret}") -m int 1 }}
  http-request set-var(txn.now) date()
  http-request set-var(txn.exp) var(txn.bearer),jwt_payload_query('$.exp','int')
  http-request deny deny_status 401 unless {{ var(txn.exp),sub(txn.now) -m int gt 0 }}
  http-request deny deny_status 401 unless {{ var(txn.bearer),jwt_payload_query('$.iss') -m str {issuer} }}
  http-request deny deny_status 401 unless {{ var(txn.bearer),jwt_payload_query('$.aud') -m str {audience} }}
  http-request set-var(txn.tenant) var(txn.bearer),jwt_payload_query('$.org_id')
  http-request deny deny_status 403 unless {{ var(txn.tenant) -m found }}
  http-request track-sc0 var(txn.tenant) table tenants
  http-request deny deny_status 429 if {{ sc_http_req_rate(0) gt 10000000 }}
  http-request set-header X-Cosmos-Tenant %[var(txn.tenant)]
  option forwardfor
  default_backend upstream

backend upstream
  http-reuse always
  server api 127.0.0.1:{upstream}
"""

UNREACHED = 10**15
# JWT only: nothing metered (no meters, plans without limits), so no Redis call per request.
AUTH_ONLY: dict[str, object] = {
    "meters": {}, "plans": {p: {"quotas": {}} for p in ("starter", "professional", "enterprise", "sovereign")},
}
# Every default meter (api_calls, chain_deployments, bandwidth_bytes, and the gauges chains and storage_gb
# with the catalog's guard on chain creation) with a quota, and a rate limit: limits that are never reached.
METERED: dict[str, object] = {
    "plans": {"starter": {
        "rate": {"per_second": 10_000_000, "burst": 10_000_000},
        "quotas": {"api_calls": {"limit": UNREACHED}, "chain_deployments": {"limit": UNREACHED},
                   "bandwidth_bytes": {"limit": UNREACHED},
                   "chains": {"limit": 10**9, "guards": {"method": "POST", "path": "/api/chains"}},
                   "storage_gb": {"limit": 10**9}},
    }},
}


class BenchFailure(Exception):
    """A target did not start, answered something else than 2xx, or wrk saw socket errors: the run is void."""


@dataclass(eq=False)  # hashed by identity: a key of the report's tables
class Server:
    """A started target: its URL, its process (workers are its children) and what it checks."""

    key: str
    label: str
    port: int
    process: subprocess.Popen[bytes]
    authenticates: bool = False  # refuses requests without a valid token
    metered: bool = False  # counts in Redis
    workers: int = 1  # processes; HAProxy: threads
    baseline: bool = False  # a gateway of --baseline-tree

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def require(binary: str, package: str) -> str:
    path = shutil.which(binary) or (f"/usr/sbin/{binary}" if Path(f"/usr/sbin/{binary}").exists() else None)
    if path is None:
        sys.exit(f"bench: {binary} is not installed (Debian: apt-get install {package})")
    return path


def version(name: str, binary: str) -> str:
    """The name and version number, e.g. "nginx 1.22.1", from `binary -v` (nginx and wrk print it on stderr)."""
    out = subprocess.run([binary, "-v"], capture_output=True, text=True)
    found = re.search(r"(\d+\.\d+(?:\.\d+)?)", out.stdout + out.stderr)
    return f"{name} {found.group(1) if found else '?'}"


def _listening(process: subprocess.Popen[bytes], port: int, log: Path, timeout: float = 10) -> None:
    """Wait until `process` listens on `port`; if it does not, stop it and say why, with its log's tail."""
    try:
        wait_for_port(port, timeout=timeout, process=process)
    except DevServiceError as exc:
        stop([process])
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        raise BenchFailure(f"{log.stem} did not start: {exc}\n{tail}") from None


def start_nginx(nginx: str, workdir: Path, name: str, body: str, workers: int, port: int) -> subprocess.Popen[bytes]:
    conf = workdir / f"nginx-{name}.conf"
    conf.write_text(NGINX_CONF.format(workers=workers, dir=workdir, name=name, body=body))
    process = subprocess.Popen([nginx, "-c", str(conf), "-p", str(workdir)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _listening(process, port, workdir / f"nginx-{name}-error.log")
    return process


def start_upstream(nginx: str, workdir: Path, workers: int) -> Server:
    port = free_port()
    body = UPSTREAM_SERVER.format(port=port, chain_list=CHAIN_LIST, chain=CHAIN, deployment=DEPLOYMENT)
    process = start_nginx(nginx, workdir, "upstream", body, workers, port)
    return Server("upstream", "(a) nginx upstream (return 200)", port, process, workers=workers)


def start_nginx_proxy(nginx: str, workdir: Path, upstream: int, workers: int) -> Server:
    port = free_port()
    process = start_nginx(nginx, workdir, f"proxy-{workers}", PROXY_SERVER.format(port=port, upstream=upstream),
                          workers, port)
    return Server("nginx", "(b) nginx reverse proxy", port, process, workers=workers)


def start_haproxy(haproxy: str, workdir: Path, upstream: int, threads: int) -> Server:
    port = free_port()
    cfg = workdir / f"haproxy-{threads}.cfg"
    cfg.write_text(HAPROXY_CFG.format(threads=threads, port=port, upstream=upstream, secret=SECRET,
                                      issuer=ISSUER, audience=AUDIENCE))
    check = subprocess.run([haproxy, "-c", "-q", "-f", str(cfg)], capture_output=True, text=True)
    if check.returncode != 0:
        raise BenchFailure(f"HAProxy refuses {cfg}:\n{check.stdout}{check.stderr}")
    # -db: stay in the foreground, no daemon (never the system service).
    log = workdir / f"haproxy-{threads}.log"
    with open(log, "wb") as stderr:  # the child keeps its own copy
        process = subprocess.Popen([haproxy, "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL, stderr=stderr)
    _listening(process, port, log)
    return Server("haproxy", "(h) HAProxy, HS256 JWT + per-tenant stick table", port, process,
                  authenticates=True, workers=threads)


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


@dataclass(frozen=True)
class GatewaySpec:
    key: str  # the --targets name
    label: str
    metered: bool
    access_log: bool = False
    baseline: bool = False  # runs from --baseline-tree


GATEWAYS = (
    GatewaySpec("auth", "(c) cosmos-gateway, JWT only", metered=False),
    GatewaySpec("metered", "(d) cosmos-gateway, JWT + metering and quotas", metered=True),
    GatewaySpec("metered-log", "(e) cosmos-gateway, (d) + access log to a file", metered=True, access_log=True),
    GatewaySpec("auth", "(c') baseline, JWT only", metered=False, baseline=True),
    GatewaySpec("metered", "(d') baseline, JWT + metering and quotas", metered=True, baseline=True),
)


def start_gateway(spec: GatewaySpec, workdir: Path, upstream: int, redis_url: str, workers: int,
                  tree: Path | None, *, wrap: Sequence[str] = (), start_timeout: float = 30) -> Server:
    """A gateway target; `wrap` prefixes its command (bench/instructions.py runs it under valgrind)."""
    port, admin = free_port(), free_port()
    name = f"{spec.key}{'-baseline' if spec.baseline else ''}-{workers}"
    config = {
        "listen": {"proxy": f"127.0.0.1:{port}", "admin": f"127.0.0.1:{admin}"},
        "upstream": {"url": f"http://127.0.0.1:{upstream}"},
        "redis": {"url": redis_url},
        "database": {"url": f"sqlite+aiosqlite:///{workdir}/bench-{name}.db"},
        "auth": {"algorithms": ["HS256"], "issuer": ISSUER, "audience": AUDIENCE},
        "server": {"access_log": spec.access_log, "workers": workers},
        **(METERED if spec.metered else AUTH_ONLY),
    }
    path = workdir / f"gateway-{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    cwd, env = source_env(tree)
    log = workdir / f"gateway-{name}.log"
    # The access log goes to a file (a pipe nobody reads would block the gateway once full).
    access_log = workdir / f"gateway-{name}-access.log" if spec.access_log else Path(os.devnull)
    with open(access_log, "wb") as stdout, open(log, "wb") as stderr:  # the child keeps its own copies
        process = subprocess.Popen([*wrap, sys.executable, "-m", "gateway.cli", "serve", "--config", str(path)],
                                   env=env, cwd=cwd, stdout=stdout, stderr=stderr)
    _listening(process, port, log, timeout=start_timeout)
    return Server(spec.key, spec.label, port, process, authenticates=True, metered=spec.metered, workers=workers,
                  baseline=spec.baseline)


def stop(processes: list[subprocess.Popen[bytes]]) -> None:
    """Stop what the bench started (each by its own process), the last started first."""
    for process in reversed(processes):
        if process.poll() is None:
            process.terminate()
    for process in reversed(processes):
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) and its children (workers), from /proc."""
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
