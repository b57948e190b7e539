"""The admin API on a real aiohttp server, a real SQL store (SQLite and PostgreSQL) and a real TenantDirectory."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.admin.api import add_admin_api
from gateway.admin.health import admin_app
from gateway.auth.tokens import Authenticator, AuthError
from gateway.config.settings import Settings
from metering.db import create_engine, session_factory
from metering.migrate import upgrade_async
from metering.models import AlertEvent
from quota.tenants import TenantDirectory
from tests.metering.conftest import db_url, postgres_database  # noqa: F401  (fixtures: SQLite and PostgreSQL)
from tests.support import settings_for, token

OPS_TOKEN = "ops-secret-token-0123456789"
CI_TOKEN = "ci-secret-token-9876543210ab"
START = datetime(2026, 12, 16, 12, 0, tzinfo=UTC)
PERIOD_START = int(datetime(2026, 12, 1, tzinfo=UTC).timestamp())
PROBLEM = "application/problem+json"


class Clock:
    """A fixed time the test moves: `now` is a datetime, the clock answers epoch seconds (metering.clock)."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now.timestamp()


class MemoryUsage:
    """A UsageReader kept in memory: what the Redis store would answer."""

    def __init__(self) -> None:
        self.values: dict[tuple[str, int], dict[str, float]] = {}
        self.seen: set[str] = set()
        self.hits: dict[tuple[str, int], dict[tuple[str, str], int]] = {}
        self.down = False

    def add(self, tenant: str, period_start: int, **values: float) -> None:
        self.values.setdefault((tenant, period_start), {}).update(values)
        self.seen.add(tenant)

    async def usage(self, tenant: str, period_start: int, meters: Sequence[str]) -> dict[str, float]:
        if self.down:
            raise ConnectionError("redis down")
        stored = self.values.get((tenant, period_start), {})
        return {m: stored[m] for m in meters if m in stored}

    async def tenant_seen(self, tenant: str) -> bool:
        if self.down:
            raise ConnectionError("redis down")
        return tenant in self.seen

    async def tenants_seen_after(self, after: str | None, limit: int) -> list[str]:
        if self.down:
            raise ConnectionError("redis down")
        return sorted(t for t in self.seen if after is None or t > after)[:limit]

    async def shadow_hits(self, tenant: str, period_start: int) -> dict[tuple[str, str], int]:
        if self.down:
            raise ConnectionError("redis down")
        return dict(self.hits.get((tenant, period_start), {}))


@dataclass
class Admin:
    client: TestClient
    directory: TenantDirectory
    usage: MemoryUsage
    clock: Clock
    sessions: Any
    api: web.Application
    authenticator: Authenticator

    async def call(self, method: str, path: str, body: Any = None, *, auth: str | None = OPS_TOKEN,
                   raw: bytes | None = None, **kwargs: Any) -> tuple[int, Any, Any]:
        headers = {} if auth is None else {"Authorization": f"Bearer {auth}"}
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        response = await self.client.request(method, path, data=data, headers=headers, **kwargs)
        text = await response.text()
        return response.status, (json.loads(text) if text else None), response


def make_settings(**overrides: Any) -> Settings:
    return settings_for("http://127.0.0.1:9", "redis://127.0.0.1:1/0", "sqlite+aiosqlite:///unused.db",
                        admin={"tokens": f"ops:{OPS_TOKEN},ci:{CI_TOKEN}"}, **overrides)


@pytest.fixture
async def admin(db_url: str, aiohttp_client: Any) -> AsyncIterator[Admin]:  # noqa: F811
    settings = make_settings(plans={"team": {"rate": {"per_second": 5, "burst": 5},
                                             "quotas": {"chain_deployments": {"limit": 10, "on_exceed": "overage"}}}})
    engine = create_engine(db_url)
    await upgrade_async(engine)
    sessions = session_factory(engine)
    directory = TenantDirectory(sessions, None)
    await directory.reload_changed()
    usage, clock = MemoryUsage(), Clock(START)
    app = admin_app(redis_check=_ok, database_check=_ok, fail_closed=False)
    authenticator = Authenticator(settings.auth)
    api = add_admin_api(app, settings=settings, sessions=sessions, directory=directory,
                        authenticator=authenticator, usage_reader=usage,
                        plans=settings.policy.plans, meters=settings.policy.meters, clock=clock)
    client = await aiohttp_client(app)
    yield Admin(client, directory, usage, clock, sessions, api, authenticator)
    await directory.close()
    await engine.dispose()


