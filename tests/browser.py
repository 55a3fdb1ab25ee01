"""A real headless Chromium for the browser tests and the page benchmark (Debian's chromium + chromium-driver).

Without the background-networking flags Chromium keeps trying to reach Google's services,
which a closed network answers slowly; a fresh profile per run keeps runs independent.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
DRIVER_NAMES = ("chromedriver",)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--disable-extensions", "--window-size=1360,1000", "--force-device-scale-factor=1"]


def find_browser() -> tuple[str, str] | None:
    """(chromium, chromedriver) executables, or None when either is missing."""
    browser = next((p for n in CHROMIUM_NAMES if (p := shutil.which(n))), None)
    driver = next((p for n in DRIVER_NAMES if (p := shutil.which(n))), None)
    if driver is None and Path("/usr/lib/chromium/chromedriver").exists():
        driver = "/usr/lib/chromium/chromedriver"
    return (browser, driver) if browser and driver else None


def skip_reason() -> str | None:
    """Why browser tests cannot run here (None: they can). In CI they must run: a missing browser fails."""
    if find_browser():
        return None
    message = "no chromium and chromium-driver installed (apt-get install chromium chromium-driver)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        raise RuntimeError(f"CI must run the browser tests, but there is {message}")
    return message


def start_chromium(profile: Path | None = None):
    """A Selenium WebDriver on a fresh headless Chromium profile."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    found = find_browser()
    if found is None:
        raise RuntimeError(skip_reason() or "no browser")
    browser, driver = found
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile or tempfile.mkdtemp(prefix='hm-chromium-')}")
    return webdriver.Chrome(service=Service(driver), options=options)
