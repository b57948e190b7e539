"""Clients of 50+ tenants over every default meter, and the record of what each of them saw."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from tests.chaos.upstream import MARK
from tests.support import GatewayProcess, bearer, token

# One connection per request: a request on a fresh connection to a stopped gateway is refused at
# connect, so "never reached the gateway" is known for sure instead of guessed from a reset.
TIMEOUT = aiohttp.ClientTimeout(total=20)


@dataclass(frozen=True)
class Tenant:
    name: str
    plan: str  # starter / professional: deployment quotas; enterprise: none
    customer: str
    slow_deploys: bool  # sends slow 5xx deployments (only tenants without a deployment quota: see accounting)


def tenants(count: int) -> list[Tenant]:
    out = []
    for i in range(count):
        plan = "starter" if i % 7 == 0 else "professional" if i % 7 == 1 else "enterprise"
        out.append(Tenant(f"chaos-t{i:02d}", plan, f"cus_chaos_{i:02d}", slow_deploys=plan == "enterprise"))
    return out


@dataclass
class Sent:
    """One request as its client saw it."""

    rid: str
    tenant: str
    kind: str  # deploy | data | code | slow5xx | slow_deploy | abandon
    gateway: int
    generation: int
    start: float
    end: float | None = None
    status: int | None = None  # None: no answer
    error: str | None = None  # "refused" (never reached a gateway) | "lost" (outcome unknown) | "abandoned"
    upstream: bool = False  # the answer came from the upstream (not a refusal of the gateway's own)
    body: int = 0  # body bytes received
    ratelimit: str = ""  # the RateLimit header: present only when Redis decided the admission
    detail: str = ""  # the client's error


@dataclass
class Traffic:
    gateways: Callable[[], list[GatewayProcess]]
    generations: Callable[[], list[int]]
    abandons_held: Callable[[], bool] = lambda: False
    log: list[Sent] = field(default_factory=list)
    reported: dict[str, set[float]] = field(default_factory=dict)  # tenant -> storage_gb values reported
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _tokens: dict[str, dict[str, str]] = field(default_factory=dict)

    def headers(self, tenant: str) -> dict[str, str]:
        if tenant not in self._tokens:
            self._tokens[tenant] = bearer(tenant, ttl=7200)
        return self._tokens[tenant]

    async def run(self, http: aiohttp.ClientSession, tenant: Tenant, rng: random.Random, until: float,
                  background: set[asyncio.Task[None]]) -> None:
        """One tenant's client until `until` (monotonic); slow requests run beside it."""
        while time.monotonic() < until:
            kind = rng.choices(("data", "deploy", "code", "slow5xx", "abandon"), weights=(45, 25, 15, 6, 5))[0]
            if kind == "slow5xx" and tenant.slow_deploys and rng.random() < 0.5:
                kind = "slow_deploy"
            if kind == "abandon" and self.abandons_held():
                kind = "deploy"  # the same draws either way: only the fault combination known to fail is held
            if kind.startswith("slow"):
                task = asyncio.ensure_future(self.one(http, tenant, kind, rng))
                background.add(task)
                task.add_done_callback(background.discard)
            else:
                await self.one(http, tenant, kind, rng)
            await asyncio.sleep(rng.uniform(0.25, 0.9))

    async def one(self, http: aiohttp.ClientSession, tenant: Tenant, kind: str, rng: random.Random,
                  *, gauge: float | None = None, gateway: int | None = None) -> Sent:
        """Send one request of `kind`; on a refused connection, once more to the other gateway."""
        index = rng.randrange(2) if gateway is None else gateway
        path, method = self._path(tenant, kind, rng, gauge)
        sent = await self._send(http, tenant, kind, index, path, method)
        if sent.error == "refused":
            sent = await self._send(http, tenant, kind, 1 - index, path, method)
        return sent

    def _path(self, tenant: Tenant, kind: str, rng: random.Random, gauge: float | None) -> tuple[str, str]:
        if kind == "data":
            size = rng.choice((0, 180, 1500, 9000, 70000))
            query = ""
            if gauge is not None or rng.random() < 0.3:
                value = gauge if gauge is not None else float(rng.randint(1, 9))
                self.reported.setdefault(tenant.name, set()).add(value)
                query = f"?usage=storage_gb%3D{value:g},chains%3D{rng.randint(0, 1)}"
            return f"/api/data/{size}{query}", "GET"
        if kind in ("deploy", "abandon"):
            status = rng.choice((201, 201, 201, 200, 409))
            return f"/api/chains/c{rng.randint(1, 3)}/deployments?status={status}", "POST"
        if kind == "slow_deploy":
            return f"/api/chains/c1/deployments?status=500&slow={rng.uniform(2.2, 3.6):.2f}", "POST"
        if kind == "slow5xx":
            return f"/api/slow5xx?delay={rng.uniform(2.2, 3.6):.2f}", "GET"
        return f"/api/code/{rng.choice((404, 409, 422, 500, 502, 503))}", "GET"

    async def _send(self, http: aiohttp.ClientSession, tenant: Tenant, kind: str, index: int, path: str,
                    method: str) -> Sent:
        gateway = self.gateways()[index]
        sent = Sent(f"chaos-{next(self._ids)}", tenant.name, kind, index, self.generations()[index], time.time())
        self.log.append(sent)
        if kind == "abandon":
            await self._abandon(gateway, sent, path)
            return sent
        headers = {**self.headers(tenant.name), "X-Request-Id": sent.rid}
        try:
            async with http.request(method, gateway.url + path, headers=headers, data=b"{}" if method == "POST"
                                    else None, timeout=TIMEOUT) as response:
                body = await response.read()
                sent.status, sent.body = response.status, len(body)
                sent.upstream = MARK in response.headers
                sent.ratelimit = response.headers.get("RateLimit", "")
        except aiohttp.ClientConnectorError as exc:
            # Only a refused connect is "never reached a gateway"; aiohttp also raises this class when a
            # connection the kernel had accepted dies with the process, and then the request may be in flight.
            sent.error = "refused" if exc.os_error.errno == errno.ECONNREFUSED else "lost"
            sent.detail = repr(exc)
        except (aiohttp.ClientError, TimeoutError) as exc:
            sent.error, sent.detail = "lost", repr(exc)
        sent.end = time.time()
        return sent

    async def _abandon(self, gateway: GatewayProcess, sent: Sent, path: str) -> None:
        """Half a deployment body, then the client is gone: the upstream never gets the request whole."""
        try:
            _reader, writer = await asyncio.open_connection("127.0.0.1", gateway.proxy_port)
        except OSError:
            sent.error, sent.end = "refused", time.time()
            return
        head = (f"POST {path} HTTP/1.1\r\nHost: chaos\r\nAuthorization: Bearer {token(sent.tenant, ttl=7200)}\r\n"
                f"X-Request-Id: {sent.rid}\r\nContent-Type: application/json\r\nContent-Length: 2000\r\n\r\n")
        with contextlib.suppress(OSError):
            writer.write(head.encode() + b"{" + b" " * 999)
            await writer.drain()
            await asyncio.sleep(0.05)
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        sent.error, sent.end = "abandoned", time.time()