async def _ok() -> None:
    return None


def admin_jwt(**claims: Any) -> str:
    claims.setdefault("scope", "openid gateway:admin")
    claims.setdefault("sub", "alice")
    return token(None, **claims)


# --------------------------------------------------------------------------- auth


async def test_admin_token_is_accepted_and_named_in_the_audit(admin: Admin) -> None:
    status, _, _ = await admin.call("PUT", "/admin/tenants/acme", {"plan": "professional"}, auth=CI_TOKEN)
    assert status == 201
    _, audit, _ = await admin.call("GET", "/admin/audit")
    assert audit["entries"][0]["actor"] == "token:ci"


async def test_admin_jwt_without_tenant_claim_is_accepted(admin: Admin) -> None:
    status, _, _ = await admin.call("PUT", "/admin/tenants/acme", {"status": "suspended"}, auth=admin_jwt())
    assert status == 201
    _, audit, _ = await admin.call("GET", "/admin/audit")
    assert audit["entries"][0]["actor"] == "jwt:alice"


async def test_admin_jwt_with_tenant_claim_and_scp_list_is_accepted(admin: Admin) -> None:
    jwt_value = token("acme", scp=["gateway:admin"], sub="bob")
    status, _, _ = await admin.call("GET", "/admin/plans", auth=jwt_value)
    assert status == 200


async def test_missing_credentials_are_401(admin: Admin) -> None:
    status, body, response = await admin.call("GET", "/admin/plans", auth=None)
    assert status == 401 and body["type"].endswith("/invalid-token")
    assert response.content_type == PROBLEM
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="cosmos-gateway"'


@pytest.mark.parametrize("credential", [
    "not-a-token-at-all-but-long",
    OPS_TOKEN + "x",
    OPS_TOKEN[:-1],
    "ops:" + OPS_TOKEN,
    pytest.param("expired", id="expired-jwt"),
    pytest.param("wrong-secret", id="wrong-secret-jwt"),
])
async def test_invalid_credentials_are_401(admin: Admin, credential: str) -> None:
    if credential == "expired":
        credential = admin_jwt(exp=1_000_000, iat=999_000)
    elif credential == "wrong-secret":
        credential = token(None, scope="gateway:admin", secret="another-secret-0123456789abcdef0123456789")
    status, body, response = await admin.call("GET", "/admin/plans", auth=credential)
    assert status == 401 and body["type"].endswith("/invalid-token")
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="cosmos-gateway", error="invalid_token"'


async def test_tenantless_admin_jwt_stays_refused_on_the_proxy_path(admin: Admin) -> None:
    credential = admin_jwt()
    assert (await admin.call("GET", "/admin/plans", auth=credential))[0] == 200  # now cached
    with pytest.raises(AuthError) as caught:
        await admin.authenticator.authenticate(f"Bearer {credential}")
    assert caught.value.reason == "missing_tenant" and caught.value.status == 403


async def test_non_bearer_scheme_is_401(admin: Admin) -> None:
    response = await admin.client.get("/admin/plans", headers={"Authorization": f"Basic {OPS_TOKEN}"})
    assert response.status == 401


@pytest.mark.parametrize("claims", [{"scope": "openid"}, {"scope": "gateway:admin:read"}, {"scope": None}])
async def test_jwt_without_admin_scope_is_403(admin: Admin, claims: dict[str, Any]) -> None:
    status, body, response = await admin.call("GET", "/admin/tenants", auth=admin_jwt(**claims))
    assert status == 403 and body["type"].endswith("/forbidden")
    assert response.content_type == PROBLEM


async def test_health_endpoints_need_no_auth(admin: Admin) -> None:
    assert (await admin.client.get("/healthz")).status == 200


# --------------------------------------------------------------------------- openapi, plans, routing


async def test_openapi_lists_every_route(admin: Admin) -> None:
    status, doc, _ = await admin.call("GET", "/admin/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.1")
    registered = {
        (route.method.lower(), route.resource.canonical)
        for route in admin.api.router.routes()
        if route.method != "*" and route.resource is not None
    }
    documented = {(method, path) for path, item in doc["paths"].items() for method in item
                  if method in ("get", "put", "post", "delete", "patch")}
    assert registered == documented
    assert len(registered) == 8
    schemas = doc["components"]["schemas"]
    for name in ("TenantView", "AuditEntry", "AuditPage", "Problem"):
        assert name in schemas
    # every $ref resolves
    refs = {ref.rsplit("/", 1)[1] for ref in _refs(doc)}
    assert refs <= set(schemas)


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if "$ref" in node else []
        return found + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


