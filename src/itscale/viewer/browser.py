"""A rendered page in a real browser: Debian's Chromium (/usr/bin/chromium) driven by
Playwright, headless. The viewer's tests and the pictures in docs/results use it; the page
itself needs no browser automation. Playwright is a development dependency, imported only
here, and its own browser download (`playwright install`) is never used."""

from __future__ import annotations

from pathlib import Path
from typing import Any

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


async def launch(playwright: Any) -> Any:
    """Chromium from `async_playwright()`, headless, with nothing running in the background."""
    return await playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)


async def screenshot(page_path: Path, png: Path, width: int = 1600, height: int = 900, chosen: bool = True) -> None:
    """A picture of a viewer page as a reader first sees it; with `chosen`, after clicking
    "show the chosen particle" (its text in the side panel, its ancestry highlighted)."""
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await launch(playwright)
        try:
            page = await browser.new_page(viewport={"width": width, "height": height})
            await page.goto(Path(page_path).resolve().as_uri())
            await page.wait_for_function("window.itscaleViewer !== undefined")
            if chosen and await page.locator("#show-chosen").count():
                await page.click("#show-chosen")
            await page.screenshot(path=str(png))
        finally:
            await browser.close()
