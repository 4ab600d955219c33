"""Headless Chromium for tests and docs: find the browser, render an HTML file to a PNG. No network, no profile of
the user's: a throwaway user-data directory and every background service switched off."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """The first Chromium-family browser on PATH, or None."""
    return next((found for name in CHROMIUM_NAMES if (found := shutil.which(name))), None)


def screenshot(html: Path, png: Path, *, width: int = 1400, height: int = 2400, timeout: float = 120.0) -> Path:
    """Load ``html`` in headless Chromium and write a ``width`` × ``height`` PNG; RuntimeError if none is written."""
    browser = find_chromium()
    if browser is None:
        raise RuntimeError("chromium not found; install it (Debian: apt-get install -y chromium)")
    png = png.resolve()
    png.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="llmlab-chromium-") as profile:
        command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                   "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                   f"--user-data-dir={profile}", f"--screenshot={png}", f"--window-size={width},{height}",
                   html.resolve().as_uri()]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if not png.is_file() or png.stat().st_size == 0:
        raise RuntimeError(f"chromium wrote no screenshot (exit {done.returncode}): {done.stderr[-2000:]}")
    return png
