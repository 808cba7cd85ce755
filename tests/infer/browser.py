"""Headless Chromium for the live page's test and scripts/screenshot_live_view.py.

Driven by playwright-python with the system Chromium (Debian's `chromium` package), never the browsers
`playwright install` downloads: the machines that run the tests are offline. D2F_CHROMIUM overrides
the binary's path."""
from __future__ import annotations

import contextlib
import importlib.util
import os
import tempfile

CHROMIUM = os.environ.get("D2F_CHROMIUM", "/usr/bin/chromium")
# No sandbox (CI runs as root in a container), no GPU, and nothing that phones home: the browser
# must not wait on a network that is not there.
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def missing() -> str | None:
    """Why the browser cannot run here, or None when it can."""
    if importlib.util.find_spec("playwright") is None:
        return "the python package playwright is not installed (pip install -e '.[dev]')"
    if not os.path.exists(CHROMIUM):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium, or set D2F_CHROMIUM)"
    return None


@contextlib.contextmanager
def chromium_page(width: int = 1100, height: int = 700):
    """A page in a fresh headless Chromium (a new --user-data-dir each time), closed on exit."""
    from playwright.sync_api import sync_playwright
    with tempfile.TemporaryDirectory(prefix="d2f-chromium-") as profile, sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True, args=ARGS,
                                                   viewport={"width": width, "height": height})
        try:
            yield ctx.pages[0] if ctx.pages else ctx.new_page()
        finally:
            ctx.close()
