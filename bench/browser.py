"""A real browser on the overlay page, for the benchmarks: Debian's chromium driven by Playwright.

Nothing is downloaded: Playwright launches the system's chromium (``/usr/bin/chromium``, Debian package
``chromium``) with the flags a closed machine needs (no background networking, no sandbox as root).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from typing import Any

from copilot.errors import UsageError

BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]

# the wake and text of the advice the page shows right now ('' when its box is hidden)
SHOWN_ADVICE = """() => { const box = document.getElementById('advice');
    return box.classList.contains('shown') ?
        box.dataset.wake + '|' + document.getElementById('advice-text').textContent : ''; }"""


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        raise UsageError("this benchmark needs a browser: install Debian's chromium (apt-get install chromium)")
    return path


@contextlib.contextmanager
def overlay_page(url: str, *, until_serving: subprocess.Popen[Any] | None = None, width: int = 1280,
                 height: int = 720, wait_s: float = 60.0) -> Iterator[Any]:
    """A Playwright page connected to the overlay at ``url`` (retried until it serves, while the copilot
    process ``until_serving`` is still running)."""
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError:
        raise UsageError("this benchmark needs Playwright: pip install playwright (it drives the system's "
                         "chromium; no browser is downloaded)") from None
    exe = chromium_path()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            deadline = time.monotonic() + wait_s
            while True:
                try:
                    page.goto(url, timeout=2000)
                    break
                except Error:
                    if until_serving is not None and until_serving.poll() is not None:
                        raise UsageError("the copilot exited before serving the overlay page") from None
                    if time.monotonic() > deadline:
                        raise UsageError(f"the overlay page never came up at {url}") from None
                    time.sleep(0.3)
            page.wait_for_function("document.body.dataset.connected === '1'", timeout=15000)
            yield page
        finally:
            browser.close()
