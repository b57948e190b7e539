"""Shadow limits end to end (PRODUCT.md §6a): a `cosmos-gateway serve` process, a real redis-server, a real
upstream. A tenant over a shadow quota is served, /metrics counts it, the admin view and the console list it,
and an enforced quota next to it still refuses."""

from __future__ import annotations

from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.gateway.conftest import StartGateway
from tests.gateway.console.conftest import OPS_TOKEN, ConsoleClient
from tests.support import GatewayProcess, Upstream, bearer

ADMIN = {"Authorization": f"Bearer {OPS_TOKEN}"}
DEPLOY = "/api/chains/c1/deployments"
CONFIG: dict[str, Any] = {
    "plans": {"rollout": {
        "rate": {"per_second": 1000, "burst": 1000},
        "quotas": {
            "chain_deployments": {"limit": 2, "enforce": "shadow"},  # the limit being tried out
            "api_calls": {"limit": 4},  # enforced, next to it
        },
    }},
    "default_plan": "rollout",
    "admin": {"tokens": f"ops:{OPS_TOKEN}"},
}


async def deploy(http: aiohttp.ClientSession, gateway: GatewayProcess, tenant: str) -> tuple[int, dict[str, Any]]:
    async with http.post(gateway.url + DEPLOY, headers=bearer(tenant), data=b"{}") as response:
        body = await response.json(content_type=None) if response.status != 200 else {}
        return response.status, {**body, "headers": dict(response.headers)}


async def shadow_samples(http: aiohttp.ClientSession, gateway: GatewayProcess) -> dict[tuple[str, str, str], float]:
    async with http.get(gateway.admin_url + "/metrics") as response:
        text = await response.text()
    return {(s.labels["reason"], s.labels["plan"], s.labels["meter"]): s.value
            for family in text_string_to_metric_families(text) for s in family.samples
            if s.name == "gateway_shadow_rejections_total"}


async def test_a_tenant_over_a_shadow_quota_is_served_counted_and_listed(upstream: Upstream,
                                                                         start_gateway: StartGateway) -> None:
    gateway = start_gateway(upstream, **CONFIG)
    async with aiohttp.ClientSession() as http:
        answers = [await deploy(http, gateway, "acme") for _ in range(4)]
        assert [status for status, _ in answers] == [200] * 4  # the 3rd and 4th are over the shadow quota
        assert all('"chain_deployments"' not in a["headers"]["RateLimit-Policy"] for _, a in answers)
        status, refused = await deploy(http, gateway, "acme")  # the enforced quota still refuses
        assert status == 429 and refused["type"].endswith("/quota-exceeded") and refused["meter"] == "api_calls"

        assert (await shadow_samples(http, gateway))[("quota", "rollout", "chain_deployments")] == 2

        async with http.get(gateway.admin_url + "/admin/tenants/acme", headers=ADMIN) as response:
            view = await response.json()
        assert view["shadow_rejections"] == [{"reason": "quota", "meter": "chain_deployments", "count": 2}]
        deployments = view["meters"]["chain_deployments"]
        assert (deployments["used"], deployments["limit"], deployments["shadow_limit"]) == (4, None, 2)
        async with http.get(gateway.url + "/_gateway/usage", headers=bearer("acme")) as response:
            own = await response.json()
        assert own["meters"]["chain_deployments"]["shadow_limit"] == 2
        assert "shadow_rejections" not in own  # the listing is the operators'

    console = ConsoleClient(gateway)  # type: ignore[arg-type]  # it needs the admin port only
    try:
        await console.sign_in()
        status, page, _ = await console.get("/admin/ui/tenant?id=acme")
    finally:
        await console.close()
    assert status == 200
    assert ('<tr data-reason="quota" data-meter="chain_deployments"><td>quota</td>'
            '<th scope="row">chain_deployments</th><td class="count">2</td></tr>') in page
    # Logged (stderr, unbuffered, written while the requests were admitted), once within the minute for two hits.
    lines = [line for line in gateway.log().splitlines() if "shadow limit would refuse" in line]
    assert len(lines) == 1 and "tenant acme" in lines[0] and "meter chain_deployments" in lines[0]


async def test_a_shadow_override_from_the_console_reports_below_the_enforced_limit(
        upstream: Upstream, start_gateway: StartGateway) -> None:
    """Rolling out a lower limit for one tenant: the override editor's enforce choice, through the admin
    API's code; the plan's limit keeps refusing."""
    gateway = start_gateway(upstream, **CONFIG)
    console = ConsoleClient(gateway)  # type: ignore[arg-type]
    try:
        csrf = await console.sign_in()
        status, _, _ = await console.post("/admin/ui/tenant/override", {
            "csrf": csrf, "tenant": "globex", "meter": "api_calls", "limit": "1", "enforce": "shadow"})
        assert status == 303
        status, page, _ = await console.post("/admin/ui/tenant/override", {
            "csrf": csrf, "tenant": "globex", "meter": "api_calls", "limit": "1", "enforce": "maybe"})
        assert status == 400 and "<strong>enforce</strong>" in page
        async with aiohttp.ClientSession() as http:
            statuses = [(await deploy(http, gateway, "globex"))[0] for _ in range(5)]
            assert statuses == [200] * 4 + [429]
            samples = await shadow_samples(http, gateway)
        # Each request reports its first hit: the api_calls override before the plan's deployments quota.
        assert samples[("quota", "rollout", "api_calls")] == 3
        status, page, _ = await console.get("/admin/ui/tenant?id=globex")
    finally:
        await console.close()
    assert status == 200
    assert '<td class="count">3</td>' in page and "<td>shadow</td>" in page
