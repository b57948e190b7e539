"""The usage page's links, page sessions and Stripe's billing portal over real sockets: in-process gateway workers
on the test's redis-server and SQLite, live against the Stripe emulator (called through the real `stripe` library).
The browser's view of the same is test_browser.py."""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from gateway.admin.openapi import admin_openapi
from gateway.app import Worker
from gateway.cli.devservices import free_port
from gateway.portal.endpoints import COOKIE
from tests.billing_sync.stripe_emulator import StripeEmulator
from tests.gateway.portal.conftest import CUSTOMER, RETURN_URL, MovableClock, StartWorker, portal_config, set_customer
from tests.support import bearer, token

PROBLEM = "application/problem+json"
HTML = {"Accept": "text/html"}
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def proxy(worker: Worker) -> str:
    return f"http://127.0.0.1:{worker.proxy_port}"


async def new_link(worker: Worker, tenant: str = "acme", **headers: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.post(f"{proxy(worker)}/_gateway/portal-link",
                                                          headers={**bearer(tenant), **headers}) as response:
        assert response.status == 200, await response.text()
        assert response.headers["Cache-Control"] == "no-store"
        return await response.json()


def browser() -> aiohttp.ClientSession:
    """A client that keeps cookies (127.0.0.1 included) and asks for HTML, as a browser does."""
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True), headers=HTML)


async def open_link(http: aiohttp.ClientSession, url: str) -> tuple[int, str, aiohttp.ClientResponse]:
    async with http.get(url, allow_redirects=False) as response:
        return response.status, await response.text(), response


async def test_a_link_is_signed_for_the_tenant_and_opens_the_page_once(start_worker: StartWorker,
                                                                      clock: MovableClock) -> None:
    worker = await start_worker()
    async with aiohttp.ClientSession() as http, http.post(f"{proxy(worker)}/_gateway/portal-link") as response:
        assert response.status == 401 and response.content_type == PROBLEM  # a tenant's JWT is required
    link = await new_link(worker)
    assert set(link) == {"url", "expires_at"}
    url = urlsplit(link["url"])
    assert (url.scheme, url.netloc) == ("http", f"127.0.0.1:{worker.proxy_port}")  # the Host the client used
    assert url.path.startswith("/_gateway/portal/p1.")
    expires = link["expires_at"]
    assert expires.endswith("Z") and 595 <= _epoch(expires) - clock() <= 600

    async with browser() as http:
        status, page, response = await open_link(http, link["url"])
        # The cookie is set, and the page refreshes to the usage page (a 303 would lose a SameSite=Strict
        # cookie on a navigation another site started: see gateway/portal/endpoints.py).
        assert status == 200, page
        assert '<meta http-equiv="refresh" content="0; url=/_gateway/portal">' in page
        cookie = response.cookies[COOKIE]
        assert cookie["httponly"] and cookie["samesite"] == "Strict" and cookie["path"] == "/_gateway/"
        assert not cookie["secure"] and 1700 <= int(cookie["max-age"]) <= 1800
        _strict_headers(response)
        async with http.get(f"{proxy(worker)}/_gateway/portal") as page_response:
            assert page_response.status == 200
            html = await page_response.text()
        assert '<h1>Usage this period</h1>' in html and ">acme<" in html
        _strict_headers(page_response)
        # Used: the same link again, in this browser or any other, is a clear 410 page.
        status, page, _ = await open_link(http, link["url"])
        assert status == 410 and "was used already" in page
    async with browser() as other:
        status, page, _ = await open_link(other, link["url"])
        assert status == 410
        status, page, _ = await open_link(other, f"{proxy(worker)}/_gateway/portal")
        assert status == 401 and "session has ended" in page  # no cookie, no page


async def test_links_are_one_time_across_workers_and_expire(start_worker: StartWorker, clock: MovableClock) -> None:
    # Two worker processes of one configuration share nothing but Redis (and the secrets the key comes from).
    first, second = await start_worker(), await start_worker()
    link = await new_link(first)
    moved = link["url"].replace(str(first.proxy_port), str(second.proxy_port))
    async with browser() as http:
        assert (await open_link(http, moved))[0] == 200  # issued by one worker, opened on the other
        assert (await open_link(http, link["url"]))[0] == 410  # and used up on both
        async with http.get(f"{proxy(first)}/_gateway/portal") as response:
            assert response.status == 200  # the session cookie is good on either worker
    late = await new_link(first)
    clock.advance(601)
    async with browser() as http:
        status, page, _ = await open_link(http, late["url"])
        assert status == 410 and "expired" in page
        # Not HTML-minded: the same answer as problem+json.
        async with aiohttp.ClientSession() as plain, plain.get(late["url"]) as response:
            body = await response.json(content_type=PROBLEM)
        assert response.status == 410 and body["type"].endswith("/link-gone")
        forged = late["url"][:-3] + "AAA"
        status, page, _ = await open_link(http, forged)
        assert status == 404 and "Not a usage page link" in page
        # A HEAD (a link preview, a checker) never uses a link up.
        fresh = await new_link(first)
        async with http.head(fresh["url"]) as response:
            assert response.status == 405 and response.headers["Allow"] == "GET"
        assert (await open_link(http, fresh["url"]))[0] == 200


