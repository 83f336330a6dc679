"""Headless Chromium (Debian's ``chromium`` + ``chromium-driver``) driven by Selenium, for the console tests.

    def test_page(browser: BrowserFactory) -> None:
        page = browser(PHONE, javascript=False)
        page.open(url)
        page.shot("groups")            # <tmp_path>/screenshots/groups-phone-nojs.png

Every page is a fresh browser profile (no cookie leaks between users). The viewport is set with
the DevTools protocol's device-metrics override, not the window size: headless Chromium will not
make a window narrower than 500 px, and a phone is narrower than that. Screenshots are full-page
PNGs under the test's own ``tmp_path`` (they are the test's artefacts: look at them).

Under ZERFAUX_REQUIRE_REAL=1 a missing Chromium, chromedriver or Selenium fails the test; on a
laptop it skips. ``ZERFAUX_CHROMIUM`` / ``ZERFAUX_CHROMEDRIVER`` point at other binaries.
"""

from __future__ import annotations

import base64
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest

from tests.support.require import missing

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Viewport:
    name: str
    width: int
    height: int
    mobile: bool = False
    scale: float = 1.0


DESKTOP = Viewport("desktop", 1280, 800)
PHONE = Viewport("phone", 390, 844, mobile=True, scale=2.0)
VIEWPORTS = (DESKTOP, PHONE)


