"""Headless Chromium (the Debian package) driven by Playwright: no browser download, loopback and file:// only."""
from __future__ import annotations

import contextlib
import os
import shutil

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@contextlib.contextmanager
def chromium_page():
    """A fresh page in a new headless Chromium (stopped on exit); skips (fails in CI) without Chromium."""
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (apt-get install -y chromium)")
        pytest.skip("chromium is not installed")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run"])
        try:
            context = browser.new_context(accept_downloads=True, viewport={"width": 1400, "height": 1000})
            yield context.new_page()
        finally:
            browser.close()
