"""The console in a real browser: Debian's headless chromium driven by Playwright (tests/gateway/browser.py),
against a real gateway process (SQLite, the test's redis-server, a real upstream). With UPDATE_DOCS_SCREENSHOTS=1
the overview's and the tenant page's screenshots are copied to docs/.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
from playwright.async_api import Browser, expect

from metering.db import create_engine, session_factory
from metering.models import LedgerEntry
from tests.gateway.browser import DEADLINE_MS, acme_usage, assert_fits_a_phone, browser, shot  # noqa: F401
from tests.gateway.conftest import StartGateway
from tests.gateway.console.conftest import ADMIN_TOKENS, OPS_TOKEN
from tests.support import Upstream, bearer


async def _traffic(proxy: str) -> None:
    """Usage for the pages to show: acme's deployments and gauges, a second tenant, refusals."""
    await acme_usage(proxy)
    async with aiohttp.ClientSession() as http:
        statuses = []
        for _ in range(25):  # beyond the burst: some are refused (rate)
            async with http.get(f"{proxy}/api/chains", headers=bearer("globex")) as response:
                statuses.append(response.status)
        assert set(statuses) == {200, 429}
        for _ in range(4):
            async with http.get(f"{proxy}/api/chains", headers={"Authorization": "Bearer nope"}) as response:
                assert response.status == 401


async def _park(database: Path) -> str:
    """A bucket the sync worker parked (acme has no Stripe customer), written into the gateway's ledger."""
    from datetime import UTC, datetime
    from decimal import Decimal

    engine = create_engine(f"sqlite+aiosqlite:///{database}")
    try:
        async with session_factory(engine)() as session, session.begin():
            session.add(LedgerEntry(tenant_id="acme", meter="chain_deployments",
                                    bucket_start=datetime(2026, 1, 5, 10, 0, tzinfo=UTC), value=Decimal(3),
                                    kind="counter", state="parked", identifier="acme-chain_deployments-1767607200",
                                    attempts=1, last_error="no_customer: tenant has no Stripe customer"))
    finally:
        await engine.dispose()
    return "acme-chain_deployments-1767607200"


