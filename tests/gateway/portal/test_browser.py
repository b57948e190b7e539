"""The tenant usage page in a real browser: Debian's headless chromium driven by Playwright (as the console's
browser test), against an in-process gateway worker (real sockets, redis-server, SQLite, upstream) in live Stripe
mode on the Stripe emulator, and a stand-in for CosmosBuilder's web app on another site (`localhost` against the
gateway's `127.0.0.1`), which asks for a link with the customer's JWT and opens it in the browser.

With UPDATE_DOCS_SCREENSHOTS=1 the page's screenshot is copied to docs/tenant-usage-page.png.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from playwright.async_api import Browser, expect

from gateway.app import Worker
from tests.billing_sync.stripe_emulator import StripeEmulator
from tests.gateway.browser import DEADLINE_MS, acme_usage, assert_fits_a_phone, browser, shot  # noqa: F401
from tests.gateway.portal.conftest import CUSTOMER, MovableClock, StartWorker, portal_config, set_customer
from tests.support import bearer


class WebApp:
    """CosmosBuilder's web app, reduced to its part here: a page with a link to the customer's usage page, made
    server-side with the customer's JWT (`POST /_gateway/portal-link`), and the page Stripe's portal returns to."""

    def __init__(self, gateway: str) -> None:
        self.gateway = gateway
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> WebApp:
        app = web.Application()
        app.router.add_get("/", self.home)
        app.router.add_get("/billing", self.back)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://localhost:{self.runner.addresses[0][1]}"  # another site than 127.0.0.1
        return self

    async def home(self, _: web.Request) -> web.Response:
        async with aiohttp.ClientSession() as http, http.post(f"{self.gateway}/_gateway/portal-link",
                                                              headers=bearer("acme")) as answer:
            link = (await answer.json())["url"]
        return web.Response(text=f'<!doctype html><title>CosmosBuilder</title><h1>CosmosBuilder</h1>'
                                 f'<a href="{link}">Usage and billing</a>', content_type="text/html")

    async def back(self, _: web.Request) -> web.Response:
        return web.Response(text="<!doctype html><title>CosmosBuilder</title><h1>Back in CosmosBuilder</h1>",
                            content_type="text/html")

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def web_app() -> AsyncIterator[WebApp]:
    app = WebApp("")  # the gateway's address is known once it runs
    yield app
    await app.close()


async def test_a_customer_opens_the_usage_page_and_manages_billing(
        browser: Browser, start_worker: StartWorker, web_app: WebApp,  # noqa: F811
        stripe_emulator: StripeEmulator, clock: MovableClock) -> None:
    web_app_started = await web_app.start()
    worker: Worker = await start_worker(billing=portal_config(stripe_emulator.url,
                                                              portal_return_url=f"{web_app_started.url}/billing"))
    gateway = f"http://127.0.0.1:{worker.proxy_port}"
    web_app.gateway = gateway
    await set_customer(worker, "acme", CUSTOMER)
    await acme_usage(gateway)

    context = await browser.new_context(viewport={"width": 1100, "height": 900})
    context.set_default_timeout(DEADLINE_MS)
    page = await context.new_page()
    csp_violations: list[str] = []
    page.on("console", lambda m: csp_violations.append(m.text) if "Content Security Policy" in m.text else None)
    fetched_elsewhere: list[str] = []  # what a gateway page loads (not navigations) from another origin
    page.on("request", lambda r: None if r.is_navigation_request() or r.url.startswith(gateway)
            else fetched_elsewhere.append(r.url))

    # The customer follows the link in CosmosBuilder's app: another site, so the page's SameSite=Strict cookie
    # must survive a navigation that site started.
    await page.goto(f"{web_app.url}/")
    link = await page.get_by_role("link", name="Usage and billing").get_attribute("href")
    assert link is not None and link.startswith(f"{gateway}/_gateway/portal/p1.")
    await page.get_by_role("link", name="Usage and billing").click()
    await expect(page).to_have_url(f"{gateway}/_gateway/portal")
    await expect(page.get_by_role("heading", name="Usage this period")).to_be_visible()
    cookie = next(c for c in await context.cookies() if c["name"] == "cosmos_usage_page")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/_gateway/"

    # Usage per meter against the plan, the reset time, the forecast, the history chart.
    row = page.locator('#usage tr[data-meter="chain_deployments"]')
    await expect(row.locator("td.used")).to_have_text("15")
    await expect(row.locator("td.limit")).to_have_text("100")
    await expect(row.locator("td.remaining")).to_have_text("85")
    await expect(page.locator('#usage tr[data-meter="storage_gb"] td.used')).to_have_text("7.5")
    await expect(page.locator("#plan")).to_have_text("starter")
    await expect(page.locator("#resets-at")).to_contain_text(" 00:00 UTC")
    await expect(page.get_by_role("img", name="chain_deployments: 15 of 100 used")).to_be_visible()
    chart = page.locator('figure[data-meter="chain_deployments"]')
    await expect(chart.get_by_role("img", name="chain_deployments: used this period, forecast and limit")) \
        .to_be_visible()
    await expect(chart).not_to_contain_text("no history")  # drawn from the usage history (Redis's open buckets)
    await shot(page, "tenant-usage-page.png", docs=True)

    # A reload keeps the page (the cookie, not the used link), and Back leaves it: the link is not in the history.
    await page.reload()
    await expect(page.get_by_role("heading", name="Usage this period")).to_be_visible()

    # At a phone's width nothing scrolls sideways but the table's own box.
    await assert_fits_a_phone(page)
    await shot(page, "tenant-usage-page-phone.png")
    await page.set_viewport_size({"width": 1100, "height": 900})

    # Manage billing: one click to Stripe's portal (the emulator's stand-in), and back to the app from there.
    await page.get_by_role("button", name="Manage billing").click()
    await expect(page.locator("#customer")).to_have_text(CUSTOMER)
    (session,) = stripe_emulator.portal_sessions.values()
    assert page.url == session["url"]
    await page.get_by_role("link", name="Return").click()
    await expect(page.get_by_role("heading", name="Back in CosmosBuilder")).to_be_visible()
    await page.go_back()
    await page.go_back()
    await expect(page).to_have_url(f"{gateway}/_gateway/portal")
    await page.go_back()
    await expect(page).to_have_url(f"{web_app.url}/")  # the link itself was replaced in the history

    # The link again: used. A new one, ten minutes later: expired. Both a clear page.
    await page.goto(link)
    await expect(page.get_by_role("heading", name="This link cannot be used again")).to_be_visible()
    await expect(page.get_by_role("alert")).to_contain_text("used already")
    await shot(page, "tenant-usage-link-used.png")
    await page.goto(f"{web_app.url}/")
    clock.advance(601)
    await page.get_by_role("link", name="Usage and billing").click()
    await expect(page.get_by_role("alert")).to_contain_text("expired")

    assert csp_violations == []
    assert fetched_elsewhere == []  # nothing fetched from outside: it works air-gapped
    await context.close()