async def test_plans(admin: Admin) -> None:
    status, body, _ = await admin.call("GET", "/admin/plans")
    assert status == 200 and body["default_plan"] == "starter"
    assert set(body["plans"]) == {"starter", "professional", "enterprise", "sovereign", "team"}
    assert body["plans"]["team"] == {"rate": {"per_second": 5, "burst": 5}, "shadow_rate": None, "quotas": {
        "chain_deployments": {"limit": 10, "shadow_limit": None, "on_exceed": "overage", "guards": []}}}


async def test_unknown_admin_path_is_problem_404(admin: Admin) -> None:
    status, body, response = await admin.call("GET", "/admin/nothing/here")
    assert status == 404 and body["type"].endswith("/not-found")
    assert response.headers["X-Request-Id"]


async def test_wrong_method_is_problem_405(admin: Admin) -> None:
    status, body, response = await admin.call("POST", "/admin/plans", {})
    assert body["type"].endswith("/method-not-allowed")
    assert status == 405 and response.content_type == PROBLEM
    assert "GET" in response.headers["Allow"]


async def test_request_id_is_kept_on_problems(admin: Admin) -> None:
    response = await admin.client.get("/admin/tenants/nobody", headers={
        "Authorization": f"Bearer {OPS_TOKEN}", "X-Request-Id": "req-123"})
    assert response.status == 404 and response.headers["X-Request-Id"] == "req-123"


# --------------------------------------------------------------------------- tenants


async def test_get_unknown_tenant_is_404(admin: Admin) -> None:
    status, body, _ = await admin.call("GET", "/admin/tenants/ghost")
    assert status == 404 and body["type"].endswith("/not-found") and body["tenant"] == "ghost"


async def test_tenant_seen_only_in_traffic_is_shown_on_the_default_plan(admin: Admin) -> None:
    admin.usage.add("walkin", PERIOD_START, chain_deployments=40, api_calls=1000, chains=1)
    status, view, _ = await admin.call("GET", "/admin/tenants/walkin")
    assert status == 200
    assert view["plan"] == "starter" and view["status"] == "active" and view["stripe_customer_id"] is None
    assert view["period"] == {"start": "2026-12-01T00:00:00Z", "end": "2027-01-01T00:00:00Z"}
    deployments = view["meters"]["chain_deployments"]
    assert deployments == {"used": 40, "limit": 100, "shadow_limit": None, "remaining": 60,
                           "resets_at": "2027-01-01T00:00:00Z", "on_exceed": "reject", "source": "plan",
                           "forecast": 80}
    assert view["meters"]["api_calls"]["limit"] is None
    assert view["meters"]["chains"]["used"] == 1 and view["meters"]["chains"]["resets_at"] is None


async def test_put_creates_with_default_plan_then_updates(admin: Admin) -> None:
    status, view, _ = await admin.call("PUT", "/admin/tenants/acme", {})
    assert status == 201 and view["plan"] == "starter"
    status, view, _ = await admin.call("PUT", "/admin/tenants/acme", {
        "plan": "team", "stripe_customer_id": "cus_42", "billing_anchor_day": 20})
    assert status == 200
    assert view["plan"] == "team" and view["stripe_customer_id"] == "cus_42" and view["billing_anchor_day"] == 20
    assert view["period"] == {"start": "2026-11-20T00:00:00Z", "end": "2026-12-20T00:00:00Z"}
    assert view["rate"] == {"per_second": 5, "burst": 5, "source": "plan", "shadow": None}
    assert view["meters"]["chain_deployments"]["on_exceed"] == "overage"
    # and the GET says the same
    _, again, _ = await admin.call("GET", "/admin/tenants/acme")
    assert again == view


async def test_put_creates_with_the_plan_given(admin: Admin) -> None:
    status, view, _ = await admin.call("PUT", "/admin/tenants/big.co:eu-1", {"plan": "enterprise"})
    assert status == 201 and view["plan"] == "enterprise" and view["tenant"] == "big.co:eu-1"