async def test_an_operator_works_through_the_console(browser: Browser, start_gateway: StartGateway,  # noqa: F811
                                                     upstream: Upstream, tmp_path: Path) -> None:
    gateway = start_gateway(upstream.url, admin={"tokens": ADMIN_TOKENS})
    await _traffic(gateway.url)
    await _park(tmp_path / "gateway.db")
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(DEADLINE_MS)
    page = await context.new_page()
    csp_violations: list[str] = []
    page.on("console", lambda m: csp_violations.append(m.text) if "Content Security Policy" in m.text else None)
    requests_elsewhere: list[str] = []
    page.on("request", lambda r: None if r.url.startswith(gateway.admin_url) else requests_elsewhere.append(r.url))

    # Sign in: a console page sends the browser to the form first, and back after.
    await page.goto(f"{gateway.admin_url}/admin/ui/tenants")
    await expect(page).to_have_url(f"{gateway.admin_url}/admin/ui/sign-in?next=/admin/ui/tenants")
    # With the keyboard only: the token field has the focus, Enter sends the form.
    await expect(page.get_by_label("Admin token or admin JWT")).to_be_focused()
    await page.keyboard.type("not-a-token-0123456789")
    await page.keyboard.press("Enter")
    await expect(page.get_by_role("alert")).to_contain_text("neither an admin token")
    await page.get_by_label("Admin token or admin JWT").fill(OPS_TOKEN)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page).to_have_url(f"{gateway.admin_url}/admin/ui/tenants")
    cookie = next(c for c in await context.cookies() if c["name"] == "cosmos_console")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"

    # The overview: traffic, refusals by reason, the tenant nearest its limit.
    await page.get_by_role("link", name="Overview").click()
    await expect(page.get_by_role("heading", name="Overview", exact=True)).to_be_visible()
    await page.keyboard.press("Tab")  # the first stop of the keyboard is the skip link, then the navigation
    await expect(page.get_by_role("link", name="Skip to content")).to_be_focused()
    await page.keyboard.press("Tab")
    await expect(page.get_by_role("link", name="Overview")).to_be_focused()
    await expect(page.locator("#h-rejections + dl")).to_contain_text("invalid-token")
    await expect(page.get_by_role("img", name="acme chains: 1 of 1 used")).to_be_visible()
    await shot(page, "console-overview.png", docs=True)

    # Find the tenant and read its usage.
    await page.get_by_role("link", name="Tenants").click()
    await page.get_by_label("Tenant id starts with").fill("ac")
    await page.get_by_role("button", name="Search").click()
    await expect(page.get_by_role("link", name="globex")).to_have_count(0)
    await page.get_by_role("link", name="acme", exact=True).click()
    row = page.locator('#usage tr[data-meter="chain_deployments"]')
    await expect(row.locator("td.used")).to_have_text("15")
    await expect(row.locator("td.limit")).to_have_text("100")

    # An override with an expiry: in the limits and in the audit trail at once.
    await page.get_by_label("Meter", exact=True).select_option("chain_deployments")
    await page.get_by_label("Limit (whole units)").fill("250")
    await page.get_by_label("Expires (UTC, optional)").fill("2099-01-31T12:30")
    await page.get_by_label("Reason").fill("launch week")
    await page.get_by_role("button", name="Save override").click()
    await expect(page.get_by_role("status")).to_have_text("Override saved.")
    await expect(row.locator("td.limit")).to_have_text("250")
    overrides = page.locator("#overrides")
    await expect(overrides).to_contain_text("2099-01-31T12:30:00Z")
    await expect(overrides).to_contain_text("launch week")
    trail = page.locator("table.audit tbody tr").first
    await expect(trail).to_contain_text("token:ops")
    await expect(trail).to_contain_text("override.put")
    await expect(trail).to_contain_text('"limit": 250')
    await shot(page, "console-tenant.png", docs=True)

    # At a phone's width the page does not scroll sideways (wide tables scroll in their own box).
    await assert_fits_a_phone(page)
    await shot(page, "console-tenant-phone.png")
    await page.set_viewport_size({"width": 1280, "height": 900})

    # Retry a parked bucket.
    await page.get_by_role("link", name="Billing sync").click()
    parked = page.locator("#parked")
    await expect(parked).to_contain_text("no_customer")
    await shot(page, "console-sync.png")
    await parked.get_by_role("button", name="Retry now").click()
    await expect(page.get_by_role("status")).to_contain_text("pending again")
    await expect(page.locator("#parked")).to_have_count(0)
    await page.get_by_role("link", name="Audit log").click()
    await page.get_by_label("Action").fill("sync.requeue")
    await page.get_by_role("button", name="Filter").click()
    await expect(page.locator("table.audit tbody tr")).to_have_count(1)
    await shot(page, "console-audit.png")

    # A POST without the CSRF token is refused, even with the session cookie.
    answer = await page.request.post(f"{gateway.admin_url}/admin/ui/tenant/override",
                                     form={"tenant": "acme", "meter": "chain_deployments", "limit": "1"},
                                     headers={"Origin": gateway.admin_url}, max_redirects=0)
    assert answer.status == 403
    await page.reload()
    await expect(page.locator("table.audit tbody tr")).to_have_count(1)

    # Sign out: the session is gone.
    await page.get_by_role("button", name="Sign out").click()
    await expect(page.get_by_role("status")).to_have_text("You are signed out.")
    await page.goto(f"{gateway.admin_url}/admin/ui/")
    await expect(page.get_by_role("heading", name="Sign in")).to_be_visible()

    assert csp_violations == []
    assert requests_elsewhere == []  # nothing fetched from outside: it works air-gapped
    await context.close()
    await asyncio.sleep(0)