async def test_the_page_session_ends(start_worker: StartWorker, clock: MovableClock) -> None:
    worker = await start_worker()
    async with browser() as http:
        assert (await open_link(http, (await new_link(worker))["url"]))[0] == 200
        clock.advance(29 * 60)
        async with http.get(f"{proxy(worker)}/_gateway/portal") as response:
            assert response.status == 200
        clock.advance(2 * 60)
        async with http.get(f"{proxy(worker)}/_gateway/portal") as response:
            assert response.status == 401


async def test_the_link_url_follows_a_trusted_proxy_and_refuses_a_bad_host(start_worker: StartWorker) -> None:
    worker = await start_worker(listen={"trusted_proxies": ["127.0.0.1/32"]})
    link = await new_link(worker, **{"X-Forwarded-Proto": "https", "X-Forwarded-Host": "api.cosmosbuilder.example"})
    assert link["url"].startswith("https://api.cosmosbuilder.example/_gateway/portal/p1.")
    untrusted = await start_worker()
    link = await new_link(untrusted, **{"X-Forwarded-Proto": "https", "X-Forwarded-Host": "evil.example"})
    assert link["url"].startswith(f"http://127.0.0.1:{untrusted.proxy_port}/")
    async with aiohttp.ClientSession() as http, http.post(
            f"{proxy(untrusted)}/_gateway/portal-link",
            headers={**bearer("acme"), "Host": "evil.example/<script>"}) as response:
        body = await response.json(content_type=PROBLEM)
    assert response.status == 400 and body["errors"][0]["field"] == "Host"
    link = await new_link(untrusted)
    async with aiohttp.ClientSession() as http, http.get(link["url"], headers={"Host": "evil.example/<x>"}) as response:
        assert response.status == 400 and (await response.json(content_type=PROBLEM))["errors"][0]["field"] == "Host"
    async with browser() as http:
        assert (await open_link(http, link["url"]))[0] == 200
    # Behind a TLS-terminating proxy the page's cookie is Secure.
    async with browser() as http:
        link = await new_link(worker, **{"X-Forwarded-Proto": "https"})
        async with http.get(link["url"].replace("https://", "http://"),
                            headers={"X-Forwarded-Proto": "https"}, allow_redirects=False) as response:
            assert response.status == 200 and response.cookies[COOKIE]["secure"]


