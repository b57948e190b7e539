"""What the browser tests share (tests/gateway/console and tests/gateway/portal): Debian's headless chromium
driven by Playwright, screenshots, the narrow-screen check and the usage both pages show.

Playwright never downloads a browser here: it launches /usr/bin/chromium (scripts/ensure-chromium.sh installs
it; `make test` runs that first), or $CHROMIUM. Screenshots are kept in var/artifacts/; with
UPDATE_DOCS_SCREENSHOTS=1 those a test marks for the docs are copied to docs/ too.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from playwright.async_api import Browser, Page, async_playwright

from tests.support import ROOT, bearer

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FOUND = Path(CHROMIUM).exists()  # checked once, at import: not a blocking call inside the loop
ARTIFACTS = ROOT / "var" / "artifacts"
DOCS = ROOT / "docs"
DEADLINE_MS = 15_000  # any one browser step; a loaded machine is slow, a hung page still fails the test


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if not CHROMIUM_FOUND:
        pytest.fail(f"{CHROMIUM} is missing: run scripts/ensure-chromium.sh (make test does)")
    async with async_playwright() as playwright:
        # --no-sandbox: the tests run as root in CI, where Chromium's sandbox refuses to start.
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                                    args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            yield launched
        finally:
            await launched.close()


async def shot(page: Page, name: str, *, docs: bool = False) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    await page.screenshot(path=str(path), full_page=True)
    if docs and os.environ.get("UPDATE_DOCS_SCREENSHOTS") == "1":  # a test run never rewrites tracked files
        shutil.copyfile(path, DOCS / name)


async def assert_fits_a_phone(page: Page) -> None:
    """At a phone's width (390 px) nothing scrolls sideways but a wide table's own box (`.table-wrap`)."""
    await page.set_viewport_size({"width": 390, "height": 844})
    await page.reload()
    wide = await page.evaluate("""[...document.querySelectorAll('body *')].filter(e =>
        e.getBoundingClientRect().right > 391 && !(e.parentElement && e.parentElement.closest('.table-wrap'))
    ).map(e => e.tagName + '.' + e.className + '#' + e.id)""")
    assert wide == [] and await page.evaluate("document.documentElement.scrollWidth") <= 390, wide


async def acme_usage(proxy: str) -> None:
    """Usage of acme for the pages to show: 15 deployments (a billed counter with a limit, within the starter
    plan's burst of 20) and reported gauges (chains 1, storage_gb 7.5)."""
    async with aiohttp.ClientSession() as http:
        for _ in range(15):
            async with http.post(f"{proxy}/api/chains/c1/deployments", headers=bearer("acme")) as response:
                assert response.status == 200
        async with http.get(f"{proxy}/api/chains?usage=chains%3D1%2C%20storage_gb%3D7.5",
                            headers=bearer("acme")) as response:
            assert response.status == 200
