"""A static page checked in a real headless browser: Debian's chromium driven by Selenium through
the system chromedriver (given by path, so Selenium Manager never looks for one on the network).

    python -m tests.browser PAGE.html SCREENSHOT.png    # prints what it saw; exit 1 on a problem

`browser_or_skip()` skips a test where chromium, chromedriver or selenium is missing, except under
CI (`CI` or `COMPRESS_REQUIRE_BROWSER` set, as `.ci/run` does), where that is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

REQUIRE_ENV = ("CI", "COMPRESS_REQUIRE_BROWSER")
CHROMIUM = ("chromium", "chromium-browser")
DRIVER = "chromedriver"
WIDTH = 1400


@dataclass
class PageCheck:
    title: str
    leaderboard_rows: int
    images: int
    broken_images: list[str]  # alt text of every <img> that did not load (naturalWidth 0)
    console_errors: list[str]  # SEVERE browser log entries
    screenshot: str


def find_browser() -> tuple[str | None, str | None, str]:
    """(chromium, chromedriver, why not) on this machine."""
    chromium = next((p for p in map(shutil.which, CHROMIUM) if p), None)
    driver = shutil.which(DRIVER)
    try:
        import selenium  # noqa: F401
    except ImportError:
        return chromium, driver, "selenium is not installed (pip install -e '.[dev]')"
    if chromium is None or driver is None:
        return (
            chromium,
            driver,
            "chromium/chromedriver not found (apt-get install chromium chromium-driver)",
        )
    return chromium, driver, ""


def browser_or_skip() -> tuple[str, str]:
    chromium, driver, why = find_browser()
    if why:
        required = [v for v in REQUIRE_ENV if os.environ.get(v)]
        if required:
            pytest.fail(f"{why}; a browser is required here ({', '.join(required)} set)")
        pytest.skip(f"{why}; set CI=1 or COMPRESS_REQUIRE_BROWSER=1 to make this a failure")
    return chromium, driver


def check_page(page: Path, screenshot: Path, chromium: str, driver: str) -> PageCheck:
    """Open `page` (file://) in headless chromium, read what rendered, save a full-page
    screenshot."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={WIDTH},900"):  # fmt: skip
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(executable_path=driver), options=opts)
    try:
        browser.get(Path(page).resolve().as_uri())
        images = browser.execute_script(
            "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth]);"
        )
        rows = browser.execute_script(
            "const t = document.getElementById('leaderboard');"
            " return t ? t.tBodies[0].rows.length : -1;"
        )
        height = browser.execute_script("return document.documentElement.scrollHeight;")
        browser.set_window_size(WIDTH, min(int(height) + 100, 16000))
        Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(screenshot))
        errors = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        return PageCheck(
            title=browser.title,
            leaderboard_rows=rows,
            images=len(images),
            broken_images=[alt for alt, done, width in images if not (done and width > 0)],
            console_errors=errors,
            screenshot=str(screenshot),
        )
    finally:
        browser.quit()


if __name__ == "__main__":
    chromium, driver, why = find_browser()
    if why:
        sys.exit(f"error: {why}")
    result = check_page(Path(sys.argv[1]), Path(sys.argv[2]), chromium, driver)
    print(json.dumps(asdict(result), indent=2))
    sys.exit(1 if result.broken_images or result.console_errors else 0)
