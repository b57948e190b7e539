"""What `make bench` sends: the scenarios, their tokens, the wrk runs and the checks of every answer.

The wrk scripts are in bench/lua/; the tokens are minted here into a Lua file the script reads in init().
A run fails (BenchFailure) on any socket error or any response with a status above 399 (wrk counts those);
before the first run every target is probed once per request kind of the scenario, which must answer 2xx,
and a target that checks tokens must refuse a missing, forged or expired one.
"""

from __future__ import annotations

import http.client
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from bench.targets import AUDIENCE, ISSUER, SECRET, BenchFailure, Server
from gateway.auth.mint import mint_token

LUA = Path(__file__).resolve().parent / "lua"
SEED = 12345  # the tenants script's draws: the same request sequence in every run
TOKEN_TTL = 86_400


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    script: Path
    probes: tuple[tuple[str, str], ...]  # (method, path): each must answer 2xx

    def tenants(self, count: int) -> list[str]:
        return ["bench-tenant"] if self.key == "single" else [f"tenant-{i:04d}" for i in range(1, count + 1)]


SINGLE = Scenario("single", "one token, `GET /api/chains`", LUA / "single.lua", (("GET", "/api/chains"),))
TENANTS = Scenario(
    "tenants",
    "{tenants:,} tenants with their own tokens; 90 % `GET /api/chains/<id>`, 5 % `POST /api/chains/<id>/deployments`, "
    "5 % `GET /api/chains`",
    LUA / "tenants.lua",
    (("GET", "/api/chains/chain-1-1"), ("POST", "/api/chains/chain-1-1/deployments"), ("GET", "/api/chains")),
)
SCENARIOS = {s.key: s for s in (SINGLE, TENANTS)}


def mint(tenant: str, *, secret: str = SECRET, ttl: int = TOKEN_TTL) -> str:
    return mint_token(secret, tenant=tenant, ttl=ttl, issuer=ISSUER, audience=AUDIENCE, subject=f"bench:{tenant}")


def write_tokens(workdir: Path, scenario: Scenario, tenants: int) -> Path:
    """A Lua file returning the scenario's tokens, one per tenant (JWTs need no escaping in a Lua string)."""
    path = workdir / f"tokens-{scenario.key}.lua"
    tokens = [mint(tenant) for tenant in scenario.tenants(tenants)]
    path.write_text("return {\n" + "".join(f'"{token}",\n' for token in tokens) + "}\n")
    return path


@dataclass
class Result:
    rps: float
    p50_us: float
    p99_us: float
    requests: int
    cpu_us: float = 0.0  # CPU time (user + system) of the target's processes per request
    redis_commands: float | None = None  # per request, metered gateways only
    redis_cpu_us: float | None = None


_RESULT = re.compile(r"^BENCH-RESULT (.*)$", re.MULTILINE)


def run_wrk(wrk: str, server: Server, scenario: Scenario, tokens: Path, *, seconds: int, connections: int,
            threads: int, what: str) -> Result:
    """One wrk run; raises BenchFailure naming `what` on socket errors or non-2xx answers."""
    threads = min(threads, connections)
    args = [wrk, f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "-s", str(scenario.script),
            f"{server.url}/", "--", str(tokens), str(SEED)]
    out = subprocess.run(args, capture_output=True, text=True)
    match = _RESULT.search(out.stdout)
    if out.returncode != 0 or match is None:
        raise BenchFailure(f"{what}: wrk failed (exit {out.returncode}):\n{out.stdout}{out.stderr}")
    fields = {k: float(v) for k, v in (item.split("=") for item in match.group(1).split())}
    requests = int(fields["requests"])
    errors = {k: int(fields[k]) for k in ("connect", "read", "write", "timeout")}
    if fields["status"] or any(errors.values()) or requests == 0:
        raise BenchFailure(
            f"{what}: {int(fields['status']):,} of {requests:,} responses with a status above 399; socket errors: "
            + ", ".join(f"{k} {v:,}" for k, v in errors.items()))
    return Result(requests / (fields["duration_us"] / 1e6), fields["p50_us"], fields["p99_us"], requests)


def probe(server: Server, scenario: Scenario, tenants: int, what: str) -> None:
    """One request of each kind the scenario sends must answer 2xx; a target checking tokens must refuse bad ones."""
    token = mint(scenario.tenants(tenants)[0])
    for method, path in scenario.probes:
        status, body = _request(server, method, path, token)
        if not 200 <= status < 300:
            raise BenchFailure(f"{what}: {method} {path} answered {status}: {body[:300]!r}")
    if not server.authenticates:
        return
    bad = {"no token": None, "a token signed with another secret": mint("bench-tenant", secret="x" * 48),
           "an expired token": mint("bench-tenant", ttl=-120)}
    for name, bad_token in bad.items():
        status, body = _request(server, "GET", "/api/chains", bad_token)
        if status not in (401, 403):
            raise BenchFailure(f"{what}: {name} answered {status}, not 401/403: {body[:300]!r}")


def _request(server: Server, method: str, path: str, token: str | None) -> tuple[int, bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body = b'{"version":"1.4.2"}' if method == "POST" else None
    if body:
        headers["Content-Type"] = "application/json"
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()