def binaries() -> tuple[str, str]:
    """The Chromium and chromedriver to use, or a missing-service failure (skip off CI)."""
    chromium = os.environ.get("ZERFAUX_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    driver = os.environ.get("ZERFAUX_CHROMEDRIVER") or shutil.which("chromedriver")
    if not chromium or not os.access(chromium, os.X_OK):
        missing("headless Chromium", f"no `chromium` ({chromium or 'not on PATH'}); scripts/bootstrap.sh test "
                                     "installs Debian's chromium")
    if not driver or not os.access(driver, os.X_OK):
        missing("chromedriver", f"no `chromedriver` ({driver or 'not on PATH'}); Debian package chromium-driver")
    return chromium, driver


class Page:
    """One browser with one viewport: open URLs, read the DOM, take screenshots."""

    def __init__(self, driver: Any, viewport: Viewport, javascript: bool, shots: Path) -> None:
        self.driver = driver
        self.viewport = viewport
        self.javascript = javascript
        self.shots = shots

    @property
    def url(self) -> str:
        return str(self.driver.current_url)

    def open(self, url: str) -> Page:
        self.driver.get(url)
        return self

    def text(self) -> str:
        """What a person reads: the body's rendered text (Selenium's own .text hides <noscript>)."""
        return str(self.run("return document.body ? document.body.innerText : ''"))

    def css(self, selector: str) -> list[Any]:
        return list(self.driver.find_elements("css selector", selector))

    def run(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def cookie(self, name: str, value: str) -> None:
        """A cookie for the current origin (open a page of the site first)."""
        self.driver.add_cookie({"name": name, "value": value, "path": "/", "httpOnly": True})

    def cookies(self) -> list[dict[str, Any]]:
        return list(self.driver.get_cookies())

    def wait(self, check: Callable[[], Any], timeout: float = 30.0, interval: float = 0.2, what: str = "") -> Any:
        """Poll ``check`` until truthy; fail naming ``what`` and saving a screenshot of how the page was."""
        deadline = time.monotonic() + timeout
        value: Any = None
        while time.monotonic() < deadline:
            try:
                value = check()
            except Exception as exc:  # the DOM changes under us while the page updates itself
                value = exc
            if value and not isinstance(value, Exception):
                return value
            time.sleep(interval)
        shot = self.shot(f"timeout-{what or 'wait'}")
        raise AssertionError(f"page did not show {what or 'the expected state'} within {timeout}s "
                             f"(last: {value!r}; screenshot {shot}); page text:\n{self.text()[:2000]}")

    def shot(self, name: str) -> Path:
        """A full-page screenshot, named after the page and this browser's viewport and script setting."""
        self.shots.mkdir(parents=True, exist_ok=True)
        suffix = self.viewport.name + ("" if self.javascript else "-nojs")
        path = self.shots / f"{name}-{suffix}.png"
        data = self.driver.execute_cdp_cmd("Page.captureScreenshot",
                                           {"format": "png", "captureBeyondViewport": True})
        path.write_bytes(base64.b64decode(data["data"]))
        log.info("screenshot %s", path)
        return path

    def overflows(self) -> int:
        """How many CSS pixels the page is wider than the device (a phone must not scroll sideways).
        Measured against the device's width, not window.innerWidth: a mobile browser widens its
        layout viewport to fit content that overflows (and shrinks the text to fit)."""
        return int(self.run("return Math.max(0, document.documentElement.scrollWidth - arguments[0])",
                            self.viewport.width))

    def legibility(self, min_px: float = 12.0) -> list[str]:
        """What makes the page hard to read here: sideways scrolling of the whole page, visible text
        smaller than ``min_px`` CSS pixels, text cut off by its own box (SVG charts' labels aside)."""
        problems = []
        if self.overflows():
            culprits = self.run("""
                const w = arguments[0];
                const clipped = e => { for (let a = e.parentElement; a; a = a.parentElement) {
                    if (['auto', 'scroll', 'hidden'].includes(getComputedStyle(a).overflowX)
                        && a !== document.body && a !== document.documentElement) return true; }
                  return false; };
                return Array.from(document.querySelectorAll('body *'))
                  .filter(e => e.getBoundingClientRect().right > w + 1 && !clipped(e)
                               && !Array.from(e.children).some(c => c.getBoundingClientRect().right > w + 1))
                  .slice(0, 3).map(e => e.tagName.toLowerCase() + (e.id ? '#' + e.id : '')
                       + (e.className && e.className.baseVal === undefined ? '.' + e.className : '')
                       + ' ' + JSON.stringify((e.innerText || '').slice(0, 30)));""", self.viewport.width)
            problems.append(f"the page scrolls sideways by {self.overflows()} px at {self.viewport.width} px wide"
                            f" (sticking out: {', '.join(culprits)})")
        for text, size in self.run("""
            const out = [], min = arguments[0];
            const walk = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
            while (walk.nextNode()) {
              const node = walk.currentNode, el = node.parentElement, t = node.textContent.trim();
              if (!t || !el || el.closest('svg, noscript, script, style, title, option')) continue;
              const r = el.getBoundingClientRect();
              if (r.width === 0 || r.height === 0) continue;
              const size = parseFloat(getComputedStyle(el).fontSize);
              if (size < min) out.push([t.slice(0, 40), size]);
            }
            return out.slice(0, 10);""", min_px):
            problems.append(f"text {text!r} is {size:.1f} px")
        for text in self.run("""
            return Array.from(document.querySelectorAll('button, .status, th, td, dt, dd, label, a'))
              .filter(e => e.getBoundingClientRect().width > 0 && !e.closest('.table-wrap')
                           && e.scrollWidth > e.clientWidth + 1
                           && getComputedStyle(e).overflowX !== 'visible')
              .map(e => e.innerText.slice(0, 40)).slice(0, 10);"""):
            problems.append(f"text {text!r} is cut off by its box")
        return problems


class BrowserFactory(Protocol):
    def __call__(self, viewport: Viewport = DESKTOP, *, javascript: bool = True) -> Page: ...


def launch(viewport: Viewport, javascript: bool, shots: Path) -> Page:
    chromium, driver_path = binaries()
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError as exc:
        missing("Selenium", f"{exc} (pip install -e '.[test]')")
    options = Options()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--disable-extensions", "--disable-background-networking",
                "--lang=en-US", f"--window-size={max(viewport.width, 500)},{viewport.height}"):
        options.add_argument(arg)
    if not javascript:  # what a person who turned scripts off has; <noscript> renders
        options.add_experimental_option("prefs", {"profile.managed_default_content_settings.javascript": 2})
    # An explicit driver path: Selenium Manager would otherwise try to download one.
    chrome = webdriver.Chrome(service=Service(driver_path), options=options)
    chrome.set_page_load_timeout(30)
    chrome.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": viewport.width, "height": viewport.height,
        "deviceScaleFactor": viewport.scale, "mobile": viewport.mobile,
    })
    return Page(chrome, viewport, javascript, shots)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[BrowserFactory]:
    """Start headless Chromium pages on demand; every one is closed when the test ends."""
    pages: list[Page] = []
    shots = tmp_path / "screenshots"

    def start(viewport: Viewport = DESKTOP, *, javascript: bool = True) -> Page:
        page = launch(viewport, javascript, shots)
        pages.append(page)
        return page

    yield start
    for page in pages:
        try:
            page.driver.quit()
        except Exception as exc:  # a crashed browser must not hide the test's own result
            log.warning("closing chromium: %s", exc)