async def test_changes_are_audited_with_before_and_after(admin: Admin) -> None:
    await admin.call("PUT", "/admin/tenants/acme", {"plan": "professional"})
    await admin.call("PUT", "/admin/tenants/acme", {"status": "suspended"}, auth=admin_jwt(sub="carol"))
    await admin.call("PUT", "/admin/tenants/acme", {"status": "suspended"})  # no change: no entry
    _, audit, _ = await admin.call("GET", "/admin/audit?tenant=acme")
    entries = audit["entries"]
    assert [e["action"] for e in entries] == ["tenant.update", "tenant.create"]
    update, create = entries
    assert create["actor"] == "token:ops" and create["before"] is None
    assert create["after"] == {"plan": "professional", "status": "active", "stripe_customer_id": None,
                               "billing_anchor_day": None}
    assert update["actor"] == "jwt:carol" and update["tenant"] == "acme"
    assert update["before"]["status"] == "active" and update["after"]["status"] == "suspended"
    assert update["at"] == "2026-12-16T12:00:00Z"
    assert audit["next_cursor"] is None


async def test_change_is_effective_here_at_once_and_elsewhere_on_reload(admin: Admin) -> None:
    other = TenantDirectory(admin.sessions, None)  # another instance
    await other.reload_changed()
    await admin.call("PUT", "/admin/tenants/acme", {"plan": "starter"})
    await admin.call("PUT", "/admin/tenants/acme", {"status": "suspended"})
    record = admin.directory.get("acme")
    assert record is not None and record.status == "suspended"
    await admin.call("PUT", "/admin/tenants/acme/overrides/chains", {"limit": 3})
    assert [o.meter for o in admin.directory.get("acme").overrides] == ["chains"]  # type: ignore[union-attr]
    await other.reload_changed()
    elsewhere = other.get("acme")
    assert elsewhere is not None and elsewhere.status == "suspended"
    assert [o.limit for o in elsewhere.overrides] == [3]


async def test_concurrent_creation_of_one_tenant(admin: Admin) -> None:
    results = await asyncio.gather(*(
        admin.call("PUT", "/admin/tenants/racer", {"stripe_customer_id": f"cus_{i}"}) for i in range(5)))
    statuses = sorted(status for status, _, _ in results)
    assert statuses == [200, 200, 200, 200, 201]
    _, audit, _ = await admin.call("GET", "/admin/audit?tenant=racer")
    assert [e["action"] for e in audit["entries"]].count("tenant.create") == 1


async def test_oversized_body_is_413_problem(admin: Admin) -> None:
    status, problem, _ = await admin.call("PUT", "/admin/tenants/acme", raw=b" " * (2 * 1024 * 1024))
    assert status == 413 and problem["type"].endswith("/payload-too-large")


async def test_tenants_are_paged_and_include_traffic_only_tenants(admin: Admin) -> None:
    for name in ("t-a", "t-c", "t-e", "t-g", "t-i"):
        await admin.call("PUT", f"/admin/tenants/{name}", {"plan": "professional"})
    admin.usage.seen |= {"t-b", "t-h", "t-c"}
    seen: list[dict[str, Any]] = []
    cursor: str | None = None
    pages = 0
    while True:
        path = "/admin/tenants?limit=3" + (f"&cursor={cursor}" if cursor else "")
        status, page, _ = await admin.call("GET", path)
        assert status == 200
        seen += page["tenants"]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert [t["tenant"] for t in seen] == ["t-a", "t-b", "t-c", "t-e", "t-g", "t-h", "t-i"]
    by_id = {t["tenant"]: t for t in seen}
    assert by_id["t-b"]["registered"] is False and by_id["t-b"]["plan"] == "starter"
    assert by_id["t-c"]["registered"] is True and by_id["t-c"]["plan"] == "professional"


async def test_tenant_list_default_page(admin: Admin) -> None:
    status, page, _ = await admin.call("GET", "/admin/tenants")
    assert status == 200 and page == {"tenants": [], "next_cursor": None}


# --------------------------------------------------------------------------- overrides


