"""Odd spellings of a path never help the caller (PRODUCT.md §3 "Hostile input"), through a real gateway
process, a real redis-server and a real upstream, on raw sockets (a client library would normalise the path).

Every spelling is either refused (400) or authenticated and metered as the path it spells; the path that
reaches the upstream is the raw one.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web

from tests.gateway.conftest import StartGateway
from tests.support import GatewayProcess, Upstream, bearer, upstream_app

ADMIN_TOKEN = "ops-token-0123456789"
PLANS: dict[str, Any] = {
    "starter": {
        "rate": {"per_second": 1000, "burst": 1000},
        "quotas": {
            "chain_deployments": {"limit": 2},
            "chains": {"limit": 1, "guards": {"method": "POST", "path": "/api/chains"}},
        },
    },
}
DEPLOY = "/api/chains/c1/deployments"
DEPLOY_SPELLINGS = [
    "/api/chains/c1/deployments/", "/api/chains/c1/%64eployments", "/api/chains/c1/deployments;x",
    "/api/chains/c1/./deployments", "/api/chains//c1/deployments", "/API/chains/c1/deployments",
    "/%61pi/chains/c1/deployments", "//api/chains/c1/deployments", "/api/chains/c1/x/../deployments",
    "/api/chains/c1/deployments%3bx", "/api/chains/c1/Deployments",
    # and a few more: an encoded slash read as one, a query or fragment encoded, an unresolved climb
    "/api/chains/c1%2Fdeployments", "/api/chains/c1/deployments%3Fx", "/api/chains/c1/deployments/.",
    "/api/chains/c1/deployments;a=1/", "/api/chains/c1;v=2/deployments",
]
CREATE_SPELLINGS = [
    "/api/chains/", "/api/chains;", "/api/%63hains", "/api//chains", "/API/chains", "//api/chains",
    "/api/./chains", "/api/x/../chains", "/api/chains;x=1", "/api/chains%3B", "/api/Chains",
]
PUBLIC_ESCAPES = [
    "/status/..;/api/chains", "/status/x/..;/..;/api/chains", "/status/..%3b/api/chains",
    "/status/%2e%2e/api/chains", "/status/..%2fapi/chains", "/health/../api/chains", "/status;/../api/chains",
    "/status/..;x=1/api/chains", "/status/%2e%2e;/api/chains", "/status%2f..%2fapi/chains",
    "/status/.%2E/api/chains", "/status/x/../../api/chains", "/status/..%3Fx/../api/chains",
]
UNSAFE = [
    "/api/%2e%2e/chains", "/api/chains/%2E", "/api/a%5Cb", "/api/a\\b", "/api/%zz", "/api/%4", "/api/x%",
    "/api/%00", "/api/x%0a", "/api/%252e%252e/x", "/api/%252fx", "/api/chains#x", "/api/%C0%AE%C0%AE/x",
]


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Site:
    gateway: GatewayProcess
    seen: list[web.BaseRequest]

    async def send(self, method: str, target: str, *, tenant: str | None = "acme",
                   headers: dict[str, str] | None = None, port: int | None = None) -> Reply:
        """One request on its own connection, the request-target written exactly as given."""
        lines = [f"{method} {target} HTTP/1.1", "Host: gateway.test", "Connection: close", "Content-Length: 0"]
        if tenant is not None:
            lines.append("Authorization: " + bearer(tenant)["Authorization"])
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        reader, writer = await asyncio.open_connection("127.0.0.1", port or self.gateway.proxy_port)
        try:
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
            raw = await asyncio.wait_for(reader.read(), 10)
        finally:
            writer.close()
        return parse_reply(raw)

    async def wait_for_gauge(self, tenant: str, meter: str, value: float) -> None:
        deadline = time.monotonic() + 10
        while True:
            reply = await self.send("GET", "/_gateway/usage", tenant=tenant)
            assert reply.status == 200, reply.body
            if reply.json()["meters"][meter]["used"] == value:
                return
            assert time.monotonic() < deadline, reply.body
            await asyncio.sleep(0.05)


def parse_reply(raw: bytes) -> Reply:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        chunks, rest = [], body
        while True:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            chunks.append(rest[:size])
            rest = rest[size + 2:]
        body = b"".join(chunks)
    return Reply(int(status_line.split()[1]), headers, body)


@pytest.fixture
async def site(start_gateway: StartGateway) -> Site:
    seen: list[web.BaseRequest] = []
    upstream = await Upstream(upstream_app(record=seen)).start()
    return Site(start_gateway(upstream, plans=PLANS, admin={"tokens": f"ops:{ADMIN_TOKEN}"}), seen)


def assert_refused_or_over_quota(reply: Reply, meter: str, target: str) -> None:
    assert reply.status in (400, 429), (target, reply.status, reply.body[:200])
    problem = reply.json()
    if reply.status == 429:
        assert problem["type"].endswith("/quota-exceeded") and problem["meter"] == meter, (target, problem)
    else:
        assert problem["type"].endswith("/invalid-request"), (target, problem)


async def test_no_spelling_of_a_deployment_escapes_its_quota(site: Site) -> None:
    for _ in range(2):
        assert (await site.send("POST", DEPLOY)).status == 200
    reached = len(site.seen)
    for target in DEPLOY_SPELLINGS:
        assert_refused_or_over_quota(await site.send("POST", target), "chain_deployments", target)
    assert len(site.seen) == reached  # none of them reached the upstream
    # Other methods are not deployments, however spelled.
    assert (await site.send("GET", "/api/chains/c1/%64eployments")).status == 200


async def test_a_deployment_spelled_oddly_counts_as_one(site: Site) -> None:
    for number, target in enumerate(DEPLOY_SPELLINGS):
        tenant = f"spelling{number}"
        for _ in range(2):
            reply = await site.send("POST", target, tenant=tenant)
            assert reply.status == 200, (target, reply.status, reply.body[:200])
            assert reply.json()["raw_path"] == target  # forwarded as sent
        assert_refused_or_over_quota(await site.send("POST", DEPLOY, tenant=tenant), "chain_deployments", target)


async def test_no_spelling_of_chain_creation_passes_the_one_chain_guard(site: Site) -> None:
    assert (await site.send("GET", "/api/chains?usage=chains=1", tenant="guarded")).status == 200
    await site.wait_for_gauge("guarded", "chains", 1)
    reached = len(site.seen)
    assert_refused_or_over_quota(await site.send("POST", "/api/chains", tenant="guarded"), "chains", "/api/chains")
    for target in CREATE_SPELLINGS:
        assert_refused_or_over_quota(await site.send("POST", target, tenant="guarded"), "chains", target)
    assert len(site.seen) == reached
    assert (await site.send("GET", "/api/chains/", tenant="guarded")).status == 200  # reading is not guarded


@pytest.mark.parametrize("target", PUBLIC_ESCAPES)
async def test_no_spelling_leaves_the_public_paths(site: Site, target: str) -> None:
    reply = await site.send("GET", target, tenant=None)
    assert reply.status in (400, 401), (target, reply.status, reply.body[:200])
    assert site.seen == []


async def test_public_paths_stay_public(site: Site) -> None:
    for target in ("/health", "/status", "/status/ok", "/status/x/../ok", "/status/%6Fk", "/health/"):
        reply = await site.send("GET", target, tenant=None)
        assert reply.status == 200, (target, reply.status, reply.body[:200])
        assert reply.json()["raw_path"] == target


@pytest.mark.parametrize("target", UNSAFE)
async def test_a_path_that_cannot_be_read_safely_is_refused(site: Site, target: str) -> None:
    for tenant in ("acme", None):
        reply = await site.send("GET", target, tenant=tenant)
        assert reply.status == 400, (target, reply.status, reply.body[:200])
        problem = reply.json()
        assert problem["type"].endswith("/invalid-request")
        assert [error["field"] for error in problem["errors"]] == ["path"]
    assert site.seen == []


async def test_the_raw_path_is_forwarded_unchanged(site: Site) -> None:
    for target in ("/api/chains/c1;x", "/api/%63hains/c1", "//api/chains", "/api/chains/./c1/",
                   "/api/a%2Fb?x=%2e%2e", "/API/Chains"):
        reply = await site.send("GET", target)
        assert reply.status == 200, (target, reply.status, reply.body[:200])
        assert reply.json()["raw_path"] == target


async def test_own_endpoints_are_matched_on_the_canonical_form(site: Site) -> None:
    for target in ("/_gateway/./usage", "//_gateway/usage", "/%5Fgateway/usage", "/_gateway/usage/",
                   "/_gateway//usage", "/_gateway/usage;x", "/x/../_gateway/usage"):
        reply = await site.send("GET", target, tenant="owner")
        assert reply.status == 200, (target, reply.status, reply.body[:200])
        assert reply.json()["tenant"] == "owner"
    for target in ("/_gateway/../api/x", "/_gateway/nothing", "/%5Fgateway/../api/x", "/_GATEWAY/usage",
                   "/_gateway%2F..%2Fapi/x"):
        reply = await site.send("GET", target, tenant="owner")
        assert reply.status == 404, (target, reply.status, reply.body[:200])  # never forwarded
    assert site.seen == []


async def test_admin_api_never_answers_on_the_proxy_listener(site: Site) -> None:
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    direct = await site.send("GET", "/admin/plans", tenant=None, headers=admin, port=site.gateway.admin_port)
    assert direct.status == 200  # the token is good, on the admin listener
    absolute = f"http://127.0.0.1:{site.gateway.admin_port}/admin/plans"
    for target in ("/admin/plans", "/%61dmin/plans", "//admin/plans", "/x/../admin/plans", absolute):
        reply = await site.send("GET", target, tenant=None, headers=admin)
        assert reply.status == 401, (target, reply.status, reply.body[:200])  # proxied, so a tenant JWT is needed
    assert site.seen == []
    reply = await site.send("GET", "/admin/plans")  # with a tenant's JWT it is the upstream's path
    assert reply.status == 200 and reply.json()["raw_path"] == "/admin/plans"