async def test_redis_down_is_a_503_and_leaves_the_link_unused(start_worker: StartWorker) -> None:
    worker = await start_worker()
    link = await new_link(worker)
    down = await start_worker(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    async with browser() as http:
        status, page, response = await open_link(http, link["url"].replace(str(worker.proxy_port),
                                                                           str(down.proxy_port)))
        assert status == 503 and response.headers["Retry-After"] == "1" and "try it again shortly" in page
        assert COOKIE not in response.cookies
        assert (await open_link(http, link["url"]))[0] == 200  # not used up by the failed attempt


# --------------------------------------------------------------------------- Stripe's billing portal


async def portal(worker: Worker, tenant: str = "acme", **kwargs: Any) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.post(f"{proxy(worker)}/_gateway/billing/portal",
                                                          headers=bearer(tenant), **kwargs) as response:
        return response.status, json.loads(await response.text())


async def test_billing_portal_with_the_tenants_jwt(start_worker: StartWorker, stripe_emulator: StripeEmulator) -> None:
    worker = await start_worker()
    status, body = await portal(worker)
    assert status == 409 and body["type"].endswith("/no-stripe-customer") and body["tenant"] == "acme"
    await set_customer(worker, "acme", CUSTOMER)
    status, body = await portal(worker)
    assert status == 200 and set(body) == {"url"}, body
    (session,) = stripe_emulator.portal_sessions.values()
    assert body["url"] == session["url"] and session["customer"] == CUSTOMER
    assert session["return_url"] == RETURN_URL  # billing.stripe.portal_return_url
    async with aiohttp.ClientSession() as http, http.post(f"{proxy(worker)}/_gateway/billing/portal") as response:
        assert response.status == 401 and response.content_type == PROBLEM
    async with aiohttp.ClientSession() as http, http.get(f"{proxy(worker)}/_gateway/billing/portal",
                                                         headers=bearer("acme")) as response:
        assert response.status == 405 and response.headers["Allow"] == "POST"


async def test_billing_portal_errors(start_worker: StartWorker, stripe_emulator: StripeEmulator) -> None:
    worker = await start_worker()
    await set_customer(worker, "acme", "cus_unknown_to_stripe")
    status, body = await portal(worker)  # Stripe refuses: the operator's to fix, said as Stripe said it
    assert status == 502 and "No such customer: 'cus_unknown_to_stripe'" in body["detail"]
    await set_customer(worker, "acme", CUSTOMER)
    stripe_emulator.fail_next(1, 500, endpoint="billing_portal_sessions")
    status, body = await portal(worker)
    assert status == 503 and body["type"].endswith("/stripe-unavailable")
    stripe_emulator.drop_next(1, endpoint="billing_portal_sessions")
    status, body = await portal(worker)
    assert status == 503 and body["type"].endswith("/stripe-unavailable")
    dry = await start_worker(billing=portal_config(None))
    status, body = await portal(dry)
    assert status == 503 and body["type"].endswith("/stripe-dry-run")
    await set_customer(dry, "globex", None)
    status, body = await portal(dry, "globex")
    assert status == 409  # no customer is said first: it is the tenant's own state
    assert stripe_emulator.requests["billing_portal_sessions"] == 3


async def test_the_pages_button_redirects_to_stripe(start_worker: StartWorker,
                                                    stripe_emulator: StripeEmulator) -> None:
    worker = await start_worker()
    await set_customer(worker, "acme", CUSTOMER)
    async with browser() as http:
        assert (await open_link(http, (await new_link(worker))["url"]))[0] == 200
        async with http.get(f"{proxy(worker)}/_gateway/portal") as response:
            html = await response.text()
        assert 'action="/_gateway/billing/portal"' in html and ">Manage billing</button>" in html
        csrf = _CSRF.search(html)
        assert csrf is not None
        target = f"{proxy(worker)}/_gateway/billing/portal"
        origin = {"Origin": proxy(worker)}
        async with http.post(target, data={"csrf": csrf.group(1)}, headers=origin, allow_redirects=False) as response:
            assert response.status == 303
            (session,) = stripe_emulator.portal_sessions.values()
            assert response.headers["Location"] == session["url"]
            # The page's CSP lets its form lead to Stripe's portal (here the emulator), and nowhere else.
            assert f"form-action 'self' https://billing.stripe.com {stripe_emulator.url};" in \
                response.headers["Content-Security-Policy"]
        for data, headers, why in (({}, origin, "CSRF"), ({"csrf": "forged"}, origin, "CSRF"),
                                   ({"csrf": csrf.group(1)}, {"Origin": "https://evil.example"}, "another site")):
            async with http.post(target, data=data, headers=headers, allow_redirects=False) as response:
                assert response.status == 403 and why in await response.text()
    assert len(stripe_emulator.portal_sessions) == 1
    async with aiohttp.ClientSession() as http, http.post(target, data={"csrf": csrf.group(1)},
                                                          cookies={COOKIE: "s1.forged.mac"}) as response:
        assert response.status == 401 and response.content_type == PROBLEM  # an invalid credential


async def test_the_page_says_why_there_is_no_button(start_worker: StartWorker) -> None:
    for billing, customer, note in ((None, CUSTOMER, "not available"), ("live", None, "No billing account")):
        worker = await start_worker(billing=portal_config(None)) if billing is None else await start_worker()
        await set_customer(worker, "acme", customer)
        async with browser() as http:
            assert (await open_link(http, (await new_link(worker))["url"]))[0] == 200
            async with http.get(f"{proxy(worker)}/_gateway/portal") as response:
                html = await response.text()
        assert note in html and "Manage billing" not in html


async def test_the_endpoints_are_the_gateways_own(start_worker: StartWorker) -> None:
    worker = await start_worker()
    async with aiohttp.ClientSession() as http:
        for path in ("/_gateway/static/console.css", "/_gateway/static/portal.css"):
            async with http.get(f"{proxy(worker)}{path}") as response:
                assert response.status == 200 and response.content_type == "text/css"
        async with http.get(f"{proxy(worker)}/_gateway/static/other.css") as response:
            assert response.status == 404 and response.content_type == PROBLEM
        async with http.post(f"{proxy(worker)}/_gateway/portal-link",
                             headers={"Authorization": f"Bearer {token('acme', ttl=-120)}"}) as response:
            assert response.status == 401


def _strict_headers(response: aiohttp.ClientResponse) -> None:
    csp = response.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp and "script-src" not in csp
    assert response.headers["Cache-Control"] == "no-store" and response.headers["X-Frame-Options"] == "DENY"


def _epoch(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def test_both_endpoints_are_in_the_openapi_document() -> None:
    doc = admin_openapi("https://x/", history=True)
    link = doc["paths"]["/_gateway/portal-link"]["post"]
    assert link["security"] == [{"tenant_jwt": []}] and set(link["responses"]["200"]["content"]["application/json"]
                                                             ["schema"]["required"]) == {"url", "expires_at"}
    billing = doc["paths"]["/_gateway/billing/portal"]
    assert billing["servers"][0]["url"] == "/" and {"200", "303", "409", "503"} <= set(billing["post"]["responses"])
    assert "usage_page" in doc["components"]["securitySchemes"]