async def test_override_put_creates_tenant_and_shows_in_view(admin: Admin) -> None:
    admin.usage.add("acme", PERIOD_START, chain_deployments=150)
    status, view, _ = await admin.call("PUT", "/admin/tenants/acme/overrides/chain_deployments", {
        "limit": 500, "reason": "launch week", "expires_at": "2026-12-18T00:00:00Z"})
    assert status == 200
    assert view["meters"]["chain_deployments"] | {"forecast": None} == {
        "used": 150, "limit": 500, "shadow_limit": None, "remaining": 350, "resets_at": "2027-01-01T00:00:00Z",
        "on_exceed": "reject", "source": "override", "forecast": None}
    _, audit, _ = await admin.call("GET", "/admin/audit?tenant=acme")
    assert [e["action"] for e in audit["entries"]] == ["override.put", "tenant.create"]
    assert audit["entries"][0]["before"] is None
    assert audit["entries"][0]["after"] == {"meter": "chain_deployments", "limit": 500,
                                            "expires_at": "2026-12-18T00:00:00Z", "reason": "launch week",
                                            "enforce": "on"}
    # expiry: after it, the plan's limit is back
    admin.clock.now = datetime(2026, 12, 18, tzinfo=UTC)
    _, view, _ = await admin.call("GET", "/admin/tenants/acme")
    assert view["meters"]["chain_deployments"]["limit"] == 100
    assert view["meters"]["chain_deployments"]["source"] == "plan"


async def test_override_replace_is_audited_with_before(admin: Admin) -> None:
    await admin.call("PUT", "/admin/tenants/acme/overrides/storage_gb", {"limit": 20})
    status, view, _ = await admin.call("PUT", "/admin/tenants/acme/overrides/storage_gb", {"limit": None})
    assert status == 200 and view["meters"]["storage_gb"]["limit"] is None
    assert view["meters"]["storage_gb"]["remaining"] is None
    _, audit, _ = await admin.call("GET", "/admin/audit?tenant=acme&limit=1")
    entry = audit["entries"][0]
    assert entry["before"]["limit"] == 20 and entry["after"]["limit"] is None


async def test_rate_override(admin: Admin) -> None:
    await admin.call("PUT", "/admin/tenants/acme", {})
    status, view, _ = await admin.call("PUT", "/admin/tenants/acme/overrides/rate", {"per_second": 2.5, "burst": 4})
    assert status == 200 and view["rate"] == {"per_second": 2.5, "burst": 4, "source": "override", "shadow": None}
    _, view, _ = await admin.call("PUT", "/admin/tenants/acme/overrides/rate", {"per_second": None})
    assert view["rate"] == {"per_second": None, "burst": None, "source": "override", "shadow": None}
    status, _, _ = await admin.call("DELETE", "/admin/tenants/acme/overrides/rate")
    assert status == 204
    _, view, _ = await admin.call("GET", "/admin/tenants/acme")
    assert view["rate"] == {"per_second": 10, "burst": 20, "source": "plan", "shadow": None}


async def test_shadow_override_keeps_the_enforced_limit_and_the_view_lists_shadow_hits(admin: Admin) -> None:
    admin.usage.add("acme", PERIOD_START, chain_deployments=30)
    admin.usage.hits[("acme", PERIOD_START)] = {("quota", "chain_deployments"): 7, ("rate", "rate"): 9}
    status, view, _ = await admin.call("PUT", "/admin/tenants/acme/overrides/chain_deployments", {
        "limit": 25, "enforce": "shadow", "reason": "trying the next plan"})
    assert status == 200
    deployments = view["meters"]["chain_deployments"]
    assert (deployments["limit"], deployments["shadow_limit"], deployments["remaining"]) == (100, 25, 70)
    assert deployments["source"] == "override"
    assert view["shadow_rejections"] == [{"reason": "rate", "meter": "rate", "count": 9},
                                         {"reason": "quota", "meter": "chain_deployments", "count": 7}]
    _, view, _ = await admin.call("PUT", "/admin/tenants/acme/overrides/rate", {"per_second": 1, "enforce": "shadow"})
    assert view["rate"] == {"per_second": 10, "burst": 20, "source": "override",
                            "shadow": {"per_second": 1, "burst": 20}}
    record = admin.directory.get("acme")
    assert record is not None and {o.meter: o.enforce for o in record.overrides} == {
        "chain_deployments": "shadow", "rate": "shadow"}
    _, audit, _ = await admin.call("GET", "/admin/audit?tenant=acme&limit=2")
    assert [e["after"]["enforce"] for e in audit["entries"]] == ["shadow", "shadow"]
    # Enforced again (null or "on" alike): the shadow limit goes, the override's limit is enforced.
    _, view, _ = await admin.call("PUT", "/admin/tenants/acme/overrides/chain_deployments",
                                  {"limit": 25, "enforce": None})
    assert (view["meters"]["chain_deployments"]["limit"], view["meters"]["chain_deployments"]["shadow_limit"]) == (
        25, None)


