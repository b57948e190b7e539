"""A rolling restart of two gateways under traffic (issue 14 §5): nothing lost, nothing doubled, no 5xx.

Two `cosmos-gateway serve` processes share one redis-server and one SQLite file in front of one upstream
that counts what it received per tenant. A driver plays the load balancer: keep-alive pooled clients send
to the gateways in rotation; a gateway leaves the rotation when its /readyz stops answering 200 or a
connect to it fails. Like a real balancer it sends a request again on another gateway only when the
connect was refused (the request never left the client), never when it may have reached a gateway.
Each gateway in turn gets SIGTERM, exits, and a new process of the same config takes its place.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.cli.devservices import RedisProcess
from tests.support import GatewayProcess, Upstream, bearer, config_dict, token

ADMIN_TOKEN = "rolling-admin-token-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
GRACE = 10  # server.shutdown_grace_seconds: far above the slowest upstream answer
LIMIT = 30  # the deployer's chain_deployments quota
TENANTS = ("roll-a", "roll-b", "roll-c")
DEPLOYER = "roll-deployer"
DEPLOY_PATH = "/api/chains/c1/deployments"  # the default chain_deployments meter (POST)
LOOPS = 8  # one of them the deployer's
DEPLOY_EVERY = 0.2  # seconds between the deployer's attempts: LIMIT of them take about 6 s
HEALTH_INTERVAL = 0.05
REQUEST_SECONDS = 15.0
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=REQUEST_SECONDS)
PLANS = {"starter": {"rate": {"per_second": 100000, "burst": 100000},  # rate limits are not measured here
                     "quotas": {"chain_deployments": {"limit": LIMIT}}}}


# --------------------------------------------------------------------------- the upstream


@dataclass
class CountingUpstream:
    """Counts the requests that reached it per tenant (the gateway's X-Cosmos-Tenant); answers a body of
    the size the client asked for, now and then slowly, so SIGTERM finds requests in flight."""

    received: Counter[str] = field(default_factory=Counter)

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            await request.read()
            self.received[request.headers.get("X-Cosmos-Tenant", "")] += 1
            delay = float(request.query.get("delay", "0"))
            if delay:
                await asyncio.sleep(delay)
            size = int(request.query.get("size", "100"))
            return web.Response(body=b"r" * size, content_type="application/octet-stream")

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        return app


# --------------------------------------------------------------------------- the balancer


class NoAnswer(Exception):
    """The connection broke after the request may have left the client: never sent again."""


async def _no_resend(request: aiohttp.ClientRequest,
                     handler: aiohttp.ClientHandlerType) -> aiohttp.ClientResponse:
    """aiohttp sends an idempotent request once more when its pooled connection broke (RFC 9112 §9.3.1);
    a balancer must not: that request may have reached a gateway and been counted. A refused connect
    still passes (the balancer sends it to another gateway)."""
    try:
        return await handler(request)
    except aiohttp.ClientConnectorError:
        raise
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
        raise NoAnswer(repr(exc)) from exc


@dataclass
class Backend:
    name: str  # A or B, and a ' per restart
    gateway: GatewayProcess
    in_service: bool = True


@dataclass
class Outcome:
    tenant: str
    backend: str
    expected: int  # body bytes the upstream sends
    status: int | None = None  # None: no answer at all (`error` says why)
    body: int = 0
    problem: str = ""  # the problem+json type of a refusal
    error: str = ""
    at: float = 0.0  # answered, seconds into the run
    ratelimit: str = ""  # the RateLimit header: there only when Redis decided the admission


@dataclass
class Balancer:
    backends: list[Backend] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)
    refused_connects: int = 0  # sent again on another gateway: they never reached one
    removals: list[str] = field(default_factory=list)
    began: float = field(default_factory=time.monotonic)
    _turn: itertools.count[int] = field(default_factory=itertools.count)
    _tokens: dict[str, dict[str, str]] = field(default_factory=dict)

    def _auth(self, tenant: str) -> dict[str, str]:
        """One token per tenant for the run: minting one per request would cost the driver more than the
        gateway its check."""
        if tenant not in self._tokens:
            self._tokens[tenant] = bearer(tenant)
        return self._tokens[tenant]

    def in_rotation(self) -> list[Backend]:
        return [b for b in self.backends if b.in_service]

    def take_out(self, backend: Backend, why: str) -> None:
        if backend.in_service:
            backend.in_service = False
            self.removals.append(f"{time.monotonic() - self.began:.2f} {backend.name}: {why}")

    async def send(self, http: aiohttp.ClientSession, method: str, path: str, tenant: str, expected: int,
                   body: bytes | None = None) -> Outcome:
        deadline = time.monotonic() + REQUEST_SECONDS
        while True:
            rotation = self.in_rotation()
            assert rotation, "no gateway in rotation"
            assert time.monotonic() < deadline, "no gateway accepted a connection before the deadline"
            backend = rotation[next(self._turn) % len(rotation)]
            outcome = Outcome(tenant, backend.name, expected)
            try:
                async with http.request(method, backend.gateway.url + path, headers=self._auth(tenant),
                                        data=body) as response:
                    outcome.status = response.status
                    outcome.ratelimit = response.headers.get("RateLimit", "")
                    data = await response.read()
                    outcome.body = len(data)
                    if response.content_type == "application/problem+json":
                        outcome.problem = (await response.json())["type"].rsplit("/", 1)[-1]
            except aiohttp.ClientConnectorError:
                self.refused_connects += 1
                self.take_out(backend, "connect refused")
                continue
            except (NoAnswer, aiohttp.ClientError, TimeoutError) as exc:  # a body cut short is one too
                outcome.error = f"{type(exc).__name__}: {exc}"
            outcome.at = time.monotonic() - self.began
            self.outcomes.append(outcome)
            return outcome

    async def health_checks(self, stop: asyncio.Event) -> None:
        """/readyz of each gateway in rotation, every HEALTH_INTERVAL: anything but 200 takes it out."""
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as http:
            while not stop.is_set():
                for backend in self.in_rotation():
                    try:
                        async with http.get(backend.gateway.admin_url + "/readyz") as response:
                            if response.status != 200:
                                self.take_out(backend, f"readyz {response.status}")
                    except (aiohttp.ClientError, TimeoutError) as exc:
                        self.take_out(backend, f"readyz {type(exc).__name__}")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), HEALTH_INTERVAL)


# --------------------------------------------------------------------------- the test


@pytest.fixture
async def counting_upstream() -> AsyncIterator[tuple[CountingUpstream, Upstream]]:
    counter = CountingUpstream()
    server = await Upstream(counter.app()).start()
    yield counter, server
    await server.close()


async def _ready(gateway: GatewayProcess, within: float = 15) -> None:
    deadline = time.monotonic() + within
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        while True:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with http.get(gateway.admin_url + "/readyz") as response:
                    if response.status == 200:
                        return
            assert time.monotonic() < deadline, f"{gateway.url} not ready\n{gateway.log()[-2000:]}"
            await asyncio.sleep(0.05)


async def test_rolling_restart_under_traffic_loses_nothing(
        counting_upstream: tuple[CountingUpstream, Upstream], redis_server: RedisProcess, tmp_path: Path) -> None:
    """Per tenant, once every gateway has stopped: counted == 2xx answers == requests the upstream received,
    bytes metered == bytes received; the deployer's quota admits exactly LIMIT of the attempts it spreads
    over both restarts; no request goes unanswered, none gets a 5xx or a body cut short."""
    counter, upstream = counting_upstream
    # One spool folder for all (each process writes a file of its own): whatever one left there, the
    # next one to start replays.
    config = config_dict(upstream.url, redis_server.url, f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}",
                         plans=PLANS, admin={"tokens": f"ops:{ADMIN_TOKEN}"},
                         server={"shutdown_grace_seconds": GRACE, "access_log": False})
    started: list[GatewayProcess] = []

    async def start() -> GatewayProcess:
        gateway = GatewayProcess(config, tmp_path)
        started.append(gateway)
        await asyncio.to_thread(gateway.start)
        await _ready(gateway)
        return gateway

    lb = Balancer()
    stop_traffic = asyncio.Event()
    stop_checks = asyncio.Event()
    phases: list[str] = []  # what happened when, for the report
    exits: list[tuple[str, int, float]] = []  # gateway, exit status, seconds from SIGTERM

    def mark(what: str) -> None:
        phases.append(f"{time.monotonic() - lb.began:.2f} {what}")

    async def terminate(backend: Backend) -> None:
        sent = time.monotonic()
        code = await asyncio.to_thread(backend.gateway.terminate, GRACE + 5)
        exits.append((backend.name, code, round(time.monotonic() - sent, 2)))

    async def traffic(http: aiohttp.ClientSession, loop: int) -> None:
        rng = random.Random(loop)
        tenant = TENANTS[loop % len(TENANTS)]
        while not stop_traffic.is_set():
            size = rng.choice((0, 100, 2000, 30000))
            delay = rng.choice((0.0,) * 8 + (0.05, 0.3))  # some requests are in flight at SIGTERM
            query = f"?size={size}&delay={delay}"
            if rng.random() < 0.3:  # a POST: nobody may send it twice
                await lb.send(http, "POST", f"/api/items{query}", tenant, size, b"p" * 500)
            else:
                await lb.send(http, "GET", f"/api/items/{rng.randrange(1000)}{query}", tenant, size)

    async def deployments(http: aiohttp.ClientSession) -> None:
        """An attempt every DEPLOY_EVERY for the whole run: the quota runs out in the middle of it."""
        while not stop_traffic.is_set():
            await lb.send(http, "POST", f"{DEPLOY_PATH}?size=64", DEPLOYER, 64, b"{}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop_traffic.wait(), DEPLOY_EVERY)

    async def restart(index: int) -> None:
        old = lb.backends[index]
        mark(f"SIGTERM {old.name}")
        await terminate(old)
        mark(f"{old.name} exited")
        lb.take_out(old, "exited")  # it left the rotation already: its /readyz went first
        new = Backend(old.name + "'", await start())
        lb.backends[index] = new
        mark(f"{new.name} ready, in rotation")

    try:
        for name in ("A", "B"):  # one after the other: the first migrates the SQLite file
            lb.backends.append(Backend(name, await start()))
        connector = aiohttp.TCPConnector(limit=64)  # keep-alive pooling: connections are reused
        async with aiohttp.ClientSession(connector=connector, timeout=REQUEST_TIMEOUT,
                                         middlewares=(_no_resend,)) as http:
            lb.began = time.monotonic()
            checks = asyncio.ensure_future(lb.health_checks(stop_checks))
            loops = [asyncio.ensure_future(traffic(http, i)) for i in range(LOOPS - 1)]
            loops.append(asyncio.ensure_future(deployments(http)))
            try:
                await asyncio.sleep(1.5)
                for index in (0, 1):
                    await asyncio.wait_for(restart(index), GRACE + 30)
                    await asyncio.sleep(1.5)
                # Enough attempts to run the quota out with room to spare, however fast the restarts went.
                deadline = time.monotonic() + 20
                while sum(o.tenant == DEPLOYER for o in lb.outcomes) < 2 * LIMIT:
                    assert time.monotonic() < deadline, "the deployer stalled"
                    await asyncio.sleep(DEPLOY_EVERY)
            finally:
                stop_traffic.set()
                await asyncio.wait_for(asyncio.gather(*loops), REQUEST_SECONDS)
                mark("traffic stopped")
                stop_checks.set()
                await asyncio.wait_for(checks, 5)

        # The replacements stop too (SIGTERM flushes their byte records); then a fresh process reads, once
        # it has replayed whatever the others spooled (nothing, unless Redis was slow to answer).
        for backend in lb.backends:
            await terminate(backend)
        reader = await start()
        expected = {tenant: (sum(o.status == 200 for o in lb.outcomes if o.tenant == tenant),
                             sum(o.body for o in lb.outcomes if o.tenant == tenant and o.status == 200))
                    for tenant in (*TENANTS, DEPLOYER)}
        views = await _settled_usage(reader, expected)
    finally:
        for gateway in started:
            await asyncio.to_thread(gateway.stop)

    outcomes = lb.outcomes
    statuses = Counter(o.status for o in outcomes)
    deployer = [o for o in outcomes if o.tenant == DEPLOYER]
    admitted = [o for o in deployer if o.status == 200]
    # Admitted while Redis did not answer within the limiter's 50 ms (a loaded machine): served fail-open
    # and spooled, without the RateLimit header that only Redis's decision brings (PRODUCT.md §5).
    fail_open = [o for o in outcomes if o.status == 200 and not o.ratelimit]
    report = (f"{len(outcomes)} requests, statuses {dict(statuses)}, refused connects sent elsewhere "
              f"{lb.refused_connects}, fail-open admissions {len(fail_open)}; deployments {len(deployer)}, "
              f"admitted by {dict(Counter(o.backend for o in admitted))}; exits {exits}; "
              f"removals {lb.removals}; phases {phases}")
    print(report)
    assert [(code, took < GRACE) for _, code, took in exits] == [(0, True)] * 4, report
    broken = [o for o in outcomes if o.error]  # no answer at all, or a body cut short
    assert broken == [], f"{len(broken)} requests broken: {broken[:5]}\n{report}"
    # A 503 would be excused from a draining gateway only; this one never answers with one.
    assert set(statuses) <= {200, 429}, report
    assert all(o.body == o.expected for o in outcomes if o.status == 200), report

    for tenant in (*TENANTS, DEPLOYER):
        ok, received = expected[tenant]
        assert (views[tenant]["api_calls"]["used"], views[tenant]["bandwidth_bytes"]["used"]) == (ok, received), \
            (tenant, views[tenant], report)
        assert counter.received[tenant] == ok, (tenant, counter.received[tenant], ok, report)
        if tenant != DEPLOYER:
            assert sum(o.tenant == tenant for o in outcomes) == ok > 100, (tenant, report)

    assert len(deployer) >= 2 * LIMIT, report
    assert views[DEPLOYER]["chain_deployments"]["used"] == len(admitted), report
    assert all(o.status == 429 and o.problem == "quota-exceeded" for o in deployer if o.status != 200), report
    # Each admission Redis decided left one fewer: r = LIMIT-1 … 0, each once, whichever gateway asked.
    remaining = [int(o.ratelimit.split('"chain_deployments";r=')[1].split(";")[0])
                 for o in admitted if '"chain_deployments"' in o.ratelimit]
    if not any(o.tenant == DEPLOYER for o in fail_open):
        assert len(admitted) == LIMIT, report
        assert sorted(remaining) == list(range(LIMIT)), (remaining, report)
    else:  # spooled admissions are counted when replayed: Redis then admits fewer, never more
        assert len(set(remaining)) == len(remaining) <= LIMIT and min(remaining) >= 0, (remaining, report)


async def _settled_usage(gateway: GatewayProcess, expected: dict[str, tuple[int, int]],
                         within: float = 10) -> dict[str, dict[str, Any]]:
    """Each tenant's meters from the admin API once api_calls and bandwidth_bytes are as `expected` (spool
    replays run every second), or as they are at the deadline. Counts only grow: one over never settles."""
    deadline = time.monotonic() + within
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        while True:
            views: dict[str, dict[str, Any]] = {}
            for tenant in expected:
                async with http.get(f"{gateway.admin_url}/admin/tenants/{tenant}", headers=ADMIN) as response:
                    assert response.status == 200, await response.text()
                    views[tenant] = (await response.json())["meters"]
            if all((views[t]["api_calls"]["used"], views[t]["bandwidth_bytes"]["used"]) == expected[t]
                   for t in expected) or time.monotonic() > deadline:
                return views
            await asyncio.sleep(0.2)


# --------------------------------------------------------------------------- the race the rolling restart found


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> tuple[str, bytes]:
    """One request on a kept-alive connection: the response head and body (Content-Length framing)."""
    writer.write(request)
    await writer.drain()
    head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).decode("latin-1")
    length = next(int(line.split(":", 1)[1]) for line in head.split("\r\n")
                  if line.lower().startswith("content-length:"))
    return head, await asyncio.wait_for(reader.readexactly(length), 5)


async def test_a_request_on_an_idle_kept_alive_connection_after_sigterm_is_answered(
        counting_upstream: tuple[CountingUpstream, Upstream], redis_server: RedisProcess, tmp_path: Path) -> None:
    """A client (a balancer) that has not yet seen a gateway leave sends on a connection it keeps alive.
    The draining gateway answers it, with `Connection: close`, instead of closing idle connections at once
    (then the request meets a closed socket: no answer, and the client cannot know it was never served)."""
    counter, upstream = counting_upstream
    gateway = GatewayProcess(config_dict(upstream.url, redis_server.url,
                                         f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}", plans=PLANS), tmp_path)
    request = (f"GET /api/items/1?size=10 HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token('idle')}\r\n\r\n"
               .encode())
    try:
        await asyncio.to_thread(gateway.start)
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.proxy_port)
        try:
            head, body = await _exchange(reader, writer, request)
            assert head.startswith("HTTP/1.1 200") and body == b"r" * 10
            assert gateway.process is not None
            gateway.process.send_signal(signal.SIGTERM)
            # Draining once the proxy listener refuses new connections.
            deadline = time.monotonic() + 5
            while True:
                try:
                    _, probe = await asyncio.open_connection("127.0.0.1", gateway.proxy_port)
                except ConnectionRefusedError:
                    break
                probe.close()
                assert time.monotonic() < deadline, "the gateway still listens after SIGTERM"
                await asyncio.sleep(0.01)
            try:
                head, body = await _exchange(reader, writer, request)
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                raise AssertionError(f"the kept-alive connection was closed under the request: {exc!r}") from None
            assert head.startswith("HTTP/1.1 200") and body == b"r" * 10
            assert "\r\nconnection: close\r\n" in head.lower()
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed after that answer
        finally:
            writer.close()
        assert await asyncio.to_thread(gateway.terminate, 15) == 0
    finally:
        await asyncio.to_thread(gateway.stop)
    assert counter.received["idle"] == 2
