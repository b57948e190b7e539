"""The console over HTTP on a real worker (real sockets, Redis, SQLite): sessions, CSRF, changes, errors."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
from sqlalchemy import select
from yarl import URL

from gateway.app import Worker
from metering.models import AuditEntry, LedgerEntry
from tests.gateway.console.conftest import CI_TOKEN, OPS_TOKEN, ConsoleClient, csrf_of, park_row
from tests.support import bearer, token

STRICT_CSP = ("default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
              "frame-ancestors 'none'; base-uri 'none'")


def admin_jwt(**claims: Any) -> str:
    claims.setdefault("scope", "openid gateway:admin")
    claims.setdefault("sub", "alice")
    return token(None, **claims)


async def _audit(worker: Worker) -> list[AuditEntry]:
    async with worker.sessions() as session:
        return list((await session.scalars(select(AuditEntry).order_by(AuditEntry.id))).all())


# --------------------------------------------------------------------------- sign-in, sessions


async def test_pages_need_a_session_and_send_the_strict_csp(console: ConsoleClient) -> None:
    status, _, response = await console.get("/admin/ui/tenants?q=ac")
    assert status == 303
    location = URL(response.headers["Location"])
    assert (location.path, location.query["next"]) == ("/admin/ui/sign-in", "/admin/ui/tenants?q=ac")
    assert response.headers["Content-Security-Policy"] == STRICT_CSP
    status, _, response = await console.get("/admin/ui")
    assert (status, response.headers["Location"]) == (303, "/admin/ui/")
    status, page, response = await console.get("/admin/ui/sign-in")
    assert status == 200 and "<form" in page
    assert response.headers["Content-Security-Policy"] == STRICT_CSP
    assert response.headers["X-Frame-Options"] == "DENY" and response.headers["Cache-Control"] == "no-store"
    assert "<script" not in page and "style=" not in page
    status, css, response = await console.get("/admin/ui/static/console.css")
    assert status == 200 and response.content_type == "text/css" and "svg.chart" in css


async def test_sign_in_sets_a_strict_http_only_cookie_and_sign_out_ends_it(console: ConsoleClient) -> None:
    _, page, _ = await console.get("/admin/ui/sign-in")
    status, _, response = await console.post("/admin/ui/sign-in", {
        "csrf": csrf_of(page), "token": OPS_TOKEN, "next": "/admin/ui/audit"})
    assert (status, response.headers["Location"]) == (303, "/admin/ui/audit")
    cookie = next(v for v in response.headers.getall("Set-Cookie") if v.startswith("cosmos_console="))
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/admin/ui" in cookie
    status, page, _ = await console.get("/admin/ui/audit")
    assert status == 200 and "token:ops" in page
    status, _, response = await console.post("/admin/ui/sign-out", {"csrf": csrf_of(page)})
    assert (status, response.headers["Location"]) == (303, "/admin/ui/sign-in?signed_out=1")
    assert (await console.get("/admin/ui/audit"))[0] == 303


async def test_a_wrong_token_is_refused_and_named(console: ConsoleClient) -> None:
    _, page, _ = await console.get("/admin/ui/sign-in")
    status, page, response = await console.post("/admin/ui/sign-in", {"csrf": csrf_of(page),
                                                                      "token": "not-the-token-0123456789"})
    assert status == 401 and "neither an admin token" in page and 'aria-invalid="true"' in page
    assert not any(v.startswith("cosmos_console=") for v in response.headers.getall("Set-Cookie", []))
    # Not visible ASCII: refused the same way, never a 500.
    status, _, _ = await console.post("/admin/ui/sign-in", {"csrf": csrf_of(page), "token": "tok\u00a0en"})
    assert status == 401


async def test_an_admin_jwt_signs_in_and_one_without_the_scope_does_not(console: ConsoleClient) -> None:
    _, page, _ = await console.get("/admin/ui/sign-in")
    status, page, _ = await console.post("/admin/ui/sign-in", {"csrf": csrf_of(page),
                                                               "token": admin_jwt(scope="openid")})
    assert status == 403 and "scope" in page
    status, _, response = await console.post("/admin/ui/sign-in", {"csrf": csrf_of(page),
                                                                   "token": admin_jwt(ttl=120)})
    assert status == 303
    cookie = next(v for v in response.headers.getall("Set-Cookie") if v.startswith("cosmos_console="))
    max_age = int(cookie.split("Max-Age=")[1].split(";")[0])
    assert max_age <= 120  # the session ends with the JWT
    status, page, _ = await console.get("/admin/ui/")
    assert status == 200 and "jwt:alice" in page


async def test_sign_in_without_its_csrf_token_is_refused(console: ConsoleClient) -> None:
    await console.get("/admin/ui/sign-in")
    status, _, _ = await console.post("/admin/ui/sign-in", {"token": OPS_TOKEN})
    assert status == 403


async def test_a_forged_or_foreign_cookie_is_no_session(console: ConsoleClient) -> None:
    await console.sign_in()
    cookie = next(c for c in console.http.cookie_jar if c.key == "cosmos_console")
    payload, signature = cookie.value.split(".")
    forged = payload[:-2] + ("AA" if payload[-2:] != "AA" else "BB") + "." + signature
    async with aiohttp.ClientSession() as other:
        for value in (forged, "x" * 5000, "garbage", ""):
            async with other.get(console.base + "/admin/ui/", cookies={"cosmos_console": value},
                                 allow_redirects=False) as response:
                assert response.status == 303, value[:20]


# --------------------------------------------------------------------------- CSRF and origin


async def test_a_post_without_the_csrf_token_is_refused(console: ConsoleClient) -> None:
    await console.sign_in()
    form = {"tenant": "acme", "meter": "chain_deployments", "limit": "5"}
    status, page, _ = await console.post("/admin/ui/tenant/override", form)
    assert status == 403 and "CSRF token" in page and "<h1>403 Forbidden</h1>" in page
    async with console.http.post(console.base + "/admin/ui/tenant/override", data={**form, "csrf": "wrong"},
                                 headers={"Accept": "application/json"}, allow_redirects=False) as response:
        assert response.status == 403 and response.content_type == "application/problem+json"
        problem = await response.json()
        assert problem["type"].endswith("/forbidden") and "CSRF" in problem["detail"]
    assert [e.action for e in await _audit(console.worker)] == []  # nothing changed


async def test_a_post_from_another_origin_is_refused_even_with_the_token(console: ConsoleClient) -> None:
    csrf = await console.sign_in()
    form = {"csrf": csrf, "tenant": "acme", "meter": "chain_deployments", "limit": "5"}
    status, _, _ = await console.post("/admin/ui/tenant/override", form, headers={"Origin": "http://evil.test"})
    assert status == 403
    status, _, _ = await console.post("/admin/ui/tenant/override", form,
                                      headers={"Referer": "http://evil.test/admin/ui/"})
    assert status == 403
    status, _, _ = await console.post("/admin/ui/tenant/override", form, headers={"Origin": console.base})
    assert status == 303


async def test_a_post_without_a_session_is_refused(console: ConsoleClient) -> None:
    status, _, _ = await console.post("/admin/ui/sync/requeue", {"identifier": "x", "csrf": "y"})
    assert status == 403


async def test_an_oversized_form_is_413(console: ConsoleClient) -> None:
    csrf = await console.sign_in()
    status, _, _ = await console.post("/admin/ui/tenant/override", {"csrf": csrf, "reason": "r" * 20_000})
    assert status == 413


# --------------------------------------------------------------------------- changes through the admin API's code


async def test_an_override_set_in_the_console_is_audited_and_seen_by_the_api(console: ConsoleClient) -> None:
    csrf = await console.sign_in()
    status, _, response = await console.post("/admin/ui/tenant/override", {
        "csrf": csrf, "tenant": "acme", "meter": "chain_deployments", "limit": "250",
        "expires_at": "2099-01-31T12:30", "reason": "launch week"})
    assert (status, response.headers["Location"]) == (303, "/admin/ui/tenant?id=acme&done=override-saved")
    entries = await _audit(console.worker)
    assert [(e.actor, e.action) for e in entries] == [("token:ops", "tenant.create"), ("token:ops", "override.put")]
    assert entries[1].after == {"meter": "chain_deployments", "limit": 250, "expires_at": "2099-01-31T12:30:00Z",
                                "reason": "launch week", "enforce": "on"}
    async with aiohttp.ClientSession() as api:
        async with api.get(f"{console.base}/admin/tenants/acme",
                           headers={"Authorization": f"Bearer {CI_TOKEN}"}) as answer:
            view = await answer.json()
    assert view["meters"]["chain_deployments"]["limit"] == 250
    assert view["meters"]["chain_deployments"]["source"] == "override"
    status, page, _ = await console.get("/admin/ui/tenant?id=acme&done=override-saved")
    assert status == 200 and "Override saved." in page and "launch week" in page and "2099-01-31T12:30:00Z" in page


async def test_bad_override_input_names_the_field(console: ConsoleClient) -> None:
    csrf = await console.sign_in()
    for form, field in (({"limit": "ten"}, "limit"), ({"limit": "-3"}, "limit"), ({}, "limit"),
                        ({"limit": "5", "expires_at": "yesterday"}, "expires_at"),
                        ({"limit": "5", "expires_at": "2001-01-01T00:00"}, "expires_at"),
                        ({"limit": "5", "meter": "nope"}, "meter"), ({"limit": "5", "tenant": "a b"}, "tenant")):
        body = {"csrf": csrf, "tenant": "acme", "meter": "chain_deployments", **form}
        status, page, _ = await console.post("/admin/ui/tenant/override", body)
        assert status == 400, (form, page[:300])
        assert f"<strong>{field}</strong>" in page, form
    async with console.http.post(console.base + "/admin/ui/tenant/override",
                                 data={"csrf": csrf, "tenant": "acme", "meter": "chain_deployments", "limit": "x"},
                                 headers={"Accept": "application/json"}) as response:
        # Not a browser: the same problem+json as the admin API.
        assert response.status == 400 and response.content_type == "application/problem+json"
        problem = await response.json()
        assert problem["type"].endswith("/invalid-request") and problem["errors"][0]["field"] == "limit"
    assert [e.action for e in await _audit(console.worker)] == []


async def test_plan_and_status_change_and_override_removal(console: ConsoleClient) -> None:
    csrf = await console.sign_in()
    status, _, _ = await console.post("/admin/ui/tenant/plan", {"csrf": csrf, "tenant": "acme",
                                                                "plan": "professional", "status": "suspended"})
    assert status == 303
    status, page, _ = await console.post("/admin/ui/tenant/plan", {"csrf": csrf, "tenant": "acme", "plan": "gold"})
    assert status == 400 and "<strong>plan</strong>" in page
    await console.post("/admin/ui/tenant/override", {"csrf": csrf, "tenant": "acme", "meter": "rate",
                                                     "per_second": "2.5", "burst": "5"})
    status, _, _ = await console.post("/admin/ui/tenant/override/delete", {"csrf": csrf, "tenant": "acme",
                                                                           "meter": "rate"})
    assert status == 303
    status, _, _ = await console.post("/admin/ui/tenant/override/delete", {"csrf": csrf, "tenant": "acme",
                                                                           "meter": "rate"})
    assert status == 404
    record = console.worker.directory.get("acme")
    assert record is not None and (record.plan, record.status, record.overrides) == ("professional", "suspended", ())
    assert [e.action for e in await _audit(console.worker)] == [
        "tenant.create", "override.put", "override.delete"]
    assert (await _audit(console.worker))[0].after["status"] == "suspended"


async def test_retry_now_requeues_a_parked_row_and_audits_it(console: ConsoleClient) -> None:
    identifier = await park_row(console.worker)
    csrf = await console.sign_in()
    status, page, _ = await console.get("/admin/ui/sync")
    assert status == 200 and "no_customer" in page and identifier in page
    status, _, response = await console.post("/admin/ui/sync/requeue", {"csrf": csrf, "identifier": identifier})
    assert (status, response.headers["Location"]) == (303, "/admin/ui/sync?done=requeued")
    async with console.worker.sessions() as session:
        row = await session.scalar(select(LedgerEntry).where(LedgerEntry.identifier == identifier))
    assert row is not None and row.state == "pending" and row.next_attempt_at is None
    [entry] = await _audit(console.worker)
    assert (entry.actor, entry.action, entry.tenant_id) == ("token:ops", "sync.requeue", "acme")
    assert (entry.before["state"], entry.after["state"], entry.before["reason"]) == ("parked", "pending", "no_customer")
    status, _, _ = await console.post("/admin/ui/sync/requeue", {"csrf": csrf, "identifier": identifier})
    assert status == 404  # no longer parked: nothing to retry, nothing audited twice
    status, _, _ = await console.post("/admin/ui/sync/requeue", {"csrf": csrf, "identifier": ""})
    assert status == 400


# --------------------------------------------------------------------------- pages and their input


async def test_tenants_are_searched_by_prefix_and_paged(console: ConsoleClient) -> None:
    csrf = await console.sign_in()
    for i in range(30):
        await console.post("/admin/ui/tenant/plan", {"csrf": csrf, "tenant": f"org-{i:02d}", "plan": "starter"})
    await console.post("/admin/ui/tenant/plan", {"csrf": csrf, "tenant": "other", "plan": "starter"})
    async with aiohttp.ClientSession() as proxy:  # a tenant seen in traffic only
        async with proxy.get(f"http://127.0.0.1:{console.worker.proxy_port}/api/chains",
                             headers=bearer("org-15b")) as response:
            assert response.status == 200
    status, page, _ = await console.get("/admin/ui/tenants?q=org-1")
    assert status == 200
    assert page.count("/admin/ui/tenant?id=org-1") == 11 and "org-15b" in page and "other" not in page
    status, page, _ = await console.get("/admin/ui/tenants")
    assert "org-00" in page and "org-25" not in page and "after=org-23" in page
    status, page, _ = await console.get("/admin/ui/tenants?after=org-23")
    assert "org-24" in page and "other" in page and "org-23<" not in page
    for query, field in (("q=%3Cscript%3E", "q"), ("after=a%20b", "after")):
        status, page, _ = await console.get(f"/admin/ui/tenants?{query}")
        assert status == 400 and f"<strong>{field}</strong>" in page
        assert "<script>" not in page


async def test_audit_filters(console: ConsoleClient) -> None:
    csrf = await console.sign_in()
    await console.post("/admin/ui/tenant/plan", {"csrf": csrf, "tenant": "acme", "plan": "professional"})
    await console.post("/admin/ui/tenant/plan", {"csrf": csrf, "tenant": "beta", "plan": "professional"})
    status, page, _ = await console.get("/admin/ui/audit?tenant=beta")
    assert status == 200 and "tenant?id=beta" in page and "tenant?id=acme" not in page
    status, page, _ = await console.get("/admin/ui/audit?actor=token:ci")
    assert status == 200 and "No entries." in page
    status, page, _ = await console.get("/admin/ui/audit?action=tenant.create&actor=token:ops")
    assert page.count("<td>tenant.create</td>") == 2
    for query, field in (("tenant=a%20b", "tenant"), ("before=x", "before"), ("actor=" + "a" * 300, "actor")):
        status, page, _ = await console.get(f"/admin/ui/audit?{query}")
        assert status == 400 and f"<strong>{field}</strong>" in page


async def test_unknown_and_bad_tenants(console: ConsoleClient) -> None:
    await console.sign_in()
    status, page, _ = await console.get("/admin/ui/tenant?id=ghost")
    assert status == 404
    assert (await console.get("/admin/ui/tenant?id=.."))[0] == 404  # a valid id, in a query: never a path
    for query in ("id=a%2Fb", "", "id=" + "a" * 65, "id=%FF"):
        status, page, _ = await console.get(f"/admin/ui/tenant?{query}")
        assert status == 400 and "<strong>id</strong>" in page, query
    status, _, _ = await console.get("/admin/ui/nothing-here")
    assert status == 404
    async with console.http.put(console.base + "/admin/ui/tenants") as response:
        assert response.status == 405 and response.headers["Content-Security-Policy"] == STRICT_CSP


async def test_overview_shows_traffic_and_the_tenant_nearest_its_limit(console: ConsoleClient) -> None:
    csrf = await console.sign_in()
    await console.post("/admin/ui/tenant/override", {"csrf": csrf, "tenant": "acme", "meter": "api_calls",
                                                     "limit": "4"})
    async with aiohttp.ClientSession() as proxy:
        for _ in range(5):
            async with proxy.get(f"http://127.0.0.1:{console.worker.proxy_port}/api/chains",
                                 headers=bearer("acme")) as response:
                await response.read()
    status, page, _ = await console.get("/admin/ui/")
    assert status == 200
    assert 'aria-label="acme api_calls: 4 of 4 used"' in page
    assert "<dt>quota</dt><dd>1</dd>" in page  # the fifth call was refused
    assert 'class="chart"' in page and "Requests per minute" in page


async def test_the_admin_api_is_unchanged_beside_the_console(console: ConsoleClient) -> None:
    async with aiohttp.ClientSession() as api:
        async with api.get(f"{console.base}/admin/tenants", headers={"Authorization": f"Bearer {OPS_TOKEN}"}) as r:
            assert r.status == 200 and "tenants" in json.loads(await r.text())
        async with api.get(f"{console.base}/admin/uix") as r:
            assert r.status == 401  # the API's, not the console's
        async with api.get(f"{console.base}/admin/ui/", allow_redirects=False,
                           headers={"Authorization": f"Bearer {OPS_TOKEN}"}) as r:
            assert r.status == 303  # the console takes cookies only: a bearer header is no session