async def test_override_delete(admin: Admin) -> None:
    await admin.call("PUT", "/admin/tenants/acme/overrides/chains", {"limit": 4})
    status, body, _ = await admin.call("DELETE", "/admin/tenants/acme/overrides/chains", auth=admin_jwt())
    assert status == 204 and body is None
    _, view, _ = await admin.call("GET", "/admin/tenants/acme")
    assert view["meters"]["chains"]["limit"] == 1 and view["meters"]["chains"]["source"] == "plan"
    assert admin.directory.get("acme").overrides == ()  # type: ignore[union-attr]
    _, audit, _ = await admin.call("GET", "/admin/audit?limit=1")
    entry = audit["entries"][0]
    assert entry["action"] == "override.delete" and entry["actor"] == "jwt:alice"
    assert entry["before"]["limit"] == 4 and entry["after"] is None
    status, body, _ = await admin.call("DELETE", "/admin/tenants/acme/overrides/chains")
    assert status == 404 and body["type"].endswith("/not-found")


async def test_override_delete_of_unknown_tenant_is_404(admin: Admin) -> None:
    status, _, _ = await admin.call("DELETE", "/admin/tenants/ghost/overrides/chains")
    assert status == 404


# --------------------------------------------------------------------------- audit


async def test_audit_is_paged_newest_first(admin: Admin) -> None:
    for i in range(5):
        admin.clock.now = START + timedelta(minutes=i)
        await admin.call("PUT", f"/admin/tenants/t{i}", {})
    await admin.call("PUT", "/admin/tenants/t0", {"plan": "sovereign"})
    tenants: list[str] = []
    cursor = None
    while True:
        _, page, _ = await admin.call("GET", "/admin/audit?limit=4" + (f"&cursor={cursor}" if cursor else ""))
        tenants += [e["tenant"] for e in page["entries"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert tenants == ["t0", "t4", "t3", "t2", "t1", "t0"]
    _, only, _ = await admin.call("GET", "/admin/audit?tenant=t0")
    assert [e["action"] for e in only["entries"]] == ["tenant.update", "tenant.create"]


# --------------------------------------------------------------------------- alerts and store faults


async def test_alerts_of_this_period_are_in_the_view(admin: Admin) -> None:
    await admin.call("PUT", "/admin/tenants/acme", {})
    async with admin.sessions() as session, session.begin():
        session.add(AlertEvent(tenant_id="acme", meter="chain_deployments", value=80, threshold=0.8,
                               period_start=datetime(2026, 12, 1, tzinfo=UTC),
                               at=datetime(2026, 12, 10, tzinfo=UTC)))
        session.add(AlertEvent(tenant_id="acme", meter="chain_deployments", value=100, threshold=1.0,
                               period_start=datetime(2026, 11, 1, tzinfo=UTC),
                               at=datetime(2026, 11, 20, tzinfo=UTC)))
    _, view, _ = await admin.call("GET", "/admin/tenants/acme")
    assert view["alerts"] == [{"meter": "chain_deployments", "threshold": 0.8, "at": "2026-12-10T00:00:00Z"}]


async def test_usage_store_down_is_503_not_500(admin: Admin) -> None:
    await admin.call("PUT", "/admin/tenants/acme", {})
    admin.usage.down = True
    status, body, response = await admin.call("GET", "/admin/tenants/acme")
    assert status == 503 and body["type"].endswith("/limiter-unavailable")
    assert response.content_type == PROBLEM


# --------------------------------------------------------------------------- validation

TENANT_CASES = [
    ("bad-json", b"{not json", "body"),
    ("nan", b'{"billing_anchor_day": NaN}', "body"),
    ("array", b"[1, 2]", "body"),
    ("string", b'"acme"', "body"),
    ("empty", b"", "body"),
    ("unknown-field", {"plan": "starter", "colour": "red"}, "colour"),
    ("plan-type", {"plan": 5}, "plan"),
    ("plan-null", {"plan": None}, "plan"),
    ("unknown-plan", {"plan": "platinum"}, "plan"),
    ("status", {"status": "deleted"}, "status"),
    ("status-type", {"status": True}, "status"),
    ("customer-type", {"stripe_customer_id": 42}, "stripe_customer_id"),
    ("customer-empty", {"stripe_customer_id": ""}, "stripe_customer_id"),
    ("anchor-0", {"billing_anchor_day": 0}, "billing_anchor_day"),
    ("anchor-29", {"billing_anchor_day": 29}, "billing_anchor_day"),
    ("anchor-str", {"billing_anchor_day": "5"}, "billing_anchor_day"),
    ("anchor-bool", {"billing_anchor_day": True}, "billing_anchor_day"),
    ("anchor-float", {"billing_anchor_day": 5.5}, "billing_anchor_day"),
]


@pytest.mark.parametrize(("body", "field"), [c[1:] for c in TENANT_CASES], ids=[c[0] for c in TENANT_CASES])
async def test_tenant_body_validation(admin: Admin, body: Any, field: str) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, problem, response = await admin.call("PUT", "/admin/tenants/acme", raw=raw)
    assert status == 400, problem
    assert response.content_type == PROBLEM and problem["type"].endswith("/invalid-request")
    assert field in [e["field"] for e in problem["errors"]]
    # nothing was created, nothing audited
    assert (await admin.call("GET", "/admin/tenants/acme"))[0] == 404
    assert (await admin.call("GET", "/admin/audit"))[1]["entries"] == []


@pytest.mark.parametrize("tenant", ["a" * 65, "acme%20co", "acme%2Fco", "ac%C3%A9", "a;b", "a%00b"])
@pytest.mark.parametrize(("method", "suffix", "body"), [
    ("GET", "", None), ("PUT", "", {}), ("PUT", "/overrides/chains", {"limit": 1}),
    ("DELETE", "/overrides/chains", None),
])
async def test_bad_tenant_ids(admin: Admin, tenant: str, method: str, suffix: str, body: Any) -> None:
    status, problem, _ = await admin.call(method, f"/admin/tenants/{tenant}{suffix}", body)
    assert status == 400, problem
    assert problem["errors"][0]["field"] == "tenant"


async def test_longest_tenant_id_is_fine(admin: Admin) -> None:
    assert (await admin.call("PUT", "/admin/tenants/" + "a" * 64, {}))[0] == 201


OVERRIDE_CASES = [
    ("unknown-meter", "nope", {"limit": 1}, "meter"),
    ("negative", "chains", {"limit": -1}, "limit"),
    ("fraction", "chains", {"limit": 1.5}, "limit"),
    ("string", "chains", {"limit": "10"}, "limit"),
    ("bool", "chains", {"limit": True}, "limit"),
    ("missing", "chains", {"reason": "x"}, "limit"),
    ("huge", "chains", {"limit": 2**64}, "limit"),
    ("unknown-field", "chains", {"limit": 1, "per_second": 3}, "per_second"),
    ("expires-format", "chains", {"limit": 1, "expires_at": "tomorrow"}, "expires_at"),
    ("expires-no-offset", "chains", {"limit": 1, "expires_at": "2027-01-01T00:00:00"}, "expires_at"),
    ("expires-date", "chains", {"limit": 1, "expires_at": "2027-01-01"}, "expires_at"),
    ("expires-bad-day", "chains", {"limit": 1, "expires_at": "2027-02-30T00:00:00Z"}, "expires_at"),
    ("expires-type", "chains", {"limit": 1, "expires_at": 1767225600}, "expires_at"),
    ("expires-past", "chains", {"limit": 1, "expires_at": "2026-12-01T00:00:00Z"}, "expires_at"),
    ("reason-type", "chains", {"limit": 1, "reason": ["a"]}, "reason"),
    ("reason-long", "chains", {"limit": 1, "reason": "x" * 1001}, "reason"),
    ("rate-zero", "rate", {"per_second": 0}, "per_second"),
    ("rate-missing", "rate", {"burst": 3}, "per_second"),
    ("rate-string", "rate", {"per_second": "5"}, "per_second"),
    ("rate-burst", "rate", {"per_second": 5, "burst": 0}, "burst"),
    # a JSON integer too large for a float (math.isfinite raised OverflowError: a 500)
    ("rate-huge-int", "rate", b'{"per_second": 1' + b"0" * 400 + b"}", "per_second"),
    ("limit-huge-int", "chains", b'{"limit": 1' + b"0" * 400 + b"}", "limit"),
    ("rate-limit-field", "rate", {"per_second": 5, "limit": 3}, "limit"),
    ("bad-json", "chains", b"{", "body"),
    ("array", "chains", b"[]", "body"),
    ("enforce-value", "chains", {"limit": 1, "enforce": "off"}, "enforce"),
    ("enforce-type", "chains", {"limit": 1, "enforce": True}, "enforce"),
    ("enforce-list", "chains", {"limit": 1, "enforce": ["shadow"]}, "enforce"),
    ("rate-enforce", "rate", {"per_second": 5, "enforce": "Shadow"}, "enforce"),
]


@pytest.mark.parametrize(("meter", "body", "field"), [c[1:] for c in OVERRIDE_CASES],
                         ids=[c[0] for c in OVERRIDE_CASES])
async def test_override_body_validation(admin: Admin, meter: str, body: Any, field: str) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, problem, _ = await admin.call("PUT", f"/admin/tenants/acme/overrides/{meter}", raw=raw)
    assert status == 400, problem
    assert problem["type"].endswith("/invalid-request")
    assert field in [e["field"] for e in problem["errors"]]
    assert (await admin.call("GET", "/admin/tenants/acme"))[0] == 404


async def test_several_problems_are_reported_together(admin: Admin) -> None:
    _, problem, _ = await admin.call("PUT", "/admin/tenants/acme", {"plan": "x", "status": "y", "z": 1})
    assert {e["field"] for e in problem["errors"]} == {"plan", "status", "z"}


async def test_unknown_meter_on_delete_is_400(admin: Admin) -> None:
    status, problem, _ = await admin.call("DELETE", "/admin/tenants/acme/overrides/nope")
    assert status == 400 and problem["errors"][0]["field"] == "meter"


@pytest.mark.parametrize("method", ["PUT", "DELETE"])
async def test_unknown_meter_is_named_in_the_400(admin: Admin, method: str) -> None:
    status, problem, _ = await admin.call(method, "/admin/tenants/acme/overrides/no_such_meter",
                                          {"limit": 1} if method == "PUT" else None)
    assert status == 400
    assert problem["errors"][0]["field"] == "meter"
    assert problem["errors"][0]["message"].startswith("unknown meter 'no_such_meter' (known: ")
    assert "'no_such_meter'" in problem["detail"]


async def test_unknown_plan_is_named_in_the_400(admin: Admin) -> None:
    status, problem, _ = await admin.call("PUT", "/admin/tenants/acme", {"plan": "platinum"})
    assert status == 400
    assert problem["errors"] == [{"field": "plan", "message": "unknown plan 'platinum' (known: enterprise, "
                                                              "professional, sovereign, starter, team)"}]


async def test_an_unknown_name_is_quoted_safely_and_bounded(admin: Admin) -> None:
    _, problem, _ = await admin.call("PUT", "/admin/tenants/acme", {"plan": "p\r\n" + "x" * 500})
    message = problem["errors"][0]["message"]
    assert message.startswith("unknown plan 'p\\r\\nxxx") and "\r" not in message and len(message) < 200


async def test_expires_at_with_offset_and_fraction(admin: Admin) -> None:
    status, _, _ = await admin.call("PUT", "/admin/tenants/acme/overrides/chains", {
        "limit": 2, "expires_at": "2026-12-20T01:30:00.123456789+01:30"})
    assert status == 200
    _, audit, _ = await admin.call("GET", "/admin/audit?limit=1")
    assert audit["entries"][0]["after"]["expires_at"] == "2026-12-20T00:00:00.123456Z"


@pytest.mark.parametrize("path", ["/admin/tenants", "/admin/audit"])
@pytest.mark.parametrize(("query", "field"), [
    ("limit=0", "limit"), ("limit=501", "limit"), ("limit=abc", "limit"), ("limit=-1", "limit"),
    ("limit=", "limit"), ("cursor=garbage!", "cursor"), ("cursor=WyJ4IiwxXQ", "cursor"),
])
async def test_query_validation(admin: Admin, path: str, query: str, field: str) -> None:
    status, problem, _ = await admin.call("GET", f"{path}?{query}")
    assert status == 400, problem
    assert problem["errors"][0]["field"] == field


async def test_audit_tenant_filter_is_validated(admin: Admin) -> None:
    status, problem, _ = await admin.call("GET", "/admin/audit?tenant=" + "x" * 65)
    assert status == 400 and problem["errors"][0]["field"] == "tenant"


async def test_cursor_of_one_list_is_refused_by_the_other(admin: Admin) -> None:
    for name in ("a", "b"):
        await admin.call("PUT", f"/admin/tenants/{name}", {})
    _, page, _ = await admin.call("GET", "/admin/tenants?limit=1")
    status, problem, _ = await admin.call("GET", f"/admin/audit?cursor={page['next_cursor']}")
    assert status == 400 and problem["errors"][0]["field"] == "cursor"
